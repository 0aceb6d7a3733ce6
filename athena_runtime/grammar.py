"""Grammar-constrained decoding with xgrammar: compile a JSON Schema (or a tool-call structure) once
per request, then one matcher per sequence gives the allowed next tokens as a bitmask row.

Why xgrammar (measured with `python -m bench.diag.grammar_libs`, 2-core CPU shared with other jobs,
SmolLM2's 49152-token vocabulary, 64 streams, one mask thread, 2026-12-07 at commit 762d6eb):
- mask cost per step for 64 streams following their schemas: xgrammar 0.2.9 median 0.45 ms (p90 4.4),
  llguidance 1.9.1 12.6 ms (p90 23.3), outlines-core 0.2.14 4.8 ms (p90 12.2); on random walks that
  dwell inside free strings (the expensive state) 1.0 / 16.8 / 17.0 ms median;
- schema coverage (23 cases: nested objects, arrays with min/max items, enums, const, required and
  optional properties, integer/number bounds, multipleOf, string lengths, patterns, formats, $ref
  and recursion, anyOf / oneOf / allOf, prefixItems, additionalProperties maps, minProperties):
  xgrammar enforces all but `uniqueItems` and `not` (which it silently ignores, so the server's
  schema check refuses them, see server/structured.py); llguidance refuses those two and if/then;
  outlines-core does not enforce number bounds or multipleOf and compiles each schema in 0.1-3 s
  (xgrammar: 1-140 ms, cached per schema).
- it compiles OpenAI-style tool-call structures (tags around per-function argument schemas, "at
  least one", "stop after the first") as structural tags, which tools.py uses for `required` and
  named tool choices.
Everything here works offline: the vocabulary comes from the tokenizer object already loaded.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from athena_runtime.token_masks import bitmask_words, pack_bitmask, unpack_bitmask

log = logging.getLogger(__name__)


def default_mask_threads() -> int:
    """Threads for filling a step's masks: half the cores, at most 8 (the step thread and the HTTP
    server need the rest)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class Grammars:
    """The compiler for one tokenizer (builds xgrammar's vocabulary table once, ~0.5-4 s for 49k
    tokens) with a cache of compiled grammars, and the shared batch mask filler."""

    def __init__(self, tokenizer: Any, stop_token_ids: Iterable[int], mask_threads: int | None = None) -> None:
        import xgrammar as xgr

        self.stop_token_ids = tuple(sorted(set(stop_token_ids)))
        self.vocab_size = len(tokenizer)
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.vocab_size, stop_token_ids=list(self.stop_token_ids) or None
        )
        threads = mask_threads or default_mask_threads()
        self.compiler = xgr.GrammarCompiler(
            self.info, max_threads=threads, cache_enabled=True, cache_limit_bytes=256 << 20
        )
        self.filler = xgr.BatchGrammarMatcher(max_threads=threads)
        # Raw control characters (bytes < 0x20) are never valid JSON text outside whitespace, which the
        # JSON grammars here do not allow, but xgrammar's length-bounded strings accept them
        # (`[^"\\\r\n]`): every JSON grammar's mask is ANDed with "no token holding such a byte";
        # tool-call structures keep "\n" (their tags contain it; xgrammar's strings exclude it).
        self.no_controls = self._without_bytes(set(range(0x20)))
        self.no_controls_but_newline = self._without_bytes(set(range(0x20)) - {0x0A})
        log.info(
            "grammars: xgrammar, %d-token vocabulary, stop tokens %s, %d mask thread(s)",
            self.vocab_size,
            list(self.stop_token_ids),
            threads,
        )

    def _without_bytes(self, banned: set[int]) -> torch.Tensor:
        """int32 words [W]: every token whose text holds none of the `banned` bytes (special and stop
        tokens, whose decoded text is their name, stay allowed)."""
        allowed = torch.tensor([not (banned & set(piece)) for piece in self.info.decoded_vocab], dtype=torch.bool)
        return pack_bitmask(allowed[: self.vocab_size])

    def json_schema(self, schema: dict[str, Any], description: str = "json_schema") -> "Grammar":
        """A JSON value valid under `schema`, on one line with ', ' and ': ' separators; properties in
        the schema's order; no properties or items beyond those the schema names (strict mode)."""
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
        return Grammar(compiled, self, self.no_controls, description)

    def json_object(self) -> "Grammar":
        """Any JSON object (OpenAI's json_object mode), on one line."""
        compiled = self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        return Grammar(compiled, self, self.no_controls, "json_object")

    def structural_tag(self, structure: dict[str, Any], description: str = "structural_tag") -> "Grammar":
        """xgrammar's structural-tag format (`{"type": "structural_tag", "format": {...}}`)."""
        compiled = self.compiler.compile_structural_tag(json.dumps(structure))
        return Grammar(compiled, self, self.no_controls_but_newline, description)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity (it holds a tensor and library objects)
class Grammar:
    """A compiled grammar: what a request's `SamplingParams.constraint` holds (a ConstraintFactory)."""

    compiled: Any
    grammars: Grammars = field(repr=False)
    byte_mask: torch.Tensor = field(repr=False)  # int32 words [W] ANDed with every mask (see Grammars)
    description: str = "grammar"

    def new(self) -> "GrammarState":
        return GrammarState(self)


class GrammarState:
    """One sequence's matcher (a TokenConstraint)."""

    def __init__(self, grammar: Grammar) -> None:
        import xgrammar as xgr

        self.grammar = grammar
        self.vocab_size = grammar.grammars.vocab_size
        self.matcher = xgr.GrammarMatcher(grammar.compiled)

    def accept(self, token_id: int) -> bool:
        return bool(self.matcher.accept_token(token_id))

    def is_finished(self) -> bool:
        """Terminated, or complete with nothing but a stop token allowed next (e.g. after the closing
        brace of a JSON object; a number that may still grow is not finished)."""
        m = self.matcher
        if m.is_terminated():
            return True
        if not m.is_completed():
            return False
        row = torch.empty(1, bitmask_words(self.vocab_size), dtype=torch.int32)
        m.fill_next_token_bitmask(row)
        row &= self.grammar.byte_mask
        allowed = unpack_bitmask(row, self.vocab_size)[0]
        allowed[[t for t in self.grammar.grammars.stop_token_ids if t < self.vocab_size]] = False
        return not bool(allowed.any())

    @classmethod
    def fill_bitmasks(cls, states: Sequence["GrammarState"], bitmask: torch.Tensor) -> None:
        states[0].grammar.grammars.filler.batch_fill_next_token_bitmask([s.matcher for s in states], bitmask)
        masks = {id(s.grammar.byte_mask): s.grammar.byte_mask for s in states}
        if len(masks) == 1:
            bitmask[: len(states)] &= next(iter(masks.values()))
        else:
            bitmask[: len(states)] &= torch.stack([s.grammar.byte_mask for s in states])
