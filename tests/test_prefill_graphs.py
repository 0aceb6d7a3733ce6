"""The lone-prompt prefill CUDA graphs (athena_runtime/prefill_graphs.py): bucket choice at every boundary, the
static buffers' padded forward against the eager path (CPU), and replay against eager on a GPU."""

import dataclasses

import pytest
import torch
from tiny_models import make_tiny_model

from athena_runtime.batch import SequenceChunk
from athena_runtime.model_runner import ModelRunner
from athena_runtime.prefill_graphs import PREFILL_BUCKETS, PrefillGraphs, usable_buckets

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


def _cpu_runner(folder, fmt="int8", num_blocks=80):
    return ModelRunner.from_path(
        folder, kv_format=fmt, kv_group_size=16, block_size=4, num_blocks=num_blocks, device="cpu"
    )


def test_usable_buckets_follow_windows_softcap_and_length(folders):
    runner = _cpu_runner(folders["mistral"])
    cfg = runner.config
    assert usable_buckets(cfg, 4096) == ((32,), "buckets above 48 tokens (max_model_len / sliding window)")
    llama = _cpu_runner(folders["llama"]).config
    assert usable_buckets(llama, 4096) == (PREFILL_BUCKETS, "")
    assert usable_buckets(llama, 128)[0] == (32, 64, 96, 128)
    assert usable_buckets(llama, 127)[0] == (32, 64, 96)
    assert usable_buckets(dataclasses.replace(llama, attn_softcap=50.0), 4096) == (
        (),
        "attention soft-capping has no SDPA path",
    )


def test_bucket_choice_at_every_boundary(folders):
    runner = _cpu_runner(folders["llama"])
    pg = PrefillGraphs(runner.model, runner.config, runner.kv_cache, "cpu", 4096, pool=None)
    table = list(range(130))

    def bucket(n, start=0, count=1):
        return pg.bucket_for([SequenceChunk(list(range(n)), start, table)] * count)

    assert bucket(1) is None  # one token: the decode graphs
    assert bucket(2) == 32 and bucket(32) == 32 and bucket(33) == 64
    for lo, hi in zip(PREFILL_BUCKETS, PREFILL_BUCKETS[1:]):
        assert bucket(lo) == lo and bucket(lo + 1) == hi
    assert bucket(512) == 512 and bucket(513) is None  # past the largest bucket: eager
    assert bucket(40, start=16) is None  # a continued chunk (cached prefix): eager
    assert bucket(40, count=2) is None  # several sequences: eager


@pytest.mark.parametrize("n", [2, 31, 32, 33, 63])
def test_padded_static_forward_gives_the_eager_logits_on_cpu(folders, n):
    """The graph's forward over its static buffers (padding rows to the null block), run eagerly on the CPU: the
    same logits as the eager path, and the same next decode step (the real tokens' K/V went to their slots)."""
    folder = folders["llama"]
    prompt = _tokens(n + 1, seed=n)
    table = [9, 3, 40, 1, 22, 7, 30, 12, 5, 17, 25, 60, 2, 44, 11, 70, 33]
    graph_runner, eager = _cpu_runner(folder), _cpu_runner(folder)
    pg = PrefillGraphs(graph_runner.model, graph_runner.config, graph_runner.kv_cache, "cpu", 4096, pool=None)
    bucket = pg.bucket_for([SequenceChunk(prompt[:n], 0, table)])
    pg.fill(None, 64)  # stale rows from a wider capture must not matter
    pg.fill(SequenceChunk(prompt[:n], 0, table), bucket)
    with torch.inference_mode():
        got = pg.forward(bucket)[0]
    want = eager.execute([SequenceChunk(prompt[:n], 0, table)])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    step = [SequenceChunk([prompt[n]], n, table)]
    torch.testing.assert_close(graph_runner.execute(step), eager.execute(step), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fmt", ["fp16", "int4"])
def test_prefill_graph_replay_matches_eager(folders, fmt):
    folder = folders["llama"]
    kw = dict(kv_format=fmt, kv_group_size=16, block_size=4, num_blocks=300, device="cuda")
    graphs = ModelRunner.from_path(folder, use_cuda_graphs=True, **kw)
    eager = ModelRunner.from_path(folder, use_cuda_graphs=False, **kw)
    assert eager.prefill_graphs is None and eager.capture_graphs(2) == 0
    assert graphs.capture_graphs(2) == 2 + len(PREFILL_BUCKETS)  # decode 1, 2 and every prefill bucket
    for i, n in enumerate((2, 31, 32, 33, 97, 200, 512)):
        prompt = _tokens(n + 3, seed=100 + n)
        table = list(range(i * 40 + 1, i * 40 + 41))[: -(-(n + 3) // 4)]
        outs = []
        for runner in (graphs, eager):
            steps = [runner.execute([SequenceChunk(prompt[:n], 0, table)])]
            steps += [runner.execute([SequenceChunk([prompt[p]], p, table)]) for p in range(n, n + 3)]
            outs.append(torch.cat(steps))
        assert torch.isfinite(outs[0]).all()
        torch.testing.assert_close(outs[0], outs[1], rtol=2e-3, atol=2e-3)
    assert sorted(graphs.prefill_graphs.graphs) == list(PREFILL_BUCKETS)  # captured at start-up, no others
