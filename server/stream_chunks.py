"""The bytes of streamed chunks, cheaply: every token of every stream becomes one SSE event, so this
runs 64 times a step at 64 streams, on the event loop.

- `TextChunks`: the JSON of a chunk that only carries new text (the common chunk) as a template cut
  around the text, made once per stream and choice from the pydantic model itself; a chunk is then
  `head + json.dumps(text) + tail` (~2 µs) instead of building, validating and dumping the models
  (~50 µs). The same bytes as the model's `model_dump_json()` (tests/test_stream_chunks.py).
- `sse_event`: a JSON string as one server-sent event (`data: ...` and a blank line), the bytes
  sse-starlette writes for a one-line string, without its per-event line splitting.
- `merge_outputs`: consecutive outputs of one choice as one (text and tokens joined), for a stream
  whose consumer fell behind the engine: one chunk instead of several.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from athena_runtime.outputs import RequestOutput

_MARK = "@@athena-text@@"


class TextChunks:
    """`chunk(text)`: what `build(text)` gives (a chunk's JSON, built from its pydantic model, holding `text`
    once), for any text."""

    def __init__(self, build: Callable[[str], str]) -> None:
        template = build(_MARK)
        quoted = json.dumps(_MARK)
        if template.count(quoted) != 1:
            raise ValueError("the chunk template must hold the text exactly once")
        self.head, self.tail = template.split(quoted)

    def chunk(self, text: str) -> str:
        return self.head + json.dumps(text, ensure_ascii=False) + self.tail


def sse_event(data: str) -> bytes:
    """One event holding one line of data (JSON text has no raw line breaks)."""
    return b"data: " + data.encode("utf-8") + b"\n\n"


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one: `later`'s status, both texts, tokens and logprobs."""
    logprobs = (
        None if first.logprobs is None and later.logprobs is None else (first.logprobs or ()) + (later.logprobs or ())
    )
    return dataclasses.replace(
        later, text=first.text + later.text, token_ids=first.token_ids + later.token_ids, logprobs=logprobs
    )
