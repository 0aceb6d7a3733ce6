"""Model output -> OpenAI tool calls, streamed: text deltas in, events out (content deltas, the start
of a call with its id and name, pieces of its JSON arguments).

Text outside a region of calls is content; a suffix that could still become a region marker, and
trailing whitespace, are held back until they are decided. A region (see tool_syntax.py) is read
with a small incremental JSON scanner that finds each call object's "name" and arguments value.

Two modes:
- incremental (the output is forced by the call grammar, so it is well formed): a call's start is
  sent as soon as its name is read, then its arguments as they arrive;
- checked (tool_choice "auto": free text): a region is sent only once it is complete and every call
  in it parses, names a declared function and has JSON arguments; otherwise its raw text is content.
Arguments are the model's own JSON text (for the Llama family, the "parameters" value).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from server.tool_syntax import ToolSyntax

log = logging.getLogger("athena.server")

_ALNUM = string.ascii_letters + string.digits
_LITERAL = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")


def new_call_id(syntax: ToolSyntax) -> str:
    if syntax.id_length is not None:
        return "".join(secrets.choice(_ALNUM) for _ in range(syntax.id_length))
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


Event = ContentDelta | CallStart | ArgumentsDelta


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""


class Malformed(ValueError):
    pass


@dataclass
class _Partial:
    """A call object as far as it has been read."""

    name: str | None = None
    arguments: str = ""  # raw JSON text of the arguments value so far
    arguments_started: bool = False
    arguments_done: bool = False
    done: bool = False  # the closing brace was read
    name_first: bool = False  # "name" came before the arguments (so arguments can stream)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _value_end(text: str, pos: int) -> int | None:
    """End index of the JSON value starting at `pos`; None when the text ends first."""
    if pos >= len(text):
        return None
    c = text[pos]
    if c == '"' or c in "{[":
        depth, in_string, escaped = 0, False, False
        for i in range(pos, len(text)):
            ch = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
                    if depth == 0:
                        return i + 1
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
                if depth < 0:
                    raise Malformed("unbalanced brackets")
        return None
    m = _LITERAL.match(text, pos)
    if m is None:
        if any(lit.startswith(text[pos:]) for lit in ("true", "false", "null")) or re.fullmatch(
            r"-?[\d.eE+-]*", text[pos:]
        ):
            return None
        raise Malformed(f"not a JSON value at {text[pos : pos + 20]!r}")
    if m.end() == len(text):
        return None  # a number may still grow
    return m.end()


def _read_call(text: str, pos: int, arguments_key: str) -> tuple[_Partial, int | None]:
    """The call object at `pos` (after whitespace): its partial state and its end (None if incomplete)."""
    call = _Partial()
    if pos >= len(text):
        return call, None
    if text[pos] != "{":
        raise Malformed(f"expected a call object at {text[pos : pos + 20]!r}")
    pos += 1
    keys = ("arguments", arguments_key)
    while True:
        pos = _skip_ws(text, pos)
        if pos >= len(text):
            return call, None
        if text[pos] == "}":
            call.done = True
            return call, pos + 1
        key_end = _value_end(text, pos)
        if key_end is None:
            return call, None
        if text[pos] != '"':
            raise Malformed("object keys must be strings")
        key = json.loads(text[pos:key_end])
        pos = _skip_ws(text, key_end)
        if pos >= len(text):
            return call, None
        if text[pos] != ":":
            raise Malformed("expected ':' after a key")
        pos = _skip_ws(text, pos + 1)
        if pos >= len(text):
            return call, None
        end = _value_end(text, pos)
        raw = text[pos:] if end is None else text[pos:end]
        if key == "name":
            if end is None:
                return call, None
            name = json.loads(raw)
            if not isinstance(name, str):
                raise Malformed("the name must be a string")
            call.name = name
        elif key in keys:
            call.arguments, call.arguments_started = raw, True
            call.name_first = call.name is not None
            call.arguments_done = end is not None
        if end is None:
            return call, None
        pos = _skip_ws(text, end)
        if pos >= len(text):
            return call, None
        if text[pos] == ",":
            pos += 1
        elif text[pos] != "}":
            raise Malformed("expected ',' or '}' in a call object")


def read_region(syntax: ToolSyntax, body: str) -> tuple[list[_Partial], bool]:
    """The calls of a region's text so far and whether the region is complete (raises Malformed)."""
    calls: list[_Partial] = []
    pos = _skip_ws(body, 0)
    if syntax.name == "mistral":
        if pos >= len(body):
            return calls, False
        if body[pos] != "[":
            raise Malformed("expected '[' after [TOOL_CALLS]")
        pos = _skip_ws(body, pos + 1)
    separator = {"hermes": None, "llama3_json": ";", "mistral": ","}[syntax.name]
    while True:
        call, end = _read_call(body, pos, syntax.arguments_key)
        if end is None:
            if call.name is not None or call.arguments_started or pos < len(body):
                calls.append(call)
            return calls, False
        calls.append(call)
        pos = _skip_ws(body, end)
        if syntax.name == "mistral" and pos < len(body) and body[pos] == "]":
            pos = _skip_ws(body, pos + 1)
            if pos < len(body):
                raise Malformed("text after the call list")
            return calls, True
        if pos >= len(body):
            return calls, syntax.name != "mistral"
        if separator is None or body[pos] != separator:
            raise Malformed(f"unexpected {body[pos : pos + 20]!r} after a call")
        pos = _skip_ws(body, pos + 1)


