"""athena bench peers: the parts that run without a GPU (sdist slimming, the random GGUF and imatrix, the int4
tinygemm layout on the CPU ops, the decode-step breakdown's matching of graph replays, the module scopes), and the
whole run on the CPU with the tiny shape (llama.cpp part only where a CPU build of it already exists)."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import llama_build
from bench.decode_breakdown import GpuEvent, breakdown, busy_us, module_category, split_replays
from bench.random_gguf import TINY, linear_weight_count, tensor_shapes, write_gguf, write_imatrix
from bench.tinygemm import GROUP, Int4Weight, TinygemmBench, dequantize_int4, quantize_int4

ROOT = Path(__file__).resolve().parent.parent


def _tar(path: Path, names: list[str]) -> None:
    with tarfile.open(path, "w:gz") as t:
        for n in names:
            data = b"x"
            info = tarfile.TarInfo(n)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_slim_sdist_drops_only_unbuilt_paths(tmp_path):
    keep = [
        "p-1/llama.cpp/CMakeLists.txt",
        "p-1/llama.cpp/ggml/src/ggml-cuda/mmq.cu",
        "p-1/llama.cpp/tools/llama-bench/llama-bench.cpp",
        "p-1/llama.cpp/tools/mtmd/CMakeLists.txt",
        "p-1/llama.cpp/vendor/miniaudio/miniaudio.h",
        "p-1/PKG-INFO",
        "p-1/llama.cpp/docsnot/kept.txt",
    ]
    drop = [
        "p-1/llama.cpp/docs/ops/CUDA.csv",
        "p-1/llama.cpp/models/ggml-vocab-gpt-2.gguf",
        "p-1/llama.cpp/ggml/src/ggml-vulkan/x.cpp",
        "p-1/llama.cpp/tools/ui/index.html",
        "p-1/llama.cpp/tests/test-backend-ops.cpp",
    ]
    src, out = tmp_path / "p-1.tar.gz", tmp_path / "slim.tar.gz"
    _tar(src, keep + drop)
    kept, dropped = llama_build.slim_sdist(src, out)
    assert (kept, dropped) == (len(keep), len(drop))
    with tarfile.open(out) as t:
        assert sorted(t.getnames()) == sorted(keep)
    # and the slim copy unpacks to a source folder the build accepts
    cpp = llama_build.source_dir(out, tmp_path / "b")
    assert (cpp / "CMakeLists.txt").is_file() and cpp.name == "llama.cpp"


def test_source_dir_refuses_a_tarball_without_llama_cpp(tmp_path):
    src = tmp_path / "q-1.tar.gz"
    _tar(src, ["q-1/README.md"])
    with pytest.raises(FileNotFoundError, match="CMakeLists"):
        llama_build.source_dir(src, tmp_path / "b")


def test_build_is_reused_when_both_binaries_exist(tmp_path):
    bins = tmp_path / "build-cpu" / "bin"
    bins.mkdir(parents=True)
    for t in llama_build.TARGETS:
        (bins / t).write_text("")
    b = llama_build.build(tmp_path / "missing.tar.gz", tmp_path, "cpu", 2, lambda m: None)
    assert b.reused and b.binary("llama-bench") == bins / "llama-bench"
    # one binary missing: a real build is attempted, and the missing sdist is reported
    (bins / "llama-quantize").unlink()
    with pytest.raises((FileNotFoundError, RuntimeError)):  # RuntimeError: no cmake on this machine
        llama_build.build(tmp_path / "missing.tar.gz", tmp_path, "cpu", 2, lambda m: None)


def test_missing_cmake_without_a_wheel_is_reported(tmp_path, monkeypatch):
    real = shutil.which
    monkeypatch.setattr(llama_build.shutil, "which", lambda n: None if n == "cmake" else real(n))
    assert llama_build.find_tool("cmake", tmp_path, print) is None
    assert "cmake" in llama_build.missing_tools(False, tmp_path, print)


def test_run_group_kills_the_whole_group_on_timeout(tmp_path):
    marker = tmp_path / "late"
    with open(tmp_path / "log", "w") as f, pytest.raises(subprocess.TimeoutExpired):
        llama_build.run_group(["bash", "-c", f"(sleep 2; touch {marker}) & wait"], f, 0.5)
    import time

    time.sleep(2.5)
    assert not marker.exists()  # the grandchild died with its group
    with open(tmp_path / "log", "w") as f, pytest.raises(subprocess.CalledProcessError):
        llama_build.run_group(["bash", "-c", "exit 3"], f, 5)


def test_random_gguf_and_imatrix_read_back(tmp_path):
    import gguf

    cfg = dict(TINY)
    write_gguf(tmp_path / "m.gguf", cfg, torch.device("cpu"))
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    shapes = tensor_shapes(cfg)
    assert [t.name for t in r.tensors] == list(shapes)
    for t in r.tensors:
        np_shape, kind = shapes[t.name]
        assert tuple(int(v) for v in t.shape[::-1]) == np_shape  # GGUF lists dims fastest first
        assert t.tensor_type.name == kind.upper()
    assert str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8") == "llama"
    assert len(r.fields["tokenizer.ggml.tokens"].data) == cfg["vocab_size"]
    assert int(r.fields["llama.block_count"].parts[-1][0]) == cfg["num_hidden_layers"]
    q = r.get_tensor(2).data  # blk.0.attn_q.weight
    assert q.dtype == np.float16 and 0.01 < float(np.std(q.astype(np.float32))) < 0.03
    write_imatrix(tmp_path / "i.gguf", cfg)
    im = gguf.GGUFReader(str(tmp_path / "i.gguf"))
    names = [t.name for t in im.tensors]
    assert len(names) == 2 * 7 * cfg["num_hidden_layers"]
    sums = {t.name: t for t in im.tensors}
    down = sums["blk.1.ffn_down.weight.in_sum2"]
    assert int(down.shape[0]) == cfg["intermediate_size"] and (down.data > 0).all()
    assert float(sums["blk.1.ffn_down.weight.counts"].data[0]) > 0
    assert linear_weight_count(cfg) == 2 * (4 * 256 * 256 + 3 * 256 * 512)


@pytest.mark.parametrize("n,k", [(80, 256), (272, 384)])  # the CPU op wants N % 16 == 0
def test_int4_layout_matches_the_dequantized_reference(n, k):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g) * 0.02
    q, sz = quantize_int4(w)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (k // GROUP, n, 2)
    deq = dequantize_int4(q, sz)
    # min/max per group of 128: the rounding error is at most half a step (plus bf16 scale/zero rounding)
    step = (w.reshape(n, k // GROUP, GROUP).amax(-1) - w.reshape(n, k // GROUP, GROUP).amin(-1)) / 15
    assert ((deq - w).abs().reshape(n, k // GROUP, GROUP) <= step[..., None] * 0.5 + 2e-4).all()
    x = torch.randn(3, k, generator=g).to(torch.bfloat16)
    out = Int4Weight.from_codes(q, sz).mm(x).float()
    ref = x.float() @ deq.T
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-2


def test_tinygemm_bench_on_the_cpu():
    bench = TinygemmBench(dict(TINY), torch.device("cpu"), reps=1)
    res = bench.measure(bandwidth=1e10)
    assert res["rel_error_vs_dequant"] < 1e-2 and res["dense"].startswith("torch fp32")
    assert {r["shape"] for r in res["shapes"]} == {"256x256", "512x256", "256x512"}
    step = res["step"]["int4"]
    # 4.25 bits per linear weight, the lm_head in fp16
    lin = linear_weight_count(dict(TINY))
    assert step["bytes"] == lin * 4.25 / 8 + TINY["vocab_size"] * TINY["hidden_size"] * 2
    assert step["tok_s"] > 0 and step["limit_tok_s"] == pytest.approx(1e10 / step["bytes"])


def _ev(name, start, dur):
    return GpuEvent(name, start, start + dur)


def test_busy_counts_overlaps_once():
    assert busy_us([_ev("a", 0, 10), _ev("b", 5, 10), _ev("c", 30, 5)]) == 20


def test_breakdown_matches_replays_and_accounts_gaps():
    seq = [
        ("gemv_pq", "linear layers"),
        ("_rope_kernel", "attention"),
        ("_paged_decode_kernel", "attention"),
        ("gemv_pq", "linear layers"),
        ("cublas_gemv", "lm_head"),
    ]
    events = []
    t = 0.0
    for _ in range(3):  # each step: an input copy, the 5 graph kernels with 1 us gaps, then argmax
        events.append(_ev("Memcpy HtoD (Pageable -> Device)", t, 2))
        t += 10
        for name, _ in seq:
            events.append(_ev(name, t, 4))
            t += 5
        events.append(_ev("argmax_kernel", t, 3))
        t += 50
    res = breakdown(events, seq, 3, wall_us_per_step=100.0)
    assert res["steps_matched"] == 3 and res["method"].startswith("eager")
    rows = res["rows"]
    assert rows["linear layers"] == {"us": 8, "calls": 2}
    assert rows["RoPE"]["us"] == 4 and rows["attention"]["us"] == 4 and rows["lm_head"]["us"] == 4
    assert rows["gaps inside the graph (GPU idle between its kernels)"]["us"] == pytest.approx(4)
    assert rows["outside the graph: input copies (H2D)"]["us"] == 2
    assert rows["outside the graph: sampling (argmax)"]["us"] == 3
    assert res["graph_span_us"] == pytest.approx(24)
    host = rows["host between replays (wall - graph span - GPU work outside it)"]["us"]
    assert host == pytest.approx(100 - 24 - 5)


def test_breakdown_falls_back_to_names_when_the_sequence_is_absent():
    events = [_ev("ampere_fp16_gemv", 0, 4), _ev("_add_rmsnorm_kernel", 5, 1), _ev("weird", 7, 1)]
    res = breakdown(events, [("not_there", "linear layers")], 1, wall_us_per_step=10)
    assert res["steps_matched"] == 0 and res["method"].startswith("kernel names")
    assert res["rows"]["linear layers"]["us"] == 4 and res["rows"]["norms (+ residual add)"]["us"] == 1
    assert res["rows"]["other"]["us"] == 1
    replays, outside = split_replays(events, ["ampere_fp16_gemv", "x"])
    assert replays == [] and outside == [0, 1, 2]


@pytest.mark.slow
def test_module_scopes_cover_the_model_on_the_cpu():
    from torch.profiler import ProfilerActivity, profile

    from athena_runtime.batch import SequenceChunk
    from bench.decode import random_runner
    from bench.profile_decode import _scopes

    runner, _ = random_runner(dict(TINY), torch.device("cpu"), 64, "fp16", dense=False)
    assert module_category("model.layers.3.mlp.gate_up_proj.linear", "PQLinear") == "linear layers"
    assert module_category("model.layers.3.mlp", "MLP") == "activation (SiLU x up)"
    assert module_category("model.layers.3", "DecoderLayer") is None
    cats = {module_category(n, type(m).__name__) for n, m in runner.model.named_modules()} - {None}
    assert cats == {
        "linear layers",
        "lm_head",
        "embedding",
        "norms (+ residual add)",
        "RoPE",
        "attention",
        "activation (SiLU x up)",
    }
    handles = _scopes(runner.model)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.execute([SequenceChunk([5, 6, 7], 0, [0])])
    for h in handles:
        h.remove()
    seen = [e.name for e in prof.events() if e.name.startswith("cat::")]
    layers = TINY["num_hidden_layers"]
    assert seen.count("cat::linear layers") == 7 * layers
    assert seen.count("cat::norms (+ residual add)") == 2 * layers + 1
    assert seen.count("cat::lm_head") == 1 and seen.count("cat::attention") == layers


def _cpu_llama_build() -> Path | None:
    for d in sorted((ROOT / ".peers").glob("build-cpu*/bin")):
        if all((d / t).is_file() for t in llama_build.TARGETS):
            return d
    return None


def _peers(tmp_path, *extra) -> dict:
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "bench.peers",
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--pp",
        "16",
        "--tg",
        "4",
        "--reps",
        "1",
        "--out",
        str(out),
        "--workdir",
        str(tmp_path / "w"),
        *extra,
    ]
    res = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "peers.json").read_text()), res.stdout


@pytest.mark.slow
def test_peers_on_the_cpu_without_llama(tmp_path):
    doc, stdout = _peers(tmp_path, "--skip-llama")
    systems = [r["system"] for r in doc["rows"]]
    assert systems == ["Athena PQ", "Athena fp16 path", "torch int4 tinygemm g128 (linears+lm_head)"]
    assert all(r["tok_s"] > 0 and r["pct_limit"] > 0 and r["bits_per_weight"] > 0 for r in doc["rows"])
    assert {s["status"] for s in doc["stages"]} == {"ok"}
    assert "Athena PQ" in stdout and "% limit" in stdout


@pytest.mark.slow
def test_peers_budget_guard_skips_and_says_so(tmp_path):
    doc, stdout = _peers(tmp_path, "--skip-llama", "--budget", "1")
    assert doc["rows"] == []
    assert {s["status"] for s in doc["stages"]} == {"skipped"}
    assert "SKIPPED" not in stdout and "skipped:" in stdout


@pytest.mark.slow
@pytest.mark.skipif(
    _cpu_llama_build() is None,
    reason="no CPU build of llama.cpp under .peers/build-cpu*/ "
    "(python -m bench.llama_build --src SDIST --cuda-arch cpu --O0 makes one)",
)
def test_peers_on_the_cpu_with_llama_cpp(tmp_path):
    bins = _cpu_llama_build()
    build_dir = tmp_path / "peers"
    (build_dir / "build-cpu-O0").mkdir(parents=True)
    (build_dir / "build-cpu-O0" / "bin").symlink_to(bins)
    doc, stdout = _peers(
        tmp_path,
        "--O0",
        "--build-dir",
        str(build_dir),
        "--skip-athena",
        "--skip-tinygemm",
        "--types",
        "Q4_K_M,IQ3_XXS,F16",
    )
    rows = {r["system"]: r for r in doc["rows"]}
    assert set(rows) == {"llama.cpp Q4_K_M", "llama.cpp IQ3_XXS (random imatrix)", "llama.cpp F16"}
    assert all(r["tok_s"] > 0 and r["pp_tok_s"] > 0 for r in rows.values())
    # bits per linear weight from the files: F16 16, Q4_K_M ~4.8, IQ3_XXS ~3 (llama.cpp mixes types per tensor)
    assert rows["llama.cpp F16"]["bits_per_weight"] == pytest.approx(16)
    assert 4.4 < rows["llama.cpp Q4_K_M"]["bits_per_weight"] < 5.2
    assert 2.9 < rows["llama.cpp IQ3_XXS (random imatrix)"]["bits_per_weight"] < 3.5
    log = (tmp_path / "out" / "quantize-IQ3_XXS.log").read_text()
    assert "--imatrix" in log


def test_peers_is_an_athena_bench_command(capsys):
    from bench.cli import BENCHMARKS
    from bench.peers import main

    assert BENCHMARKS["peers"][0] == "bench.peers"
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--budget" in capsys.readouterr().out
