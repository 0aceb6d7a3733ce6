"""Tools on the chat endpoint: how a request's messages and tools reach the model, which grammar
forces a call, and how the output becomes `tool_calls`.

Rendering: when the model's chat template reads `tools` and its family is known (tool_syntax.py),
the template renders the tools, the assistant `tool_calls` of the history and the `tool` results
itself (transformers' `apply_chat_template(tools=...)`, arguments passed as JSON objects). Otherwise
Athena's generic prompt is used (logged once per template): the tool list and the call format go into
the system message (`GENERIC_TOOLS_PROMPT`, below), earlier calls are written back into assistant
turns in that format, and `tool` results become user turns wrapped in <tool_response> tags.

tool_choice: "none" renders no tools and parses nothing; "auto" lets the model answer or call, and
the output is parsed (tool_parser.py, checked mode); "required" and a named function constrain the
output with a grammar of the family's call format whose arguments follow each function's
`parameters` schema, so the call always parses and validates; a named function is called once, and
`parallel_tool_calls: false` allows one call.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from athena_runtime.chat_prompt import render_chat
from server import errors
from server.protocol import ChatCompletionRequest, ChatMessage
from server.structured import check_schema
from server.tool_parser import Call, ToolCallParser
from server.tool_syntax import HERMES, ToolSyntax, detect_syntax, special_marker_ids

if TYPE_CHECKING:
    from athena_runtime.grammar import Grammar
    from server.structured import StructuredOutputs

log = logging.getLogger("athena.server")

GENERIC_TOOLS_PROMPT = """# Tools

You can call functions to help answer the user. Each function is described by a JSON object on its \
own line inside <tools></tools>; its "parameters" are a JSON Schema:
<tools>
{tools}
</tools>

To call a function, write a <tool_call></tool_call> block holding a JSON object with the function's \
name and its arguments, one block per call:
<tool_call>
{{"name": "<function name>", "arguments": <arguments as a JSON object>}}
</tool_call>"""
GENERIC_MUST_CALL = "\n\nAnswer now with a call to {which}."
NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses tools."""

    syntax: ToolSyntax
    native: bool  # the chat template renders tools itself
    mode: str | None  # None (none/no tools), "auto", "required", or a forced function's name
    functions: frozenset[str]
    parallel: bool
    marker_ids: dict[int, str]

    def parser(self) -> ToolCallParser | None:
        if self.mode is None:
            return None
        one = not self.parallel or self.mode not in ("auto", "required")  # a named choice: one call
        return ToolCallParser(
            self.syntax,
            self.functions,
            incremental=self.mode != "auto",
            max_calls=1 if one else None,
            marker_ids=self.marker_ids,
        )


def plan_tools(req: ChatCompletionRequest, tokenizer: Any) -> ToolPlan:
    template = getattr(tokenizer, "chat_template", None)
    syntax = detect_syntax(template if isinstance(template, str) else None)
    native = syntax is not None
    if req.tools and not native:
        log.info("the chat template does not render tools in a known format: using the generic tools prompt")
    syntax = syntax or HERMES
    mode = req.tool_mode()
    functions = frozenset(t.function.name for t in req.tools or [])
    parallel = req.parallel_tool_calls is not False
    return ToolPlan(syntax, native, mode, functions, parallel, special_marker_ids(syntax, tokenizer))


def _tool_dicts(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for t in req.tools or []:
        fn: dict[str, Any] = {"name": t.function.name}
        if t.function.description:
            fn["description"] = t.function.description
        fn["parameters"] = t.function.parameters if t.function.parameters is not None else NO_PARAMETERS
        out.append({"type": "function", "function": fn})
    return out


def _generic_call_text(m: ChatMessage) -> str:
    blocks = [
        f"<tool_call>\n{json.dumps({'name': c.function.name, 'arguments': c.function.arguments_object()})}"
        f"\n</tool_call>"
        for c in m.tool_calls or []
    ]
    return "\n".join(([m.text()] if m.text() else []) + blocks)


def _native_message(m: ChatMessage) -> dict[str, Any]:
    role = "system" if m.role == "developer" else m.role
    out: dict[str, Any] = {"role": role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments_object()},
            }
            for c in m.tool_calls
        ]
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id
        if m.name:
            out["name"] = m.name
    return out


def _generic_messages(req: ChatCompletionRequest, plan: ToolPlan) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for m in req.messages:
        if m.role == "tool":
            text = f"<tool_response>\n{m.text()}\n</tool_response>"
            if messages and messages[-1]["role"] == "user" and messages[-1].get("tool_results"):
                messages[-1]["content"] += "\n" + text  # consecutive results: one user turn
            else:
                messages.append({"role": "user", "content": text, "tool_results": True})
        elif m.role == "assistant" and m.tool_calls:
            messages.append({"role": "assistant", "content": _generic_call_text(m)})
        else:
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": m.text()})
    for msg in messages:
        msg.pop("tool_results", None)
    if plan.mode is not None:
        prompt = GENERIC_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in _tool_dicts(req)))
        if plan.mode == "required":
            prompt += GENERIC_MUST_CALL.format(
                which="one of the functions" if len(plan.functions) > 1 else "the function"
            )
        elif plan.mode != "auto":
            prompt += GENERIC_MUST_CALL.format(which=f"the function {plan.mode}")
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages


def render_prompt(req: ChatCompletionRequest, tokenizer: Any, plan: ToolPlan) -> str:
    """The request's messages (and tools) through the chat template, as text."""
    import jinja2

    kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
    if plan.native:
        messages = [_native_message(m) for m in req.messages]
        if plan.mode is not None:
            kwargs["tools"] = _tool_dicts(req)
    elif req.tools or any(m.role == "tool" or m.tool_calls for m in req.messages):
        messages = _generic_messages(req, plan)
    else:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        if "tools" not in kwargs:  # a system prompt the template has no role for is folded into the first user turn
            return render_chat(tokenizer, messages)
        return tokenizer.apply_chat_template(messages, **kwargs)
    except jinja2.TemplateError as exc:  # the template's own raise_exception("...") messages
        raise errors.invalid_request(
            f"The messages do not fit the model's chat template: {exc}", param="messages"
        ) from None


async def forced_call_grammar(
    req: ChatCompletionRequest, plan: ToolPlan, tokenizer: Any, structured: "StructuredOutputs"
) -> "Grammar | None":
    """The grammar of a "required" or named tool choice (None otherwise)."""
    if plan.mode is None or plan.mode == "auto":
        return None
    functions = []
    for i, t in enumerate(req.tools or []):
        if plan.mode != "required" and t.function.name != plan.mode:
            continue
        params = t.function.parameters if t.function.parameters is not None else NO_PARAMETERS
        check_schema(params, f"tools.[{i}].function.parameters")
        functions.append((t.function.name, params))
    marker = plan.syntax.start_markers[0]
    marker_is_token = marker in plan.marker_ids.values()
    structure = plan.syntax.structure(functions, plan.parallel and plan.mode == "required", marker_is_token)
    return await structured.compile(lambda g: g.structural_tag(structure, f"tool call ({plan.mode})"), "tools")


def response_calls(calls: list[Call]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def finish_reason(engine_reason: str | None, calls: list[Call]) -> str | None:
    """OpenAI's finish_reason: "tool_calls" when the model stopped after calling tools."""
    return "tool_calls" if calls and engine_reason == "stop" else engine_reason
