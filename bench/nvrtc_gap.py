"""Issue 18's decode gap in one device call (< 6 min on an H100 with the CUDA toolkit present): the one-token
lookup-table kernel (cuda/lut.cu) built several ways, each swapped into one 7B model (random weights, built on the
GPU) for batch-1 decode, and timed alone at the four 7B decode shapes.

    python -m bench.nvrtc_gap [--out DIR] [--prev DIR] [--new 256] [--rounds 3] [--budget 330]
    python -m bench.nvrtc_gap --dry-run        (CPU: builds every variant's cubin for sm_90, no GPU)

Variants (each a cubin of the same template instances, loaded through nvrtc.Kernel; identical cubins are measured
once): `nvrtc` the shipped build; `nvrtc <options>` with NVRTC options nvcc would differ by; `nvcc` the same .cu
sources compiled by the toolkit's nvcc (`-cubin`, load_inline's flags), so nvrtc against nvcc isolates the compiler
from the code; with `--prev DIR` (a copy of kernels/cuda/ from before 058451c, e.g. `git archive 058451c~1
athena_runtime/kernels/cuda | tar -x -C .prev`) `prev nvrtc` / `prev nvcc`: the lookups through 64-bit shared
addresses, as NVRTC 13.0 builds them there. Decode rounds are interleaved (A B C A B C ...: drift hits all alike);
`nvrtc eager` is the shipped build without CUDA graphs. Details go to DIR/nvrtc_gap.json; the table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

import torch

from athena_runtime.kernels import lut, nvrtc

log = logging.getLogger("bench.nvrtc_gap")

# what torch's load_inline gave nvcc for the old extensions (besides -O3 -lineinfo and the -gencode of the GPU)
TORCH_NVCC_FLAGS = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
)
NVRTC_OPTION_SETS = {
    "xvec": ("--extra-device-vectorization",),
    "dopt": ("-dopt=on",),
    "torch-defines": TORCH_NVCC_FLAGS[:4],
    "fast-math": ("--use_fast_math",),
}  # fast-math rounds differently: for the record only
SHAPES = ("qkv", "o", "gate_up", "down")  # the four PQ calls of a Llama-2-7B decoder layer


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    compiler: str  # "nvrtc" or "nvcc"
    options: tuple[str, ...] = ()
    source_dir: Path = nvrtc.SOURCE_DIR


def find_nvcc() -> str | None:
    for cand in (
        shutil.which("nvcc"),
        *(f"{os.environ[v]}/bin/nvcc" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)),
        "/usr/local/cuda/bin/nvcc",
    ):
        if cand and Path(cand).is_file():
            return cand
    return None


def variants(prev: Path | None, nvcc: str | None) -> list[Variant]:
    out = [Variant("nvrtc", "nvrtc")] + [Variant(f"nvrtc {k}", "nvrtc", o) for k, o in NVRTC_OPTION_SETS.items()]
    if nvcc:
        out.append(Variant("nvcc", "nvcc"))
    if prev is not None:
        out.append(Variant("prev nvrtc", "nvrtc", source_dir=prev))
        if nvcc:
            out.append(Variant("prev nvcc", "nvcc", source_dir=prev))
    return out


def nvcc_cubin(
    nvcc: str,
    source_dir: Path,
    file: str,
    name: str,
    arch: str,
    workdir: Path,
    include: tuple[str, ...] = (),
) -> bytes:
    """`name` of cuda/`file` compiled by nvcc to a cubin for `arch` (sm_90): one translation unit that includes the
    file and takes the instance's address (which instantiates it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(f"{source_dir}|{file}|{name}|{arch}".encode()).hexdigest()[:16]
    src, out = workdir / f"inst_{tag}.cu", workdir / f"inst_{tag}.cubin"
    src.write_text(f'#include "{file}"\nstatic auto* athena_instance = &{name};\n')
    inc = [f"-I{source_dir}"] + [f"-I{d}" for d in include]
    cmd = [
        nvcc,
        "-cubin",
        f"-arch={arch}",
        "-O3",
        "-lineinfo",
        "-std=c++17",
        *TORCH_NVCC_FLAGS,
        *inc,
        "-diag-suppress=177",
        "-o",
        str(out),
        str(src),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")
    return out.read_bytes()


class Builds:
    """The cubin of each (variant, template instance), built once: (image, lowered name)."""

    def __init__(self, arch: str, nvcc: str | None, workdir: Path, nvcc_include: tuple[str, ...] = ()):
        self.arch, self.nvcc, self.workdir, self.nvcc_include = arch, nvcc, workdir, nvcc_include
        self.tc = dataclasses.replace(nvrtc.toolchain(), cache_dir=workdir / "nvrtc_cache")
        self._done: dict = {}

    def get(self, v: Variant, file: str, name: str) -> tuple[bytes, str]:
        key = (v, file, name)
        if key not in self._done:
            # NVRTC gives the lowered (mangled) name; nvcc mangles the same way (Itanium ABI)
            image, lowered, _ = self.tc.compile(
                file, name, self.arch, v.options if v.compiler == "nvrtc" else (), v.source_dir
            )
            if v.compiler == "nvcc":
                image = nvcc_cubin(
                    self.nvcc, v.source_dir, file, name, self.arch, self.workdir / "nvcc", self.nvcc_include
                )
            self._done[key] = (image, lowered)
        return self._done[key]


def sass(image: bytes, workdir: Path) -> tuple[int, str] | None:
    """(SASS instructions, digest of their text) of a cubin, with the toolkit's cuobjdump where there is one: two builds
    with the same digest run the same machine code (cubins differ in their notes, e.g. the options)."""
    nvcc = find_nvcc()
    tool = shutil.which("cuobjdump") or (str(Path(nvcc).resolve().parent / "cuobjdump") if nvcc else None)
    if tool is None or not Path(tool).is_file():
        return None
    path = workdir / f"sass_{hashlib.sha256(image).hexdigest()[:12]}.cubin"
    path.write_bytes(image)
    res = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, timeout=120)
    lines = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", res.stdout, re.M)
    return (
        (len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16])
        if res.returncode == 0 and lines
        else None
    )


