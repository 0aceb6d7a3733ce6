"""How a model family writes tool calls: which family a chat template belongs to, the grammar that
forces a call in that family's own format (for `tool_choice` "required" or a named function), and
what the output parser (tool_parser.py) looks for.

Families (each call is a JSON object with the function's name first, then its arguments):
- hermes (Qwen2.5 / Qwen3, Hermes, and Athena's generic prompt): one block per call,
  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, blocks separated by a newline,
  text allowed around them;
- llama3_json (Llama 3.1 / 3.2 / 3.3 JSON tool calling): the whole reply is
  `{"name": "f", "parameters": {...}}`, optionally after `<|python_tag|>`; the template takes one
  call per turn;
- mistral (Mistral v0.3-style templates): `[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]`;
  its call ids are 9 letters and digits (the template checks them).
A special marker token (`[TOOL_CALLS]`, `<|python_tag|>`) gives no text when detokenized; the parser
is told when its id appears, and a reply that starts with the family's bare JSON is read as calls too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("athena.server")

MAX_ARGUMENT_WHITESPACE = 1  # whitespace characters allowed between JSON tokens of forced arguments


@dataclass(frozen=True)
class ToolSyntax:
    name: str
    arguments_key: str  # "arguments" or "parameters"
    start_markers: tuple[str, ...]  # text that opens a region of calls
    end_marker: str | None  # text that closes a region (None: the region runs to the end)
    bare_start: str | None  # a reply starting with this character is a region without a marker
    call_separator: str  # between calls when forced
    single_call: bool = False  # the template takes one call per turn
    id_length: int | None = None  # exact id length the template requires (letters and digits), else OpenAI's style

    def call_prefix(self, function: str) -> str:
        return f'{{"name": "{function}", "{self.arguments_key}": '

    def structure(
        self, functions: list[tuple[str, dict[str, Any]]], parallel: bool, marker_is_token: bool = False
    ) -> dict[str, Any]:
        """xgrammar structural tag: at least one call of `functions` ((name, parameters schema) pairs),
        each call's arguments valid under its schema; one call unless `parallel`."""
        tags = [
            {
                "type": "tag",
                "begin": self._tag_begin(name),
                "content": {
                    "type": "json_schema",
                    "json_schema": params,
                    "max_whitespace_cnt": MAX_ARGUMENT_WHITESPACE,
                },
                "end": self._tag_end(),
            }
            for name, params in functions
        ]
        calls = {
            "type": "tags_with_separator",
            "tags": tags,
            "separator": self.call_separator,
            "at_least_one": True,
            "stop_after_first": self.single_call or not parallel,
        }
        if self.name != "mistral":
            return {"type": "structural_tag", "format": calls}
        marker = (
            {"type": "token", "token": self.start_markers[0]}
            if marker_is_token
            else {"type": "const_string", "value": self.start_markers[0]}
        )
        return {
            "type": "structural_tag",
            "format": {
                "type": "sequence",
                "elements": [
                    marker,
                    {"type": "const_string", "value": " ["},
                    calls,
                    {"type": "const_string", "value": "]"},
                ],
            },
        }

    def _tag_begin(self, function: str) -> str:
        if self.name == "hermes":
            return "<tool_call>\n" + self.call_prefix(function)
        return self.call_prefix(function)

    def _tag_end(self) -> str:
        return "}\n</tool_call>" if self.name == "hermes" else "}"


HERMES = ToolSyntax("hermes", "arguments", ("<tool_call>",), "</tool_call>", None, "\n")
LLAMA3_JSON = ToolSyntax("llama3_json", "parameters", ("<|python_tag|>",), None, "{", "; ", single_call=True)
MISTRAL = ToolSyntax("mistral", "arguments", ("[TOOL_CALLS]",), None, "[", ", ", id_length=9)
SYNTAXES = {s.name: s for s in (HERMES, LLAMA3_JSON, MISTRAL)}


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template reads the `tools` variable (transformers passes it there)."""
    if not template:
        return False
    import jinja2
    from jinja2 import meta

    try:
        return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return "tools" in template


def detect_syntax(template: str | None) -> ToolSyntax | None:
    """The family of a chat template that renders tools itself, or None (then the generic prompt)."""
    if not template_takes_tools(template):
        return None
    assert template is not None
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template or "[AVAILABLE_TOOLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or ("ipython" in template and "parameters" in template):
        return LLAMA3_JSON
    return None


def special_marker_ids(syntax: ToolSyntax, tokenizer: Any) -> dict[int, str]:
    """Token id -> marker text, for markers that are one special token (the detokenizer drops their text)."""
    out = {}
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    for marker in syntax.start_markers + ((syntax.end_marker,) if syntax.end_marker else ()):
        token_id = added.get(marker)
        if token_id is None:
            ids = tokenizer.convert_tokens_to_ids([marker])
            token_id = ids[0] if ids and ids[0] in special else None
        if token_id is not None:
            out[token_id] = marker
    return out
