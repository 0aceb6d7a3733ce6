"""Incremental detokenization and stop strings: the text a request streams, one token at a time.

Detokenization decodes a small window of recent tokens and emits what it adds to the window's
previous text (vLLM's prefix/read offsets): merged pieces and leading spaces come out as a full
decode would give them, and text ending in U+FFFD (a multi-byte character whose remaining bytes
are in tokens not sampled yet) is held until the character is complete. The window's prefix text is
decoded once per window, not once per token; `decode` is a `TokenDecoder`'s (token_decoder.py).

Stop strings: the text's tail that could still grow into a stop string is held back; what is
emitted is never retracted. When a stop string appears, the text before it is emitted and the
stop string (and anything after it) is dropped.
"""

from __future__ import annotations

from collections.abc import Callable

_PROMPT_CONTEXT = 5  # prompt tokens decoded ahead of the output, so the first token's spacing is right


class IncrementalDetokenizer:
    """decode: token ids -> text, as `tokenizer.decode(ids, skip_special_tokens=True,
    clean_up_tokenization_spaces=False)` (a `TokenDecoder`'s `decode`)."""

    def __init__(self, decode: Callable[[list[int]], str], prompt_token_ids: list[int]) -> None:
        self.decode = decode
        self.ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0  # window start
        self.read_offset = len(self.ids)  # tokens before this are already turned into text
        self.prefix_text: str | None = None  # decode(ids[prefix_offset:read_offset]), once per window

    def add(self, token_id: int) -> str:
        """Append a token; return the new complete text (possibly "")."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still pending (an incomplete character at the end of the output)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self.prefix_text
        if prefix_text is None:
            prefix_text = self.prefix_text = self.decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self.decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and (final or not full_text.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.prefix_text = None
            return full_text[len(prefix_text) :]
        return ""


class StopStringMatcher:
    """Holds back text that might still become one of `stops`."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.pending = ""  # received, not yet emitted

    def add(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        searched_from = max(0, len(self.pending) - self.max_len + 1)
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s, searched_from) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = self._held_length()
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out, False

    def _held_length(self) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of some stop string."""
        for n in range(min(self.max_len - 1, len(self.pending)), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """One request's output text: tokens in, (text delta, stop string hit) out."""

    def __init__(
        self, decode: Callable[[list[int]], str], prompt_token_ids: list[int], stops: tuple[str, ...] = ()
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(decode, prompt_token_ids)
        self.matcher = StopStringMatcher(stops)

    def add(self, token_id: int) -> tuple[str, bool]:
        return self.matcher.add(self.detokenizer.add(token_id))

    def flush(self) -> str:
        """Everything held back, for a request that ends without a stop string."""
        text, hit = self.matcher.add(self.detokenizer.flush())
        return text if hit else text + self.matcher.flush()
