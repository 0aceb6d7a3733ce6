"""A conversation rendered as the model's prompt text, the same way for the server and `athena chat`.

- The tokenizer's chat template when it has one.
- A template without a system role (it raises on one, as Mistral's first template and Gemma 1/2's do): the system
  prompt is folded into the first user turn, "{system}\\n\\n{user}" (what Gemma 3's own template does), and the
  template is tried again; logged once. Any other refusal is the caller's error to report.
- No template at all (a base model): the turns' text, one per line; logged once.
"""

from __future__ import annotations

import logging
from typing import Any

import jinja2

from athena_runtime.log_once import log_once

log = logging.getLogger(__name__)


def fold_system_prompt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The system messages' text moved into the first user turn (a user turn of its own when there is none)."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system:
        return rest
    prefix = "\n\n".join(system)
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{prefix}\n\n{m['content']}"
            return rest
    return [{"role": "user", "content": prefix}, *rest]


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages` ([{"role", "content"}]). Raises jinja2.TemplateError when the template
    refuses the conversation for a reason other than its system message."""
    if not getattr(tokenizer, "chat_template", None):
        log_once(
            log,
            ("chat_prompt", "no template"),
            logging.WARNING,
            "the tokenizer has no chat template: chat prompts are the messages' text, one per line",
        )
        return "\n".join(m["content"] for m in messages) + "\n"

    def apply(msgs):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)

    try:
        return apply(messages)
    except jinja2.TemplateError:
        if not any(m["role"] == "system" for m in messages):
            raise
    text = apply(fold_system_prompt(messages))  # a second refusal is about something else: the caller reports it
    log_once(
        log,
        ("chat_prompt", "folded"),
        logging.INFO,
        "the chat template refuses system messages: the system prompt is folded into the first user turn",
    )
    return text
