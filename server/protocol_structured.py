"""OpenAI's schemas for structured outputs and tool calls: `response_format`, `tools`, `tool_choice`,
tool calls in assistant messages (history and responses) and their streamed deltas."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- response_format -------------------------------------------------------------------------


class JsonSchemaSpec(_Request):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    json_schema: dict[str, Any] | bool | None = Field(None, alias="schema")  # `schema` shadows a BaseModel name
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
        return self


# ---- tools -----------------------------------------------------------------------------------


class FunctionDefinition(_Request):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Request):
    name: str
    arguments: str

    def arguments_object(self) -> Any:
        """The arguments as JSON (what chat templates expect), or the string itself when it is not JSON."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return self.arguments


class ToolCall(_Request):
    """A tool call of an earlier assistant turn, as the client sends it back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


# ---- responses -------------------------------------------------------------------------------


class ResponseFunctionCall(_Response):
    name: str
    arguments: str


class ResponseToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None

    @model_serializer
    def _only_set(self) -> dict[str, str]:
        return {k: v for k, v in (("name", self.name), ("arguments", self.arguments)) if v is not None}


class DeltaToolCall(_Response):
    """One streamed piece of a tool call: the first has id, type and name (arguments ""), the
    following ones only `index` and an arguments fragment."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer
    def _only_set(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
        if self.type is not None:
            out["type"] = self.type
        out["function"] = self.function.model_dump()
        return out


def check_tool_choice(tools: list[ToolDefinition] | None, choice: ToolChoice | None) -> None:
    """A named or required choice needs declared tools (raises ValueError naming the problem)."""
    names = [t.function.name for t in tools or []]
    if len(set(names)) != len(names):
        raise ValueError("tools must have distinct function names")
    if choice == "required" and not names:
        raise ValueError("tool_choice 'required' needs at least one tool in 'tools'")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise ValueError(f"tool_choice names function {choice.function.name!r}, which is not in 'tools'")
