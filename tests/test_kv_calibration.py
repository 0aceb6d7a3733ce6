"""The key basis calibration: its statistics, its exactness through the whole model, the runner's use."""

import pytest
import torch
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from athena_runtime.batch import SequenceChunk
from athena_runtime.format.source import load_tokenizer
from athena_runtime.kv_calibration import NUM_WINDOWS, _RecordingCache, calibrate_key_basis, calibration_windows
from athena_runtime.model_runner import ModelRunner


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib_models")
    return {
        "llama": make_tiny_model(root / "llama", "llama"),
        "mistral": make_tiny_model(root / "mistral", "mistral", sliding_window=7),
        # Gemma 3 with its real head_dim 256 (2 heads, 1 KV head): the basis over wide heads, local/global layers
        "gemma3": make_tiny_model(
            root / "gemma3", "gemma3", head_dim=256, num_attention_heads=2, num_key_value_heads=1
        ),
    }


def test_recorded_statistics_follow_the_definitions():
    gen = torch.Generator().manual_seed(0)
    cache = _RecordingCache(1, 4, 16, 2, 8, "cpu", torch.float32)
    k = torch.randn(40, 2, 8, generator=gen) * torch.linspace(0.5, 3, 8) + torch.arange(8.0)
    q = torch.randn(40, 6, 8, generator=gen)  # 3 query heads per KV head
    positions = torch.cat([torch.arange(20), torch.arange(20)])  # two sequences: two tokens at position 0
    cache.write(0, k, k, torch.arange(40) % 64, positions)
    cache.query(0, q)
    basis = cache.key_basis(queries_per_kv=3)
    m = k.double().mean(0)
    torch.testing.assert_close(basis.offset[0], m.float())
    torch.testing.assert_close(basis.sink[0], (k[positions == 0].double().mean(0) - m).float())
    var = k.double().var(0, unbiased=False)
    q2 = q.double().unflatten(1, (2, 3)).square().mean((0, 2))
    d = (q2 / var).pow(0.25)
    torch.testing.assert_close(basis.scale[0], (d / d.square().mean(-1, keepdim=True).sqrt()).float())


def _hf_logits(folder, tokens):
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0]


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])
def test_calibrated_basis_with_an_exact_cache_matches_transformers(folders, family):
    """m, d, δ and H change what is stored, not what attention computes (sliding window included)."""
    folder = folders[family]
    runner = ModelRunner.from_path(folder, kv_format="fp32", kv_hadamard=True, block_size=4, num_blocks=8, device="cpu")
    windows = calibration_windows(load_tokenizer(folder), 64)
    assert windows.shape == (NUM_WINDOWS, 64)
    basis = calibrate_key_basis(runner.model, runner.config, windows, "cpu", torch.float32)
    assert basis.offset.abs().max() > 0 and basis.sink.abs().max() > 0 and (basis.scale != 1).any()
    runner.kv_cache.set_key_basis(basis)
    tokens = torch.randint(0, 384, (15,), generator=torch.Generator().manual_seed(5)).tolist()
    want = _hf_logits(folder, tokens)
    table = [6, 2, 7, 0]
    got = {7: runner.execute([SequenceChunk(tokens[:8], 0, table)])[0]}
    for p in range(8, 15):
        got[p] = runner.execute([SequenceChunk([tokens[p]], p, table)])[0]
    for p, logits in got.items():
        torch.testing.assert_close(logits, want[p], rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_runner_calibrates_int4_only_and_deterministically(folders):
    kw = dict(block_size=4, num_blocks=8, device="cpu", max_model_len=32)
    a = ModelRunner.from_path(folders["llama"], kv_format="int4", kv_group_size=16, **kw).kv_cache
    b = ModelRunner.from_path(folders["llama"], kv_format="int4", kv_group_size=16, **kw).kv_cache
    assert a.hadamard and a.key_offset is not None
    for x, y in ((a.key_offset, b.key_offset), (a.key_scale, b.key_scale), (a.sink_key, b.sink_key)):
        assert torch.equal(x, y)
    for fmt in ("fp16", "int8"):
        assert ModelRunner.from_path(folders["llama"], kv_format=fmt, **kw).kv_cache.key_offset is None