# ------------------------------------------------------------------------------------------------ GPU side
def kernel_provider(v: Variant, builds: Builds, cache: dict):
    """A stand-in for lut._kernel(name, index) that loads `v`'s cubin of the instance."""

    def provide(name: str, index: int) -> nvrtc.Kernel:
        key = (v, name, index)
        if key not in cache:
            cache[key] = nvrtc.Kernel("lut.cu", name, torch.device("cuda", index), image=builds.get(v, "lut.cu", name))
        return cache[key]

    return provide


def decode_layers(model) -> dict[str, list[tuple]]:
    """shape name -> [(PQLinear, glu)] over the decoder layers."""
    from athena_runtime.pq_linear import PQLinear
    from athena_runtime.split_linear import SplitLinear

    out: dict[str, list] = {s: [] for s in SHAPES}
    for dl in model.model.layers:
        for shape, mod in (
            ("qkv", dl.self_attn.qkv_proj),
            ("o", dl.self_attn.o_proj),
            ("gate_up", dl.mlp.gate_up_proj),
            ("down", dl.mlp.down_proj),
        ):
            glu = None
            if isinstance(mod, SplitLinear):
                glu = (mod.offsets[1], mod.sizes[0]) if shape == "gate_up" else None
                mod = mod.linear
            if isinstance(mod, PQLinear):
                out[shape].append((mod, glu))
    return out


def kernel_times(layers: dict, dev) -> dict[str, float]:
    """µs per one-token lookup-table call at each shape: calls over every decoder layer's weights (more than L2)
    replayed back to back as one CUDA graph; lut._kernel decides which cubin runs."""
    from athena_runtime.kernels.tuning import Tuning
    from bench.kernels import time_graph

    tuning, out = Tuning.for_device(dev), {}
    for shape, entries in layers.items():
        if not entries:
            continue
        plans = [lut.LutPlan(*m.kernel_args(), 1, tuning=tuning, glu=glu) for m, glu in entries]
        x = torch.randn(1, entries[0][0].geo.M, device=dev, dtype=torch.float16)
        out[shape] = time_graph(lambda p, x=x: p(x), plans, dev, replays=10)
    return out


