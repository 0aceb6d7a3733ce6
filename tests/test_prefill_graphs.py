"""The one-sequence prefill CUDA graphs (athena_runtime/prefill_graphs.py): bucket choice at every boundary, the
static buffers' padded forward against the eager path (CPU), and replay against eager on a GPU."""

import dataclasses

import pytest
import torch
from tiny_models import make_tiny_model

from athena_runtime.batch import SequenceChunk
from athena_runtime.model_runner import ModelRunner
from athena_runtime.prefill_graphs import CHUNK_BUCKETS, FRESH_BUCKETS, PrefillGraphs, usable_buckets

pytestmark = pytest.mark.gpu  # the replay test runs on CUDA when there is one (`pytest -m gpu`)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefill_graph_models")
    return {
        "llama": make_tiny_model(root / "llama", "llama", tie_word_embeddings=True),
        "mistral": make_tiny_model(root / "mistral", "mistral", sliding_window=48),
    }


def _tokens(n, seed):
    return torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _cpu_runner(folder, fmt="int8", num_blocks=300):
    return ModelRunner.from_path(
        folder, kv_format=fmt, kv_group_size=16, block_size=4, num_blocks=num_blocks, device="cpu"
    )


def _graphs(runner, max_model_len=4096):
    return PrefillGraphs(runner.model, runner.config, runner.kv_cache, "cpu", max_model_len, pool=None)


def test_usable_buckets_follow_windows_softcap_and_length(folders):
    mistral = _cpu_runner(folders["mistral"]).config
    keys, why = usable_buckets(mistral, 4096)
    assert [b for b, c in keys if not c] == [32] and why == "whole prompts above 48 tokens (max_model_len / window)"
    assert {c for _, c in keys if c} == {512, 1024, 2048, 4096}  # chunks after a prefix: the window is masked
    llama = _cpu_runner(folders["llama"]).config
    keys, why = usable_buckets(llama, 4096)
    assert [b for b, c in keys if not c] == list(FRESH_BUCKETS) and why == ""
    assert [b for b, c in keys if c == 512] == [32, 64, 128, 256] and [b for b, c in keys if c == 4096] == list(
        CHUNK_BUCKETS
    )
    keys = usable_buckets(llama, 1024)[0]
    assert {c for _, c in keys if c} == {512, 1024} and max(b for b, c in keys if not c) == 512
    keys = usable_buckets(llama, 1025)[0]
    assert {c for _, c in keys if c} == {512, 1024, 2048}  # the bucket that covers max_model_len
    assert [b for b, c in usable_buckets(llama, 127)[0] if not c] == [32, 64, 96]
    assert usable_buckets(dataclasses.replace(llama, attn_softcap=50.0), 4096) == (
        [],
        "attention soft-capping has no SDPA path",
    )


def test_bucket_choice_at_every_boundary(folders):
    pg = _graphs(_cpu_runner(folders["llama"]))
    table = list(range(1100))

    def bucket(n, start=0, count=1):
        return pg.bucket_for([SequenceChunk(list(range(n)), start, table)] * count)

    assert bucket(1) is None and bucket(1, start=40) is None  # one token: the decode graphs
    assert bucket(2) == (32, 0) and bucket(32) == (32, 0) and bucket(33) == (64, 0)
    for lo, hi in zip(FRESH_BUCKETS, FRESH_BUCKETS[1:]):
        assert bucket(lo) == (lo, 0) and bucket(lo + 1) == (hi, 0)
    assert bucket(512) == (512, 0) and bucket(513) is None  # past the largest bucket: eager
    assert bucket(40, count=2) is None  # several sequences: eager
    # after a cached prefix: the chunk's bucket and the context bucket that holds start + n keys
    assert bucket(2, start=1) == (32, 512) and bucket(32, start=480) == (32, 512) and bucket(33, start=479) == (64, 512)
    assert bucket(32, start=481) == (32, 1024) and bucket(300, start=200) == (512, 1024)
    assert bucket(257, start=100) == (512, 1024)  # (512, 512) does not exist: 512 tokens after a prefix exceed it
    assert bucket(48, start=4048) == (64, 4096) and bucket(48, start=4049) is None  # past the largest context
    assert bucket(513, start=8) is None


CPU_CASES = [(2, 0), (31, 0), (32, 0), (33, 0), (63, 0), (2, 5), (17, 40), (33, 95), (64, 200)]


@pytest.mark.parametrize("n,start", CPU_CASES)
def test_padded_static_forward_gives_the_eager_logits_on_cpu(folders, n, start):
    """The graph's forward over its static buffers (padding rows to the null block, a prefix read back from the
    cache), run eagerly on the CPU: the same logits as the eager path, and the same next decode step (the real
    tokens' K/V went to their slots)."""
    folder = folders["llama"]
    prompt = _tokens(start + n + 1, seed=n + start)
    table = [(7 * i + 3) % 290 + 1 for i in range(-(-(start + n + 1) // 4))]
    graph_runner, eager = _cpu_runner(folder), _cpu_runner(folder)
    for runner in (graph_runner, eager):
        if start:
            runner.execute([SequenceChunk(prompt[:start], 0, table)])  # the cached prefix
    pg = _graphs(graph_runner)
    chunk = SequenceChunk(prompt[start : start + n], start, table)
    key = pg.bucket_for([chunk])
    pg.fill(None, (512, 1024) if start else (64, 0))  # stale rows from a wider capture must not matter
    pg.fill(chunk, key)
    with torch.inference_mode():
        got = pg.forward(key)[0]
    want = eager.execute([chunk])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    step = [SequenceChunk([prompt[start + n]], start + n, table)]
    torch.testing.assert_close(graph_runner.execute(step), eager.execute(step), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fmt", ["fp16", "int4"])
def test_prefill_graph_replay_matches_eager(folders, fmt):
    folder = folders["llama"]
    kw = dict(kv_format=fmt, kv_group_size=16, block_size=4, num_blocks=1000, device="cuda")
    graphs = ModelRunner.from_path(folder, use_cuda_graphs=True, **kw)
    eager = ModelRunner.from_path(folder, use_cuda_graphs=False, **kw)
    assert eager.prefill_graphs is None and eager.capture_graphs(2) == 0
    pg = graphs.prefill_graphs  # the tiny model's 256 positions: whole prompts up to 256, one context of 512
    assert pg.fresh == [32, 64, 96, 128, 192, 256] and pg.contexts == [512]
    assert graphs.capture_graphs(2) == 2 + len(pg.keys)  # decode 1, 2 and every prefill bucket
    cases = [(2, 0), (31, 0), (32, 0), (33, 0), (97, 0), (200, 0), (252, 0), (2, 1), (33, 40), (64, 100), (120, 130)]
    for i, (n, start) in enumerate(cases):
        prompt = _tokens(start + n + 3, seed=100 + n + start)
        table = list(range(i * 80 + 1, i * 80 + 81))[: -(-(start + n + 3) // 4)]  # <= 64 blocks a case
        outs = []
        for runner in (graphs, eager):
            steps = [runner.execute([SequenceChunk(prompt[:start], 0, table)])] if start else []
            steps += [runner.execute([SequenceChunk(prompt[start : start + n], start, table)])]
            steps += [runner.execute([SequenceChunk([prompt[p]], p, table)]) for p in range(start + n, start + n + 3)]
            outs.append(torch.cat(steps))
        assert torch.isfinite(outs[0]).all()
        torch.testing.assert_close(outs[0], outs[1], rtol=2e-3, atol=2e-3, msg=f"n={n} start={start}")
    assert sorted(pg.graphs) == sorted(pg.keys)  # captured at start-up, no others
