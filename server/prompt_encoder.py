"""A request's text to token ids, off the event loop, with a cheap up-front length check.

Rendering a chat template and tokenizing cost time in proportion to the input (a 7.5 MB prompt
took 6 s to tokenize on the embedded model's tokenizer). Both run in a worker thread, so /health
and running streams keep going meanwhile (the tokenizers library lets go of the GIL while it
encodes; a template renders in Python bytecode, which the interpreter switches out of).

Text that can never fit the context is refused before any of that work, from its length alone:
no token of the vocabulary stands for more than `longest_token_chars` characters, so c characters
need at least c / longest_token_chars tokens. A tokenizer with a normalizer gets NORMALIZER_SHRINK
times more room, for normalizers that merge characters before tokenizing (NFC composes a base
letter and its combining marks into one), so the check never refuses a text that would fit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from server import errors

log = logging.getLogger("athena.server")

NORMALIZER_SHRINK = 4


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token stands for: the longest vocabulary string (a byte-level
    vocabulary spells each byte as one character, so this over-counts multi-byte text, never under)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max((len(p) for p in pieces if p), default=1)


class PromptEncoder:
    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.longest_token_chars = longest_token_chars(tokenizer)
        normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
        shrink = 1 if normalizer is None else NORMALIZER_SHRINK
        self.max_chars = max_model_len * self.longest_token_chars * shrink
        log.info(
            "prompts over %d characters are refused before tokenizing (context %d tokens x %d characters in "
            "the longest token x %d for %s)",
            self.max_chars,
            max_model_len,
            self.longest_token_chars,
            shrink,
            "no normalizer" if normalizer is None else f"the normalizer {type(normalizer).__name__}",
        )

    def check_chars(self, chars: int, param: str) -> None:
        """A 400 `context_length_exceeded` for text too long for the context, whatever its tokens."""
        if chars > self.max_chars:
            raise errors.APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, your {param} "
                f"{'are' if param.endswith('s') else 'is'} {chars} characters long, more than that many tokens "
                f"can hold. Please reduce the length of the {param}.",
                param=param,
                code="context_length_exceeded",
            )

    async def encode(self, texts: Sequence[str], param: str) -> list[list[int]]:
        """Token ids of each text (with the tokenizer's special tokens, as a completion prompt)."""
        for text in texts:
            self.check_chars(len(text), param)
        return await asyncio.to_thread(self._encode, texts)

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(self.tokenizer.encode(t, add_special_tokens=True)) for t in texts]

    async def encode_rendered(self, render: Callable[[], str], chars: int, param: str) -> list[int]:
        """Token ids of the text `render()` returns (a chat template's output, which adds the special tokens);
        rendering and tokenizing both run off the event loop. `chars`: the input's length, checked first."""
        self.check_chars(chars, param)
        return await asyncio.to_thread(self._encode_rendered, render, param)

    def _encode_rendered(self, render: Callable[[], str], param: str) -> list[int]:
        text = render()
        self.check_chars(len(text), param)
        return list(self.tokenizer.encode(text, add_special_tokens=False))