def rebind(runner) -> None:
    """Every PQLinear binds again (new LutPlans, through lut._kernel) and the decode graphs are captured again."""
    from athena_runtime.pq_linear import PQLinear

    for m in runner.model.modules():
        if isinstance(m, PQLinear):
            m._bound = None
    runner._graphs.clear()
    torch.cuda.synchronize()


def run_gpu(args, vs: list[Variant], builds: Builds, res: dict) -> None:
    from bench.decode import decode_runner, random_runner
    from bench.random_checkpoint import LLAMA2_7B

    dev = torch.device("cuda")
    t_start = time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - t_start)  # noqa: E731
    runner, mc = random_runner(dict(LLAMA2_7B), dev, args.context, "fp16", dense=False)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, mc.vocab_size, (args.prompt,), generator=g).tolist()
    layers = decode_layers(runner.model)
    res["layers"] = {
        s: [f"{m.geo.N}x{m.geo.M}" + (f" glu{glu}" if glu else "") for m, glu in e[:1]] for s, e in layers.items()
    }
    shipped_kernel, cache = lut._kernel, {}
    ref_tokens = None
    try:
        for v in vs:  # load each variant's kernel (registers, spills) and time it alone at the 7B shapes
            row = res["variants"][v.name]
            if row.get("same_as") or row.get("error"):
                continue
            try:
                lut._kernel = kernel_provider(v, builds, cache)
                k = lut._kernel(lut.kernel_name(1, 6, 4), dev.index or 0)
                row.update(registers=k.registers, spill_bytes=k.spill_bytes, kernel_us=kernel_times(layers, dev))
            except Exception as e:  # noqa: BLE001 - one variant failing must not stop the others
                row["error"] = f"{type(e).__name__}: {e}"
                log.error("%s: %s", v.name, traceback.format_exc())
        live = [
            v for v in vs if not res["variants"][v.name].get("same_as") and not res["variants"][v.name].get("error")
        ]
        for r in range(args.rounds):
            for v in live:
                if left() < 25:
                    log.warning("budget: stopping before round %d of %s", r, v.name)
                    break
                row = res["variants"][v.name]
                try:
                    lut._kernel = kernel_provider(v, builds, cache)
                    rebind(runner)
                    decode_runner(runner, prompt, 4)  # binds, captures the batch-1 graph
                    tps, toks = decode_runner(runner, prompt, args.new)
                    row.setdefault("decode_tok_s", []).append(tps)
                    ref_tokens = ref_tokens or toks
                    row["same_tokens"] = sum(a == b for a, b in zip(toks, ref_tokens)) / len(ref_tokens)
                    log.info("round %d %s: %.1f tok/s", r, v.name, tps)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"
                    log.error("%s: %s", v.name, traceback.format_exc())
            live = [v for v in live if not res["variants"][v.name].get("error")]
        if left() > 20:  # the shipped build without CUDA graphs: per-launch host work shows here
            lut._kernel = shipped_kernel
            rebind(runner)
            runner.use_cuda_graphs = False
            try:
                tps, _ = decode_runner(runner, prompt, min(args.new, 64))
                res["variants"]["nvrtc eager"] = {"decode_tok_s": [tps], "note": "no CUDA graphs"}
            finally:
                runner.use_cuda_graphs = True
    finally:
        lut._kernel = shipped_kernel
    res["gpu_seconds"] = round(time.perf_counter() - t_start, 1)