def _arguments_text(raw: str) -> str:
    """Arguments as a JSON text: a JSON string holding JSON (some models quote them) is unwrapped."""
    value = json.loads(raw)
    if isinstance(value, str):
        json.loads(value)
        return value
    return raw


@dataclass
class ToolCallParser:
    syntax: ToolSyntax
    functions: frozenset[str]
    incremental: bool
    max_calls: int | None = None  # 1 when parallel_tool_calls is false
    marker_ids: dict[int, str] = field(default_factory=dict)
    new_id: Callable[[ToolSyntax], str] = new_call_id
    calls: list[Call] = field(default_factory=list)
    content: str = ""

    def __post_init__(self) -> None:
        self._text = ""  # undecided text outside a region
        self._region: str | None = None  # region body so far (None: outside a region)
        self._marker = ""  # the marker that opened the region ("" for a bare start)
        self._seen_text = False  # any non-whitespace output yet (bare starts only at the beginning)
        self._region_calls: list[int | None] = []  # incremental: each region call's index in `calls` (None: dropped)
        self._streamed: list[int] = []  # incremental: arguments characters sent per region call
        self._dropped = 0

    # -- input ---------------------------------------------------------------------------------
    def feed(self, text: str, token_ids: tuple[int, ...] = ()) -> list[Event]:
        markers = [self.marker_ids[t] for t in token_ids if t in self.marker_ids]
        starts = "".join(m for m in markers if m in self.syntax.start_markers)
        ends = "".join(m for m in markers if m == self.syntax.end_marker)
        return self._consume(starts + text + ends)

    def finish(self) -> list[Event]:
        """The output ended: decide what is still held back."""
        events: list[Event] = []
        if self._region is not None:
            events += self._close_region(at_end=True)
        if self._text and not self.calls:
            events += self._content(self._text)
        elif self._text.strip():
            events += self._content(self._text)
        self._text = ""
        if self._dropped:
            log.info("parallel_tool_calls is false: kept the first call, dropped %d", self._dropped)
        return events

    # -- text outside regions ----------------------------------------------------------------------
    def _consume(self, text: str) -> list[Event]:
        events: list[Event] = []
        while text:
            if self._region is not None:
                text = self._extend_region(text, events)
                continue
            self._text += text
            text = ""
            found = [(self._text.find(m), m) for m in self.syntax.start_markers if m in self._text]
            bare = self.syntax.bare_start
            if not found and not self._seen_text and bare is not None:
                stripped = self._text.lstrip()
                if not stripped or any(m.startswith(stripped) for m in self.syntax.start_markers):
                    return events  # undecided: only whitespace, or the beginning of a marker
                self._seen_text = True
                if stripped[0] == bare:
                    self._text, self._region, self._marker = "", "", ""
                    text = stripped
                    continue
            self._seen_text = self._seen_text or bool(self._text.strip())
            if found:
                i, marker = min(found)
                events += self._content(self._text[:i].rstrip())
                text = self._text[i + len(marker) :]
                self._text, self._region, self._marker = "", "", marker
                continue
            keep = self._held_suffix(self._text)
            send = self._text[: len(self._text) - keep]
            stripped = send.rstrip()
            events += self._content(stripped)
            self._text = self._text[len(stripped) :]
        return events

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a start marker."""
        best = 0
        for marker in self.syntax.start_markers:
            for k in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:k]):
                    best = max(best, k)
                    break
        return best

    def _content(self, text: str) -> list[Event]:
        if not text:
            return []
        self.content += text
        return [ContentDelta(text)]

    # -- regions ---------------------------------------------------------------------------------
    def _extend_region(self, text: str, events: list[Event]) -> str:
        """Adds text to the open region; returns the text left after the region closes."""
        assert self._region is not None
        self._region += text
        end = self.syntax.end_marker
        if end is not None and end in self._region:
            body, _, rest = self._region.partition(end)
            self._region = body
            events += self._close_region(at_end=False)
            return rest
        if self.incremental:
            events += self._stream_region()
        return ""

    def _stream_region(self) -> list[Event]:
        """Incremental mode: starts and argument pieces of the calls read so far."""
        assert self._region is not None
        try:
            partials, _ = read_region(self.syntax, self._region)
        except Malformed as exc:  # cannot happen under the call grammar; keep the raw text
            log.error("forced tool call did not parse (%s): %r", exc, self._region[:200])
            return []
        events: list[Event] = []
        for k, p in enumerate(partials):
            if k == len(self._region_calls):
                if p.name is None or not (p.name_first or p.done):
                    break  # arguments stream only once the name is known
                started = self._start(p.name)
                events += started
                self._region_calls.append(len(self.calls) - 1 if started else None)
                self._streamed.append(0)
            index = self._region_calls[k]
            piece = p.arguments[self._streamed[k] :]
            if index is None or not piece:
                continue
            self._streamed[k] += len(piece)
            self.calls[index].arguments += piece
            events.append(ArgumentsDelta(index, piece))
        return events

    def _start(self, name: str) -> list[Event]:
        """A new call (its start event), or nothing when the call limit is reached."""
        if self.max_calls is not None and len(self.calls) >= self.max_calls:
            self._dropped += 1
            return []
        call = Call(self.new_id(self.syntax), name)
        self.calls.append(call)
        return [CallStart(len(self.calls) - 1, call.id, name)]

    def _close_region(self, at_end: bool) -> list[Event]:
        body, marker = self._region or "", self._marker
        self._region, self._marker = None, ""
        end = "" if at_end or self.syntax.end_marker is None else self.syntax.end_marker
        if self.incremental:
            self._region = body
            events = self._stream_region()
            self._region, self._region_calls, self._streamed = None, [], []
            return events
        try:
            partials, complete = read_region(self.syntax, body)
            if not complete and not (at_end and partials and all(p.done for p in partials)):
                raise Malformed("incomplete")
            checked = []
            for p in partials:
                if p.name not in self.functions:
                    raise Malformed(f"undeclared function {p.name!r}")
                checked.append((p.name, _arguments_text(p.arguments) if p.arguments_started else "{}"))
        except (Malformed, ValueError) as exc:
            log.info(
                "model output looked like a %s tool call but is not one (%s); returned as content",
                self.syntax.name,
                exc,
            )
            return self._content(marker + body + end)
        events: list[Event] = []
        for name, arguments in checked:
            started = self._start(name)
            if started:
                self.calls[-1].arguments = arguments
                events += started + [ArgumentsDelta(len(self.calls) - 1, arguments)]
        return events
