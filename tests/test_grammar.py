"""Grammar-constrained decoding through the engine (fake runner: random logits, so the grammar alone
keeps the output valid) with xgrammar on a tiny byte-level tokenizer."""

from __future__ import annotations

import json
from functools import lru_cache

import jsonschema
import pytest
import torch
from fake_runner import FakeRunner, drain, joined, tiny_tokenizer

from athena_runtime.engine import EngineCore
from athena_runtime.engine_settings import EngineSettings
from athena_runtime.grammar import Grammars
from athena_runtime.sampling_params import SamplingParams
from athena_runtime.token_masks import unpack_bitmask

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["color", "n", "tags"],
    "additionalProperties": False,
}


@lru_cache(maxsize=1)
def grammars() -> Grammars:
    tok = tiny_tokenizer()
    return Grammars(tok, [tok.eos_token_id], mask_threads=1)


def _core(num_blocks: int = 64, max_num_seqs: int = 8) -> EngineCore:
    tok = tiny_tokenizer()
    return EngineCore(
        FakeRunner(vocab_size=len(tok), num_blocks=num_blocks),
        tok,
        EngineSettings(device="cpu", max_num_seqs=max_num_seqs, num_blocks=num_blocks),
        eos_token_ids=(tok.eos_token_id,),
    )


def _prompt(i: int = 0) -> list[int]:
    return tiny_tokenizer().encode(f"Hello there {i}")


def test_schema_outputs_parse_validate_and_end_when_the_grammar_completes():
    grammar = grammars().json_schema(SCHEMA)
    core = _core()
    for i in range(6):
        core.add_request(
            f"c{i}",
            _prompt(i),
            SamplingParams(temperature=(0.0, 0.7, 1.5)[i % 3], seed=i, max_tokens=200, constraint=grammar),
        )
    core.add_request("free", _prompt(9), SamplingParams(temperature=1.0, seed=5, max_tokens=30))
    outs = drain(core)
    eos = tiny_tokenizer().eos_token_id
    for i in range(6):
        ids, text, finish = joined(outs[f"c{i}"])
        assert finish == "stop" and ids[-1] != eos, text  # ended by the grammar, no eos step
        jsonschema.validate(json.loads(text), SCHEMA)
        assert text.endswith("]}")
    solo = _core()
    solo.add_request("free", _prompt(9), SamplingParams(temperature=1.0, seed=5, max_tokens=30))
    assert joined(drain(solo)["free"]) == joined(outs["free"])  # the unconstrained row is not disturbed


def test_a_value_that_may_grow_ends_at_eos_or_its_bound():
    grammar = grammars().json_schema({"type": "integer", "minimum": 0, "maximum": 5000})
    core = _core()
    for i in range(8):
        core.add_request(
            f"i{i}", _prompt(i), SamplingParams(temperature=1.0, seed=i, max_tokens=20, constraint=grammar)
        )
    for rid, outs in drain(core).items():
        ids, text, finish = joined(outs)
        assert finish == "stop" and 0 <= int(text) <= 5000, (rid, text)


def test_json_object_mode_gives_an_object():
    grammar = grammars().json_object()
    core = _core()
    closers = tuple((tiny_tokenizer().convert_tokens_to_ids(c), 6.0) for c in ('"', "}"))  # random walks end sooner
    for i in range(4):
        core.add_request(
            f"o{i}",
            _prompt(i),
            SamplingParams(temperature=1.0, seed=i, max_tokens=200, constraint=grammar, logit_bias=closers),
        )
    for outs in drain(core).values():
        ids, text, finish = joined(outs)
        assert finish == "stop" and isinstance(json.loads(text), dict), text


def test_prefetched_and_inline_masks_give_the_same_outputs():
    grammar = grammars().json_schema(SCHEMA)

    def run(prefetch: bool):
        core = _core()
        if not prefetch:
            core.sampler.prepare = lambda rows: None
        for i in range(5):
            core.add_request(
                f"r{i}",
                _prompt(i),
                SamplingParams(temperature=1.0, seed=i, max_tokens=200, constraint=grammar if i % 2 == 0 else None),
            )
        return {rid: joined(o) for rid, o in drain(core).items()}

    assert run(True) == run(False)


def test_preempted_constrained_requests_resume_their_grammar():
    grammar = grammars().json_schema(SCHEMA)
    core = _core(num_blocks=24, max_num_seqs=6)
    for i in range(6):
        core.add_request(
            f"p{i}", _prompt(i), SamplingParams(temperature=1.0, seed=i, max_tokens=60, constraint=grammar)
        )
    outs = drain(core)
    assert core.scheduler.num_preemptions > 0
    for o in outs.values():
        ids, text, finish = joined(o)
        if finish == "stop":
            jsonschema.validate(json.loads(text), SCHEMA)
        else:
            assert finish == "length"


def test_masks_ban_raw_control_characters_in_json_but_tool_tags_keep_newlines():
    g = grammars()
    tok = tiny_tokenizer()
    pieces = g.info.decoded_vocab
    bad = [i for i, p in enumerate(pieces) if any(b < 0x20 for b in p)]
    newline = [i for i, p in enumerate(pieces) if p == b"\n"]
    assert bad and newline
    json_ok = unpack_bitmask(g.no_controls[None], len(tok))[0]
    tags_ok = unpack_bitmask(g.no_controls_but_newline[None], len(tok))[0]
    assert not json_ok[bad].any() and tags_ok[newline].all() and json_ok[tok.eos_token_id]
    state = g.json_schema(
        {"type": "object", "properties": {"s": {"type": "string", "maxLength": 8}}, "required": ["s"]}
    ).new()
    for t in tok.encode('{"s": "'):
        assert state.accept(t)
    row = torch.zeros(1, g.no_controls.shape[0], dtype=torch.int32)
    type(state).fill_bitmasks([state], row)
    allowed = unpack_bitmask(row, len(tok))[0]
    assert allowed.any() and not allowed[bad].any()


def test_out_of_vocabulary_logit_bias_is_refused_up_front():
    core = _core()
    with pytest.raises(ValueError, match="vocabulary"):
        core.add_request("b", _prompt(), SamplingParams(logit_bias=((len(tiny_tokenizer()) + 5, 1.0),)))
    assert not core.has_work()