# ------------------------------------------------------------------------------------------------ report
def table(res: dict) -> str:
    rows = res["variants"]
    base = rows.get("nvcc", {}).get("decode_tok_s") or rows.get("nvrtc", {}).get("decode_tok_s")
    base_name = "nvcc" if rows.get("nvcc", {}).get("decode_tok_s") else "nvrtc"
    base_med = statistics.median(base) if base else None
    out = [
        f"\n==== lut_kernel<1, 6, 4> builds, 7B batch-1 decode ({res.get('device', '?')}; {res.get('nvrtc', '')}; "
        f"{res.get('nvcc_version', 'no nvcc')}) ====",
        f"{'variant':20s} {'SASS':>5s} {'regs':>4s} {'spill':>5s} {'tok/s (median; rounds)':>30s} "
        f"{'vs ' + base_name:>8s}  " + " ".join(f"{s + ' µs':>10s}" for s in SHAPES),
    ]
    for name, r in rows.items():
        src = rows.get(r.get("same_as"), r) if r.get("same_as") else r
        tps = src.get("decode_tok_s") or []
        med = statistics.median(tps) if tps else None
        tok = f"{med:7.1f} ({', '.join(f'{t:.1f}' for t in tps)})" if tps else "-"
        rel = f"{med / base_med:.3f}" if med and base_med else "-"
        us = " ".join(f"{src.get('kernel_us', {}).get(s, float('nan')):10.2f}" for s in SHAPES)
        note = f"  = {r['same_as']} (same SASS)" if r.get("same_as") else ""
        note += f"  ERROR {r['error'][:120]}" if r.get("error") else ""
        note += f"  tokens same as first: {src['same_tokens']:.3f}" if src.get("same_tokens", 1) < 1 else ""
        out.append(
            f"{name:20s} {str(src.get('sass') or '-'):>5s} {str(src.get('registers', '-')):>4s} "
            f"{str(src.get('spill_bytes', '-')):>5s} {tok:>30s} {rel:>8s}  {us}{note}"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out/nvrtc_gap"))
    ap.add_argument(
        "--prev", type=Path, default=None, help="kernels/cuda/ sources from before 058451c (64-bit shared addresses)"
    )
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--budget", type=float, default=330, help="seconds for the GPU part (stops starting decode rounds)")
    ap.add_argument("--arch", default=None, help="default: the GPU's (sm_90 with --dry-run)")
    ap.add_argument("--nvcc-include", default="", help="extra include folders for nvcc, colon-separated (a PyPI nvcc)")
    ap.add_argument("--dry-run", action="store_true", help="build and compare the cubins only (no GPU needed)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.prev is not None and not (args.prev / "lut.cu").is_file():
        raise SystemExit(f"--prev {args.prev}: no lut.cu there")
    gpu = not args.dry_run and torch.cuda.is_available()
    if not gpu and not args.dry_run:
        raise SystemExit("no CUDA GPU (use --dry-run to build and compare the cubins on the CPU)")
    tc = nvrtc.toolchain()
    arch = args.arch or (
        tc.target(10 * torch.cuda.get_device_capability()[0] + torch.cuda.get_device_capability()[1])[0]
        if gpu
        else "sm_90"
    )
    nvcc = find_nvcc()
    res: dict = {
        "device": torch.cuda.get_device_name() if gpu else "cpu (dry run)",
        "arch": arch,
        "nvrtc": tc.describe(),
        "nvcc": nvcc,
        "variants": {},
    }
    if nvcc:
        v = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        res["nvcc_version"] = v[-1] if v else "?"
    work = Path(tempfile.mkdtemp(prefix="nvrtc_gap_"))
    builds = Builds(arch, nvcc, work, tuple(d for d in args.nvcc_include.split(":") if d))
    vs = variants(args.prev, nvcc)
    seen: dict[str, str] = {}
    for v in vs:  # every variant's one-token instance, built now (CPU): identical cubins are measured once
        row = res["variants"].setdefault(
            v.name, {"compiler": v.compiler, "options": list(v.options), "source_dir": str(v.source_dir)}
        )
        try:
            t0 = time.perf_counter()
            image, _ = builds.get(v, "lut.cu", lut.kernel_name(1, 6, 4))
            row["build_s"] = round(time.perf_counter() - t0, 2)
            code = sass(image, work)
            digest = code[1] if code else hashlib.sha256(image).hexdigest()[:16]
            row["code_sha"], row["sass"] = digest, code[0] if code else None
            if digest in seen:
                row["same_as"] = seen[digest]
            seen.setdefault(digest, v.name)
        except Exception as e:  # noqa: BLE001 - report it and go on
            row["error"] = f"{type(e).__name__}: {e}"
            log.error("%s: %s", v.name, traceback.format_exc())
    if gpu:
        try:
            run_gpu(args, vs, builds, res)
        except Exception as e:  # noqa: BLE001 - the table still shows what was built
            res["gpu_error"] = f"{type(e).__name__}: {e}"
            log.error("GPU part: %s", traceback.format_exc())
    (out / "nvrtc_gap.json").write_text(json.dumps(res, indent=1, default=str))
    print(table(res))
    if res.get("gpu_error"):
        print("GPU part failed:", res["gpu_error"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
