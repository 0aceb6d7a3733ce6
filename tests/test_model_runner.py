"""ModelRunner: chunked prefill + decode vs transformers, batch invariance, quantized caches,
compressed checkpoints, CUDA graphs (GPU only)."""

import random

import pytest
import torch
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from athena_runtime.batch import SequenceChunk
from athena_runtime.kv_cache import blocks_for_budget
from athena_runtime.model_runner import ModelRunner

pytestmark = pytest.mark.gpu  # on CUDA when there is one: `bash bench/gpu_suite.sh tests` runs `pytest -m gpu`

LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
)
FAMILIES = {
    "llama": dict(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True),
    "mistral": dict(sliding_window=7),
    "qwen2": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner_models")
    return {f: make_tiny_model(root / f, f, **kw) for f, kw in FAMILIES.items()}


def _tokens(n, seed):
    return torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_logits(folder, tokens):
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0]  # [L, vocab]


def _feed(runner, tokens, table, chunk_sizes):
    """Prefill `tokens` in chunks, then decode the rest one token at a time; logits of each step."""
    out, pos = {}, 0
    for n in chunk_sizes:
        out[pos + n - 1] = runner.execute([SequenceChunk(tokens[pos : pos + n], pos, table)])[0]
        pos += n
    for p in range(pos, len(tokens)):
        out[p] = runner.execute([SequenceChunk([tokens[p]], p, table)])[0]
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_prefill_and_decode_match_transformers(folders, family):
    tokens = _tokens(26, seed=1)
    want = _hf_logits(folders[family], tokens)
    runner = ModelRunner.from_path(folders[family], kv_format="fp32", block_size=4, num_blocks=16, device="cpu")
    table = random.Random(0).sample(range(16), 7)
    got = _feed(runner, tokens, table, chunk_sizes=(9, 5))
    assert sorted(got) == [8] + list(range(13, 26))
    for pos, logits in got.items():
        assert logits.dtype == torch.float32 and logits.shape == (384,)
        torch.testing.assert_close(logits, want[pos], rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_mixed_batch_equals_each_sequence_alone(folders):
    """Three sequences of different lengths, prefill and decode in one step, shuffled blocks."""
    folder = folders["qwen2"]
    prompts = [_tokens(n, seed=10 + n) for n in (3, 11, 18)]
    alone = []
    for prompt in prompts:
        runner = ModelRunner.from_path(
            folder, kv_format="int8", kv_group_size=16, block_size=4, num_blocks=8, device="cpu"
        )
        alone.append(_feed(runner, prompt, list(range(8))[: -(-len(prompt) // 4)], chunk_sizes=(len(prompt) - 2,)))
    runner = ModelRunner.from_path(
        folder, kv_format="int8", kv_group_size=16, block_size=4, num_blocks=16, device="cpu"
    )
    ids = random.Random(1).sample(range(16), 11)
    tables = [ids[:1], ids[1:4], ids[4:9]]
    steps = [  # (sequence, start, length) per chunk of each step
        [(2, 0, 7), (1, 0, 9)],
        [(2, 7, 9), (0, 0, 1)],
        [(1, 9, 1), (0, 1, 1), (2, 16, 1)],
        [(0, 2, 1), (2, 17, 1), (1, 10, 1)],
    ]
    for step in steps:
        chunks = [SequenceChunk(prompts[s][a : a + n], a, tables[s]) for s, a, n in step]
        logits = runner.execute(chunks)
        assert logits.shape == (len(step), 384)
        for row, (s, a, n) in enumerate(step):
            if a + n - 1 in alone[s]:
                torch.testing.assert_close(logits[row], alone[s][a + n - 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,tolerance", [("fp16", 0.01), ("int8", 0.03), ("int4", 0.25)])
@pytest.mark.parametrize("hadamard", [False, True])
def test_quantized_caches_stay_close_to_exact(folders, fmt, tolerance, hadamard):
    """Logit error relative to the logit range grows fp16 < int8 < int4, with or without rotation."""
    folder = folders["llama"]
    tokens = _tokens(20, seed=4)
    want = _hf_logits(folder, tokens)
    runner = ModelRunner.from_path(
        folder, kv_format=fmt, kv_group_size=16, kv_hadamard=hadamard, block_size=4, num_blocks=8, device="cpu"
    )
    got = _feed(runner, tokens, [3, 1, 4, 0, 5], chunk_sizes=(12,))
    err = max((got[p] - want[p]).abs().max().item() for p in got) / want.abs().max().item()
    assert err < tolerance


def test_hadamard_with_exact_cache_matches_transformers(folders):
    """Rotation of q, K, V and back of the output is exact math: no error beyond fp32 rounding."""
    tokens = _tokens(15, seed=5)
    want = _hf_logits(folders["mistral"], tokens)
    runner = ModelRunner.from_path(
        folders["mistral"], kv_format="fp32", kv_hadamard=True, block_size=4, num_blocks=8, device="cpu"
    )
    got = _feed(runner, tokens, [6, 2, 7, 0], chunk_sizes=(8,))
    for p, logits in got.items():
        torch.testing.assert_close(logits, want[p], rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_cache_sizing_and_bad_chunks(folders):
    runner = ModelRunner.from_path(
        folders["llama"], kv_format="int4", kv_group_size=16, block_size=8, kv_budget_bytes=100_000, device="cpu"
    )
    assert runner.num_blocks == blocks_for_budget(100_000, "int4", 2, 8, 2, 16, 16) > 0
    assert runner.block_size == 8 and runner.max_model_len == min(256, runner.num_blocks * 8)
    with pytest.raises(ValueError, match="block_table has 1 blocks"):
        runner.execute([SequenceChunk(list(range(9)), 0, [0])])
    with pytest.raises(ValueError, match="out of range"):
        runner.execute([SequenceChunk([1], 0, [runner.num_blocks])])
    with pytest.raises(ValueError, match="holds no block"):
        ModelRunner.from_path(folders["llama"], kv_budget_bytes=10, device="cpu")


@pytest.mark.parametrize("method", ["rtn", "athena"])
def test_compressed_checkpoint_matches_its_reference_dequantization(folders, tmp_path, method):
    """Our loader on a compressed folder gives the logits of transformers with quantize's dequantized weights."""
    from compressed_fixture import write_compressed

    from athena_runtime.format.checkpoint import read_checkpoint
    from athena_runtime.format.layers import layer_from_tensors

    folder = write_compressed(folders["qwen2"], tmp_path / method, method)
    meta, tensors = read_checkpoint(folder)
    state = {name: t.float() for name, t in tensors.items() if name.rsplit(".", 1)[0] not in meta["layers"]}
    for prefix, layer_meta in meta["layers"].items():
        layer = layer_from_tensors(prefix, tensors, layer_meta)
        state[f"{prefix}.weight"] = layer.dequantize()
        if layer.bias is not None:  # q/k/v of Qwen2
            state[f"{prefix}.bias"] = layer.bias.float()
    hf = AutoModelForCausalLM.from_pretrained(folders["qwen2"], dtype=torch.float32, attn_implementation="eager")
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and missing == ["lm_head.weight"]  # tied
    hf.tie_weights()
    tokens = _tokens(12, seed=6)
    with torch.no_grad():
        want = hf(torch.tensor([tokens])).logits[0]
    runner = ModelRunner.from_path(folder, kv_format="fp32", block_size=4, num_blocks=4, device="cpu")
    got = runner.execute([SequenceChunk(tokens, 0, [2, 0, 3])])[0]
    torch.testing.assert_close(got, want[-1], rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
def test_cuda_graph_decode_matches_eager(folders, fmt):
    folder = folders["mistral"]
    kw = dict(kv_format=fmt, kv_group_size=16, block_size=4, num_blocks=64, device="cuda")
    graphs = ModelRunner.from_path(folder, use_cuda_graphs=True, **kw)
    eager = ModelRunner.from_path(folder, use_cuda_graphs=False, **kw)
    assert graphs.capture_graphs(3, prefill=False) == 3 and sorted(graphs._graphs) == [1, 2, 4]  # start-up capture
    assert graphs.capture_graphs(3, prefill=False) == 0 and eager.capture_graphs(3) == 0
    prompts = [_tokens(n, seed=n) for n in (5, 9, 14)]  # batch of 3 -> bucket 4 (one padded row)
    tables = [list(range(i * 16, i * 16 + 16)) for i in range(3)]
    for runner in (graphs, eager):
        runner.execute([SequenceChunk(p[:-4], 0, t) for p, t in zip(prompts, tables)])
    want = [_hf_logits(folder, p) for p in prompts]  # fp32, CPU
    scale = max(w.abs().max().item() for w in want)
    for step in range(4):
        chunks = [SequenceChunk([p[len(p) - 4 + step]], len(p) - 4 + step, t) for p, t in zip(prompts, tables)]
        a, b = graphs.execute(chunks), eager.execute(chunks)
        assert 4 in graphs._graphs and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
        for row, p in enumerate(prompts):  # fp16 model and cache vs the fp32 reference
            err = (a[row].cpu() - want[row][len(p) - 4 + step]).abs().max().item() / scale
            assert err < {"fp16": 0.02, "int8": 0.04, "int4": 0.3}[fmt]


def test_capture_graphs_is_a_no_op_without_cuda_graphs(folders):
    runner = ModelRunner.from_path(folders["llama"], kv_format="fp32", block_size=4, num_blocks=8, device="cpu")
    assert runner.capture_graphs() == 0 and runner._graphs == {}


def test_graph_buffers_give_the_eager_logits_on_cpu(folders):
    """The CUDA-graph path's static buffers (padding rows, null block, partial table refresh), run
    eagerly on the CPU, give the same logits as the eager path: only capture/replay is GPU-only."""
    runner = ModelRunner.from_path(
        folders["mistral"], kv_format="int8", kv_group_size=16, block_size=4, num_blocks=24, device="cpu"
    )
    runner._init_graph_buffers()
    prompts = [_tokens(n, seed=n) for n in (5, 13, 9)]
    tables = [[3, 7], [10, 1, 0, 12], [5, 20, 8]]
    runner.execute([SequenceChunk(p[:-2], 0, t) for p, t in zip(prompts, tables)])
    runner._fill([SequenceChunk([0], 15, [23, 22, 21, 20])] * 8, 8)  # stale wide rows left by a previous batch
    for step in (2, 1):
        chunks = [SequenceChunk([p[-step]], len(p) - step, t) for p, t in zip(prompts, tables)]
        runner._fill(chunks, 4)
        assert runner._seq_lens[3] == 0 and runner._slots[3] == runner.kv_cache.null_block * 4
        with torch.inference_mode():
            graph_path = runner._graph_forward(4)[:3]
        alone = ModelRunner.from_path(
            folders["mistral"], kv_format="int8", kv_group_size=16, block_size=4, num_blocks=24, device="cpu"
        )
        for p, t, row in zip(prompts, tables, graph_path):
            want = alone.execute([SequenceChunk(p[: len(p) - step + 1], 0, t)])[0]
            torch.testing.assert_close(row, want, rtol=1e-5, atol=1e-5)
