"""`athena chat`: argument parsing, prompt building, and a REPL session on the fake runner."""

from __future__ import annotations

import argparse
import asyncio
import io

import pytest
from fake_runner import FakeRunner, tiny_tokenizer

from athena_runtime.engine import AsyncEngine
from athena_runtime.engine_settings import EngineSettings
from athena_runtime.sampling_params import SamplingParams
from server import chat_cli

TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.chat_template = TEMPLATE
    return t


def engine_for(tok, max_model_len=256) -> AsyncEngine:
    runner = FakeRunner(vocab_size=len(tok), num_blocks=128, block_size=4, max_model_len=max_model_len, banned=(0,))
    return AsyncEngine(runner, tok, EngineSettings(block_size=4), "fake", eos_token_ids=(0,))


def test_register_maps_flags():
    parser = argparse.ArgumentParser()
    chat_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "chat",
            "some/dir",
            "--prompt",
            "hi",
            "--max-tokens",
            "7",
            "--temperature",
            "0",
            "--seed",
            "3",
            "--kv-cache",
            "int4",
            "--system",
            "be brief",
        ]
    )
    assert (args.model, args.prompt, args.max_tokens, args.temperature, args.seed, args.kv_cache, args.system) == (
        "some/dir",
        "hi",
        7,
        0.0,
        3,
        "int4",
        "be brief",
    )
    assert args.func is chat_cli.run
    assert parser.parse_args(["chat"]).model is None


def test_prompt_drops_oldest_turns_but_keeps_the_system_message(tok):
    history = [{"role": "system", "content": "sys"}]
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i}"}]
    history.append({"role": "user", "content": "last"})
    full = chat_cli.prompt_token_ids(tok, history, 10_000)
    assert tok.decode(full).startswith("<system>sys\n<user>question 0")
    cut = chat_cli.prompt_token_ids(tok, history, len(full) // 2)
    text = tok.decode(cut)
    assert len(cut) <= len(full) // 2 and text.startswith("<system>sys\n") and text.endswith("<user>last\n<assistant>")
    assert "question 0" not in text


def test_repl_streams_answers_and_keeps_history(tok):
    lines = iter(["Hello there", "", "/reset", "How are you", "/exit"])
    seen_prompts = []
    engine = engine_for(tok)
    generate = engine.generate

    def spy(rid, ids, params):
        seen_prompts.append(tok.decode(ids))
        return generate(rid, ids, params)

    engine.generate = spy
    out = io.StringIO()
    code = asyncio.run(
        chat_cli.chat(
            engine, SamplingParams(temperature=0.0, max_tokens=5), system="sys", read=lambda _: next(lines), out=out
        )
    )
    assert code == 0 and not engine.ready
    assert seen_prompts == [
        "<system>sys\n<user>Hello there\n<assistant>",
        "<system>sys\n<user>How are you\n<assistant>",
    ]
    assert out.getvalue().count("\n") >= 2


def test_one_shot_prompt_and_a_too_long_message(tok):
    out = io.StringIO()
    assert (
        asyncio.run(
            chat_cli.chat(engine_for(tok), SamplingParams(temperature=0.0, max_tokens=4), prompt="Hello", out=out)
        )
        == 0
    )
    assert out.getvalue().endswith("\n") and len(out.getvalue()) > 1
    code = asyncio.run(
        chat_cli.chat(
            engine_for(tok, max_model_len=16),
            SamplingParams(max_tokens=4),
            prompt="Hello there " * 10,
            out=io.StringIO(),
        )
    )
    assert code == 2
