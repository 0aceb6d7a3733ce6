"""Sampling defaults from the model's generation_config.json: reading them, the server's and `athena chat`'s use of
them for the knobs a request leaves out, the flags over them, the GGUF import's recommended-sampling keys and the
embedded default's values."""

from __future__ import annotations

import argparse
import json
import logging

import gguf
import openai
import pytest
from fake_engine import tiny_chat_tokenizer
from fake_runner import FakeRunner
from server_fixtures import make_settings, serve_engine

from athena_runtime.engine import AsyncEngine
from athena_runtime.engine_settings import EngineSettings
from athena_runtime.format.generation_defaults import parse_overrides, read_generation_defaults
from server import chat_cli
from server.protocol import ChatCompletionRequest
from server.serving import sampling_params


def write_config(tmp_path, config) -> None:
    (tmp_path / "generation_config.json").write_text(config if isinstance(config, str) else json.dumps(config))


def test_reads_the_sampler_knobs_only(tmp_path):
    write_config(
        tmp_path,
        {
            "bos_token_id": 1,
            "eos_token_id": [2, 3],
            "do_sample": True,
            "max_new_tokens": 9,
            "temperature": 0.6,
            "top_p": 0.9,
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
        },
    )
    assert read_generation_defaults(tmp_path) == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
    }
    assert isinstance(read_generation_defaults(tmp_path)["top_k"], int)


def test_bad_values_are_left_out_with_a_warning(tmp_path, caplog):
    write_config(tmp_path, {"temperature": 7, "top_p": "high", "top_k": 2.5, "min_p": True, "repetition_penalty": 1.2})
    with caplog.at_level(logging.WARNING):
        assert read_generation_defaults(tmp_path) == {"repetition_penalty": 1.2}
    assert "temperature=7.0: must be in [0, 2]" in caplog.text and "top_p='high'" in caplog.text


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_unreadable_config_gives_no_defaults(tmp_path, caplog, text):
    write_config(tmp_path, text)
    with caplog.at_level(logging.WARNING):
        assert read_generation_defaults(tmp_path) == {}
    assert "no sampling defaults" in caplog.text
    assert read_generation_defaults(tmp_path / "missing") == {}


def test_overrides_are_checked():
    assert parse_overrides('{"temperature": 0, "top_k": 40}') == {"temperature": 0.0, "top_k": 40}
    for text, message in (
        ('{"temperature": 0.7', "JSON object"),
        ("[0.7]", "JSON object"),
        ('{"temp": 0.7}', "unknown sampling default 'temp'"),
        ('{"top_p": 0}', "in (0, 1]"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            parse_overrides(text)


def test_settings_merge_model_defaults_and_overrides():
    model = {"temperature": 0.2, "top_p": 0.9}
    assert make_settings().sampling_defaults(model) == model
    assert make_settings(generation_config="none").sampling_defaults(model) == {}
    merged = make_settings(override_generation_config='{"temperature": 0.5, "min_p": 0.1}').sampling_defaults(model)
    assert merged == {"temperature": 0.5, "top_p": 0.9, "min_p": 0.1}
    with pytest.raises(ValueError, match="override_generation_config"):
        make_settings(override_generation_config='{"temperature": -1}')


def test_request_values_win_over_defaults_and_openai_defaults_fill_the_rest():
    defaults = {"temperature": 0.2, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1}
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0.0, top_k=-1)
    p = sampling_params(req, 8, None, 0, defaults)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (0.0, 0.9, 0, 0.0, 1.1)
    bare = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert (sampling_params(bare, 8, None, 0).temperature, sampling_params(bare, 8, None, 0).top_p) == (1.0, 1.0)


def test_chat_uses_flags_then_model_defaults_then_its_own_temperature():
    args = argparse.Namespace(temperature=None, seed=4, max_tokens=9)
    p = chat_cli.chat_params(args, {"temperature": 0.2, "top_p": 0.9, "top_k": -1})
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens) == (0.2, 0.9, 0, 4, 9)
    assert chat_cli.chat_params(args, {}).temperature == chat_cli.CHAT_TEMPERATURE
    args.temperature = 0.0
    assert chat_cli.chat_params(args, {"temperature": 0.2}).temperature == 0.0


def test_server_applies_the_model_defaults_to_omitted_fields():
    """temperature 0 from the model's config: two sampled choices of one request agree token for token;
    --generation-config none brings back temperature 1 (the choices differ)."""
    tok = tiny_chat_tokenizer()

    def engine():
        runner = FakeRunner(
            vocab_size=len(tok), num_blocks=256, block_size=4, max_model_len=256, banned=(tok.eos_token_id,)
        )
        return AsyncEngine(
            runner,
            tok,
            EngineSettings(block_size=4, max_num_seqs=4),
            "tiny",
            eos_token_ids=(tok.eos_token_id,),
            generation_defaults={"temperature": 0.0},
        )

    messages = [{"role": "user", "content": "Say hello."}]
    for mode, same in (("auto", True), ("none", False)):
        server = serve_engine(engine(), generation_config=mode)
        try:
            with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30) as client:
                r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, n=2, seed=11)
            texts = [c.message.content for c in r.choices]
            assert (texts[0] == texts[1]) is same, (mode, texts)
        finally:
            server.stop()


def test_gguf_recommended_sampling_becomes_generation_config(tmp_path, caplog):
    from athena_runtime.format.gguf_import import _sampling_defaults

    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_float32("general.sampling.temp", 0.6)
    w.add_uint32("general.sampling.top_k", 40)
    w.add_float32("general.sampling.top_p", 1.5)  # out of range: left out
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with caplog.at_level(logging.WARNING):
        found = _sampling_defaults(gguf.GGUFReader(str(path)))
    assert found == {"temperature": pytest.approx(0.6), "top_k": 40}
    assert "general.sampling.top_p" in caplog.text


def test_embedded_default_gets_the_model_card_sampling(tmp_path):
    from quantize.embedded import EMBEDDED_SAMPLING, _add_sampling_defaults

    write_config(tmp_path, {"eos_token_id": 2, "temperature": 0.5})
    _add_sampling_defaults(tmp_path)
    config = json.loads((tmp_path / "generation_config.json").read_text())
    assert config == {"eos_token_id": 2, "temperature": 0.5, "top_p": EMBEDDED_SAMPLING["top_p"]}
    assert read_generation_defaults(tmp_path) == {"temperature": 0.5, "top_p": 0.9}
