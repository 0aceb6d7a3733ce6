"""Token ids -> text, exactly as `tokenizer.decode(ids, skip_special_tokens=True,
clean_up_tokenization_spaces=False)` gives it, at a fraction of the cost (the streaming detokenizer
decodes a window of tokens for every generated token of every request).

Three ways, the first that reproduces the tokenizer is taken (checked once, when built):
1. a byte table, for byte-level BPE vocabularies (GPT-2, SmolLM2, Llama 3, Qwen2): the `ByteLevel`
   decoder spells each byte as one printable character (GPT-2's `bytes_to_unicode`), maps every
   token's characters back to bytes (a token with a character outside that alphabet, e.g. an added
   token with a plain space, keeps its own UTF-8 bytes), joins the bytes of all tokens and decodes
   them as UTF-8 with each malformed sequence replaced by U+FFFD. Special tokens and ids outside the
   vocabulary add nothing. Here: one bytes object per id, built once; decoding is a join and one
   `bytes.decode("utf-8", "replace")`, which replaces malformed sequences the same way (Unicode's
   "maximal subpart" practice, as Rust's `from_utf8_lossy` does);
2. the Rust `tokenizers` object behind a Hugging Face fast tokenizer, called directly: the same
   function `tokenizer.decode` ends in, without its per-call Python argument handling (SentencePiece
   vocabularies such as Llama 2 / Mistral, whose decoder strips a leading space, take this path);
3. `tokenizer.decode` itself, for anything else (logged once).

The check, once per tokenizer: random single ids and id sequences (special tokens, ids past the
vocabulary, characters split across tokens) must decode to `tokenizer.decode`'s text through the
backend, and through the byte table, which must also give the backend's text for every single id.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_CHECK_SEQUENCES = 256  # random id sequences compared against the tokenizer when a decoder is built
_CHECK_LENGTH = 12


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def byte_level_pieces(backend: Any) -> list[bytes] | None:
    """bytes of each id of a `tokenizers.Tokenizer` with a ByteLevel decoder (special tokens: b""),
    or None when its decoder is something else."""
    from tokenizers import decoders

    if not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    char_bytes = {c: b for b, c in bytes_to_unicode().items()}
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    pieces = []
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        token = backend.id_to_token(i)
        if token is None or i in special:
            pieces.append(b"")
        elif all(c in char_bytes for c in token):
            pieces.append(bytes([char_bytes[c] for c in token]))
        else:
            pieces.append(token.encode("utf-8"))
    return pieces


class TokenDecoder:
    """`decode(ids)`: the text of token ids, special tokens skipped, no clean-up (see the module doc).
    `kind` says which way was taken: "byte table", "tokenizers backend" or "tokenizer.decode"."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}  # token_text cache
        self.decode: Callable[[list[int]], str] = self._reference
        self.kind = "tokenizer.decode"
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            log.info("detokenizer: %s has no tokenizers backend, using tokenizer.decode", type(tokenizer).__name__)
            return
        vocab = backend.get_vocab_size(with_added_tokens=True)
        cases = self._check_cases(vocab)
        expected = [self._reference(ids) for ids in cases]
        direct = self._backend_decode = backend.decode
        if not all(direct(ids, skip_special_tokens=True) == text for ids, text in zip(cases, expected)):
            log.warning(
                "detokenizer: %s.decode differs from its tokenizers backend; using tokenizer.decode",
                type(tokenizer).__name__,
            )
            return
        self.decode, self.kind = self._decode_backend, "tokenizers backend"
        pieces = byte_level_pieces(backend)
        if pieces is None:
            return
        self._pieces = pieces
        singles = backend.decode_batch([[i] for i in range(vocab)], skip_special_tokens=True)
        if all(self._decode_bytes([i]) == text for i, text in enumerate(singles)) and all(
            self._decode_bytes(ids) == text for ids, text in zip(cases, expected)
        ):
            self.decode, self.kind = self._decode_bytes, "byte table"
        else:
            log.warning(
                "detokenizer: the byte table does not reproduce %s; using its tokenizers backend",
                type(tokenizer).__name__,
            )

    def _reference(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _decode_backend(self, ids: list[int]) -> str:
        return self._backend_decode(ids, skip_special_tokens=True)

    def _decode_bytes(self, ids: list[int]) -> str:
        pieces = self._pieces
        try:
            data = b"".join([pieces[i] for i in ids])
        except IndexError:  # ids past the vocabulary decode to nothing
            data = b"".join([pieces[i] for i in ids if i < len(pieces)])
        return data.decode("utf-8", "replace")

    @staticmethod
    def _check_cases(vocab: int) -> list[list[int]]:
        """Random single ids and random sequences: ids, ids near the ends (special tokens usually
        sit at one end), ids past the vocabulary."""
        rng = random.Random(0)
        edges = [*range(min(vocab, 64)), *range(max(0, vocab - 64), vocab), vocab, vocab + 1000]
        cases = [[i] for i in edges] + [[rng.randrange(vocab)] for _ in range(_CHECK_SEQUENCES)]
        for _ in range(_CHECK_SEQUENCES):
            cases.append(
                [
                    rng.choice(edges) if rng.random() < 0.2 else rng.randrange(vocab)
                    for _ in range(rng.randint(2, _CHECK_LENGTH))
                ]
            )
        return cases

    def token_text(self, token_id: int) -> str:
        """One token's own text with special tokens spelled out (logprobs), cached per id."""
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode(
                [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        return text
