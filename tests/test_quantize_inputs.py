"""Bad inputs to the quantizer and the checkpoint reader give clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_models import make_tiny_model, write_text

from athena_runtime.format import checkpoint
from athena_runtime.format.source import resolve_source
from athena_runtime.format.text import read_text_files, sample_windows
from quantize.calibration import CalibConfig


def test_unsupported_architecture(tmp_path):
    folder = make_tiny_model(tmp_path / "m", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*gpt2.*llama, mistral, qwen2"):
        resolve_source(folder)


def test_broken_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        resolve_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_source(tmp_path / "empty")
    folder = make_tiny_model(tmp_path / "m", "llama")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        resolve_source(folder)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "cfg").mkdir()
    shutil.copy(tmp_path / "bad.json", tmp_path / "cfg" / "config.json")
    with pytest.raises(ValueError, match="invalid JSON"):
        resolve_source(tmp_path / "cfg")


def test_foreign_file_is_not_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        resolve_source(f)


def test_truncated_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 20)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        resolve_source(f)


def test_calibration_inputs(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: expected an object with a string 'text' field"):
        read_text_files([str(bad)])
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: invalid JSON"):
        read_text_files([str(tmp_path / "d.jsonl")])
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text_files([str(tmp_path / "bin.txt")])
    good = tmp_path / "g.jsonl"
    good.write_text('{"text": "hello"}\n\n{"text": "world"}\n')
    assert read_text_files([str(good)]) == "hello\n\nworld"
    import torch

    with pytest.raises(ValueError, match="fewer than --seqlen"):
        sample_windows(torch.arange(10), 4, 32, 0)
    with pytest.raises(ValueError, match="nsamples"):
        CalibConfig(nsamples=0)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    from quantize.driver import QuantizeJob, run
    from quantize.recipe import AthenaRecipe

    root = tmp_path_factory.mktemp("c")
    model = make_tiny_model(root / "m", "llama", num_hidden_layers=1)
    text = write_text(root / "t.txt", (0, 20))
    out = root / "q"
    run(
        QuantizeJob(
            model=str(model),
            out=str(out),
            athena=AthenaRecipe(d=2, n=16, k=64, kmeans_iters=4),
            calib=CalibConfig(files=(str(text),), nsamples=4, seqlen=32),
        )
    )
    return out


def test_checkpoint_reads_back(compressed):
    meta, tensors = checkpoint.read_checkpoint(compressed)
    assert meta["format"] == "athena" and len(meta["layers"]) == 7


def test_truncated_checkpoint(compressed, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(compressed, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        checkpoint.read_checkpoint(bad)


def test_foreign_and_mismatched_checkpoints(compressed, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(compressed, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        checkpoint.read_checkpoint(bad)
    shutil.rmtree(bad)
    shutil.copytree(compressed, bad)
    meta = json.loads((bad / "athena.json").read_text())
    name = next(iter(meta["layers"]))
    meta["layers"][name]["shape"][1] += 6  # claims more input columns than stored
    (bad / "athena.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        checkpoint.read_checkpoint(bad)
    meta["format_version"] = 99
    (bad / "athena.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        checkpoint.read_checkpoint(bad)
    meta["format"] = "other"
    (bad / "athena.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not an Athena"):
        checkpoint.read_checkpoint(bad)
    (bad / "athena.json").unlink()
    with pytest.raises(ValueError, match="no athena.json"):
        checkpoint.read_checkpoint(bad)
    with pytest.raises(ValueError, match="already an Athena compressed checkpoint"):
        resolve_source(compressed)


def test_llama3_rope_scaling_from_gguf_rope_freqs():
    """A Llama 3.1 GGUF carries its RoPE scaling as llama.cpp's per-frequency divisors (rope_freqs): they are read
    back as config.json's llama3 rope_scaling (factor 8 for 3.1, 32 for 3.2), and foreign divisors are refused."""
    import numpy as np
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from athena_runtime.format.gguf_import import llama3_rope_scaling

    for factor in (8.0, 32.0):
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        hf = LlamaConfig(
            hidden_size=4096,
            num_attention_heads=32,
            rope_theta=500000.0,
            rope_scaling=dict(scaling),
            max_position_embeddings=131072,
        )
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
        plain = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
        assert llama3_rope_scaling(plain / scaled.double().numpy(), 500000.0, 128) == scaling
    with pytest.raises(ValueError, match="no llama3 RoPE scaling"):
        llama3_rope_scaling(np.linspace(1.0, 8.0, 64), 500000.0, 128)
