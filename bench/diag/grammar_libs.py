"""Which grammar library for structured outputs: JSON-Schema coverage and token-mask cost at 64 streams,
with the embedded model's tokenizer (SmolLM2, 49152 tokens), for each library that is installed
(xgrammar, llguidance, outlines-core; missing ones are skipped and said so).

    python -m bench.diag.grammar_libs [--streams 64] [--threads 1] [--libs xgrammar,llguidance,outlines]

Coverage: each schema of `CASES` must accept a valid instance (tokenized as the library's compact
one-line JSON, `", "` and `": "` separators) and reject the listed invalid ones. Cost: `--streams`
matchers over a mix of schemas, (a) walking valid instances token by token (what a model that follows
the schema produces) and (b) random walks (a uniformly random allowed token each step, which spends
long stretches inside free strings, the expensive state): median / p90 / max milliseconds to fill
all masks of one step, and to accept one token per stream.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_OBJ = "object"
# name -> (schema, valid instance, invalid instances)
CASES: dict[str, tuple[dict, Any, list]] = {
    "nested": (
        {
            "type": _OBJ,
            "properties": {
                "name": {"type": "string"},
                "address": {
                    "type": _OBJ,
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
        {"name": "Ada", "address": {"city": "Paris", "zip": "75001"}},
        [{"name": "A"}],
    ),
    "array": (
        {
            "type": _OBJ,
            "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4}},
            "required": ["tags"],
        },
        {"tags": ["a", "bc"]},
        [{"tags": []}, {"tags": ["a", "b", "c", "d", "e"]}],
    ),
    "enum": (
        {"type": _OBJ, "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
        {"color": "green"},
        [{"color": "pink"}],
    ),
    "bounds": (
        {
            "type": _OBJ,
            "properties": {
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            },
            "required": ["age", "score"],
        },
        {"age": 42, "score": 0.5},
        [{"age": 121, "score": 0.5}, {"age": 4, "score": 0}],
    ),
    "ref": (
        {
            "$defs": {
                "pt": {
                    "type": _OBJ,
                    "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                    "required": ["x", "y"],
                }
            },
            "type": _OBJ,
            "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
            "required": ["a", "b"],
        },
        {"a": {"x": 1, "y": 2}, "b": {"x": 3.5, "y": -1}},
        [],
    ),
    "anyOf": (
        {
            "type": _OBJ,
            "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]}},
            "required": ["v"],
        },
        {"v": "hi"},
        [],
    ),
    "strlen": (
        {
            "type": _OBJ,
            "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 5}},
            "required": ["code"],
        },
        {"code": "abcd"},
        [{"code": "ab"}, {"code": "abcdef"}],
    ),
    "pattern": (
        {
            "type": _OBJ,
            "properties": {"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}},
            "required": ["phone"],
        },
        {"phone": "555-1234"},
        [{"phone": "5551234"}],
    ),
    "const": ({"type": _OBJ, "properties": {"kind": {"const": "point"}}, "required": ["kind"]}, {"kind": "point"}, []),
    "oneOf": (
        {
            "oneOf": [
                {
                    "type": _OBJ,
                    "properties": {"a": {"type": "integer"}},
                    "required": ["a"],
                    "additionalProperties": False,
                },
                {
                    "type": _OBJ,
                    "properties": {"b": {"type": "string"}},
                    "required": ["b"],
                    "additionalProperties": False,
                },
            ]
        },
        {"b": "x"},
        [],
    ),
    "allOf": (
        {
            "allOf": [
                {"type": _OBJ, "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": _OBJ, "properties": {"b": {"type": "string"}}, "required": ["b"]},
            ]
        },
        {"a": 1, "b": "x"},
        [],
    ),
    "format_date": (
        {"type": _OBJ, "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"]},
        {"d": "2024-01-31"},
        [{"d": "hello"}],
    ),
    "format_email": (
        {"type": _OBJ, "properties": {"e": {"type": "string", "format": "email"}}, "required": ["e"]},
        {"e": "a@b.co"},
        [],
    ),
    "recursive": (
        {
            "$defs": {
                "node": {
                    "type": _OBJ,
                    "properties": {
                        "v": {"type": "integer"},
                        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["v", "kids"],
                }
            },
            "$ref": "#/$defs/node",
        },
        {"v": 1, "kids": [{"v": 2, "kids": []}]},
        [],
    ),
    "multipleOf": (
        {"type": _OBJ, "properties": {"n": {"type": "integer", "multipleOf": 5}}, "required": ["n"]},
        {"n": 15},
        [{"n": 7}],
    ),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [[1, 1]]),
    "map": ({"type": _OBJ, "additionalProperties": {"type": "integer"}}, {"x": 1}, [{"x": "s"}]),
    "optional": (
        {"type": _OBJ, "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]},
        {"a": 1},
        [{"b": "x"}],
    ),
    "not": (
        {"type": _OBJ, "properties": {"a": {"not": {"type": "string"}}}, "required": ["a"]},
        {"a": 1},
        [{"a": "s"}],
    ),
    "if_then": (
        {
            "type": _OBJ,
            "properties": {"a": {"type": "integer"}},
            "if": {"properties": {"a": {"const": 1}}},
            "then": {"required": ["a"]},
        },
        {"a": 1},
        [],
    ),
    "prefixItems": (
        {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
        [1, "a"],
        [],
    ),
    "minProperties": ({"type": _OBJ, "additionalProperties": {"type": "integer"}, "minProperties": 1}, {"a": 1}, [{}]),
    "type_list": (
        {"type": _OBJ, "properties": {"a": {"type": ["integer", "null"]}}, "required": ["a"]},
        {"a": None},
        [],
    ),
}
COST_MIX = [
    "nested",
    "array",
    "enum",
    "bounds",
    "ref",
    "anyOf",
    "strlen",
    "optional",
    "recursive",
    "format_date",
    "oneOf",
    "map",
]


@dataclass
class Lib:
    """One library behind the same five calls."""

    name: str
    compile: Callable[[dict], Any]  # schema -> compiled grammar (raises on what it refuses)
    matcher: Callable[[Any], Any]  # compiled -> fresh matcher
    accept: Callable[[Any, int], bool]
    complete: Callable[[Any], bool]  # the text so far is a whole instance
    fill: Callable[[list, torch.Tensor], None]  # matchers -> int32 bitmask rows 0..len-1


def _xgrammar(tok, vocab: int, threads: int) -> Lib:
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab), max_threads=threads)
    batch = xgr.BatchGrammarMatcher(max_threads=threads)
    return Lib(
        "xgrammar " + importlib.metadata.version("xgrammar"),
        lambda s: compiler.compile_json_schema(json.dumps(s), any_whitespace=False, strict_mode=True),
        xgr.GrammarMatcher,
        lambda m, t: m.accept_token(t),
        lambda m: m.is_completed(),
        lambda ms, bm: batch.batch_fill_next_token_bitmask(ms, bm),
    )


def _llguidance(tok, vocab: int, threads: int) -> Lib:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    executor = llguidance.LLExecutor(num_threads=threads)
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def compile(schema):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
        if is_error or messages:  # warnings name unimplemented keywords: the grammar would ignore them
            raise ValueError("; ".join(messages))
        return grammar

    def fill(ms, bm):
        llguidance.torch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(ms)], bm)

    return Lib(
        "llguidance",
        compile,
        lambda g: llguidance.LLMatcher(lltok, g),
        lambda m, t: m.consume_token(t) and not m.is_error(),
        lambda m: m.is_accepting(),
        fill,
    )


def _outlines(tok, vocab: int, threads: int) -> Lib:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    from athena_runtime.token_decoder import bytes_to_unicode

    char_bytes = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tok.all_special_ids)
    pieces: dict[bytes, list[int]] = {}
    for text, i in tok.get_vocab().items():
        if i not in special and all(c in char_bytes for c in text):
            pieces.setdefault(bytes(char_bytes[c] for c in text), []).append(i)
    vocabulary = Vocabulary(tok.eos_token_id, pieces)

    def fill(ms, bm):
        for i, m in enumerate(ms):
            m.write_mask_into(bm[i].data_ptr(), bm[i].numel(), 4)

    def accept(m, t):
        try:
            m.advance(t, return_tokens=False)
            return True
        except ValueError:
            return False

    return Lib(
        "outlines-core",
        lambda s: Index(build_regex_from_schema(json.dumps(s)), vocabulary),
        Guide,
        accept,
        lambda m: m.is_finished(),
        fill,
    )


LIBS = {
    "xgrammar": ("xgrammar", _xgrammar),
    "llguidance": ("llguidance", _llguidance),
    "outlines": ("outlines_core", _outlines),
}


def _tokens(tok, instance) -> list[int]:
    return tok.encode(json.dumps(instance), add_special_tokens=False)


def _walks(tok, lib: Lib, instance: Any, compiled: Any) -> bool:
    """True when the matcher takes every token of `instance` and ends complete."""
    m = lib.matcher(compiled)
    return all(lib.accept(m, t) for t in _tokens(tok, instance)) and lib.complete(m)


def coverage(tok, lib: Lib) -> dict[str, Any]:
    compiled, rows = {}, []
    for name, (schema, good, bads) in CASES.items():
        t0 = time.perf_counter()
        try:
            c = lib.compile(schema)
            if not _walks(tok, lib, good, c):
                raise ValueError("a valid instance was rejected")
        except Exception as exc:  # noqa: BLE001 - what the library says is the result
            rows.append((name, "refused", str(exc).splitlines()[0][:100]))
            continue
        ms = 1e3 * (time.perf_counter() - t0)
        compiled[name] = c
        leaks = [json.dumps(b) for b in bads if _walks(tok, lib, b, c)]
        rows.append((name, "NOT ENFORCED " + " ".join(leaks) if leaks else "ok", f"{ms:.1f} ms compile+walk"))
    return {"compiled": compiled, "rows": rows}


def _stats(xs: list[float]) -> str:
    xs = sorted(xs)
    return (
        f"median {1e3 * statistics.median(xs):.2f} p90 {1e3 * xs[int(0.9 * (len(xs) - 1))]:.2f} "
        f"max {1e3 * xs[-1]:.2f} ms"
    )


def mask_cost(tok, lib: Lib, compiled: dict, streams: int, vocab: int, random_walk: bool, steps: int = 64) -> str:
    names = [n for n in COST_MIX if n in compiled]
    fresh = lambda i: lib.matcher(compiled[names[i % len(names)]])  # noqa: E731
    ms = [fresh(i) for i in range(streams)]
    scripts = [_tokens(tok, CASES[names[i % len(names)]][1]) for i in range(streams)]
    pos = [0] * streams
    bitmask = torch.zeros(streams, (vocab + 31) // 32, dtype=torch.int32)
    shifts = torch.arange(32, dtype=torch.int32)
    rng = random.Random(0)
    fills, accepts = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        lib.fill(ms, bitmask)
        fills.append(time.perf_counter() - t0)
        if random_walk:
            allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().view(streams, -1)[:, :vocab]
            picks = [rng.choice(row.nonzero().flatten().tolist() or [tok.eos_token_id]) for row in allowed]
        else:
            picks = [scripts[i][pos[i] % len(scripts[i])] for i in range(streams)]
        t0 = time.perf_counter()
        for m, t in zip(ms, picks):
            lib.accept(m, t)
        accepts.append(time.perf_counter() - t0)
        for i in range(streams):
            pos[i] += 1
            if lib.complete(ms[i]) if random_walk else pos[i] % len(scripts[i]) == 0:
                ms[i] = fresh(i)
    return f"fill {_stats(fills)}; accept {_stats(accepts)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="mask-filling threads each library may use")
    ap.add_argument("--libs", default="xgrammar,llguidance,outlines")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from quantize.embedded import reference_model_path

    tok = AutoTokenizer.from_pretrained(str(reference_model_path()))
    vocab = len(tok)
    print(f"tokenizer: SmolLM2, {vocab} tokens; {args.streams} streams; {args.threads} thread(s)")
    for key in args.libs.split(","):
        module, build = LIBS[key]
        if importlib.util.find_spec(module) is None:
            print(f"\n{key}: not installed, skipped")
            continue
        t0 = time.perf_counter()
        lib = build(tok, vocab, args.threads)
        print(f"\n{lib.name}: tokenizer set-up {time.perf_counter() - t0:.2f} s")
        cov = coverage(tok, lib)
        for name, verdict, note in cov["rows"]:
            print(f"  {name:14s} {verdict:14s} {note}")
        print(f"  covered {len(cov['compiled'])}/{len(CASES)}")
        for walk in (False, True):
            label = "random walks  " if walk else "valid outputs "
            print(f"  {label}{mask_cost(tok, lib, cov['compiled'], args.streams, vocab, walk)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
