"""OpenAI request, response and stream-chunk schemas (the subset Athena serves) as pydantic models.

Requests ignore unknown fields, as OpenAI does; a known field we cannot honour (legacy functions,
image/audio content, ...) fails validation with a message naming it, which errors.py turns into a
400 with that `param`. Structured outputs and tool calls: protocol_structured.py.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_serializer, model_validator

from server.protocol_structured import (
    DeltaToolCall,
    ResponseFormat,
    ResponseToolCall,
    ToolCall,
    ToolChoice,
    ToolDefinition,
    check_tool_choice,
)

INT64_MAX = 2**63 - 1
MAX_STOP = 4  # OpenAI accepts at most 4 stop sequences
MAX_PROMPTS = 2048  # prompts in one completions batch


class ParameterError(ValueError):
    """Raised by a model validator: names the parameter, so the 400 can (errors.py reads `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Request(BaseModel):
    # strict: JSON types as OpenAI checks them ("10" is no integer, "yes" no boolean); an integer is a number
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _not_unicode(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate, in OpenAI's parameter spelling
    ('messages.[0].content'); None if nowhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value) if isinstance(v, (str, list, dict)))
    else:
        return None
    for key, v in items:
        where = _not_unicode(key, path) or _not_unicode(v, f"{path}.{key}" if path else str(key))
        if where is not None:
            return where
    return None


def lone_surrogate_param(body: bytes) -> str | None:
    """The parameter of a JSON body whose text holds a lone UTF-16 surrogate: JSON can spell one
    ("\\ud800") but it is no Unicode text. Only a \\u escape can spell one, so a body without
    "\\ud"/"\\uD" is passed over at the speed of a byte search; None for invalid JSON (the route
    reports that) and for bodies without one."""
    if b"\\ud" not in body and b"\\uD" not in body:
        return None
    try:
        return _not_unicode(json.loads(body))
    except (ValueError, RecursionError):
        return None


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingRequest(_Request):
    """Fields both endpoints share: the sampler's knobs, streaming, OpenAI's no-op fields."""

    model: str
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=INT64_MAX)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extras beyond OpenAI (vLLM's names).
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_bounds(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers as strings), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
        return v

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "SamplingRequest":
        if self.stream_options is not None and not self.stream:
            raise ParameterError("stream_options", "stream_options is only allowed when stream is true")
        return self

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# ---- chat ----------------------------------------------------------------------------------

_CONTENT_PART_TYPES = ("text",)
_ROLES = ("system", "developer", "user", "assistant", "tool")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: Any = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, v: str) -> str:
        if v not in _ROLES:
            raise ValueError(f"role {v!r} is not supported; use one of {', '.join(_ROLES)}")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind not in _CONTENT_PART_TYPES:
                    raise ValueError(f"content parts of type {kind!r} are not supported; only 'text'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ChatMessage":
        if self.function_call:
            raise ValueError("function_call in messages is not supported (deprecated by OpenAI); use tool_calls")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    audio: Any = None

    @model_validator(mode="after")
    def _supported(self) -> "ChatCompletionRequest":
        try:
            check_tool_choice(self.tools, self.tool_choice)
        except ValueError as exc:
            raise ParameterError("tool_choice" if self.tool_choice is not None else "tools", str(exc)) from None
        if (
            self.response_format is not None
            and self.response_format.type != "text"
            and self.tools
            and self.tool_choice != "none"
        ):
            raise ParameterError(
                "response_format",
                "a JSON response_format together with tools is not supported; "
                "set tool_choice to 'none' or leave out response_format",
            )
        if self.function_call not in (None, "none"):
            raise ParameterError(
                "function_call",
                "functions/function_call are deprecated by OpenAI and not supported; use tools and tool_choice",
            )
        if self.functions and self.function_call is None:
            raise ParameterError("functions", "functions are deprecated by OpenAI and not supported; use tools")
        if self.modalities is not None and any(m != "text" for m in self.modalities):
            raise ParameterError("modalities", "only the 'text' modality is supported")
        if self.audio is not None:
            raise ParameterError("audio", "audio output is not supported")
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ParameterError("top_logprobs", "top_logprobs needs logprobs to be true")
        return self

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_mode(self) -> str | None:
        """None (no tools, or tool_choice 'none'), 'auto', 'required', or the forced function's name."""
        if not self.tools or self.tool_choice == "none":
            return None
        if self.tool_choice is None or self.tool_choice == "auto":
            return "auto"
        if self.tool_choice == "required":
            return "required"
        return self.tool_choice.function.name


# ---- completions ---------------------------------------------------------------------------


class CompletionRequest(SamplingRequest):
    # Tried in this order (a list of token ids first): validating a long id list against list[str] first would
    # make one error per id. The before-validator refuses an over-long batch before any of it is looked at.
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]] = Field(union_mode="left_to_right")
    max_tokens: int | None = Field(16, ge=1, le=INT64_MAX)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None
    response_format: ResponseFormat | None = None  # an extra on completions (vLLM has it too)

    @field_validator("prompt", mode="before")
    @classmethod
    def _batch_size(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > MAX_PROMPTS and isinstance(v[0], (str, list)):
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or (isinstance(v[0], list) and not all(v))):  # v[0] int: token ids
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _supported(self) -> "CompletionRequest":
        if self.suffix:
            raise ParameterError("suffix", "suffix (insertion) is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ParameterError("best_of", "best_of other than n is not supported by this server")
        if self.echo and self.logprobs is not None:
            raise ParameterError("echo", "echo together with logprobs is not supported (no prompt logprobs)")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The batch: a list of strings or a list of token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return p  # type: ignore[return-value]


def finite_logprob(x: float) -> float:
    """JSON has no -inf; OpenAI sends -9999.0 for tokens the sampler ruled out."""
    return x if math.isfinite(x) else -9999.0


# ---- responses -----------------------------------------------------------------------------


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprobEntry(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(_Response):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobEntry]


class ChatLogprobs(_Response):
    content: list[TokenLogprobEntry] | None
    refusal: None = None


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ResponseToolCall] | None = None

    @model_serializer(mode="wrap")
    def _tool_calls_when_any(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        if self.tool_calls is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer
    def _only_set(self) -> dict[str, Any]:
        # OpenAI sends {"role": "assistant", "content": ""}, then {"content": "..."}, then {}.
        out: dict[str, Any] = {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}
        if self.tool_calls is not None:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    """The legacy completions format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "athena"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
