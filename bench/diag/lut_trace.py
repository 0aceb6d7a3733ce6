"""Timeline of one one-token lookup-table call, CTA by CTA: a build of the kernel source whose CTAs record
%globaltimer and clock64 at entry and exit and the SM they ran on (and %globaltimer at each ATHENA_TRACE_MARK(i) a
kernel source defines), replayed as a CUDA graph over rotating weight sets (weights from DRAM); the last call's
records are summarised per CTA kind (u, table, epilogue) and per SM (H100 diagnosis: where the time between the
first CTA's start and the last CTA's end goes; BENCHMARKS.md §3, session 8).

    python -m bench.diag.lut_trace [--shapes 11008x4096,4096x11008] [--variants base,rev:DIR] [--reps 2]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from athena_runtime.kernels import pq_cuda
from athena_runtime.kernels.cuda_build import InlineExtension
from bench.kernels import graph_of, weight_sets

_TRACE_DEVICE = r"""
__device__ unsigned long long* athena_trace_buf = nullptr;  // [grid][4]: globaltimer in/out, clock64 in/out
__device__ unsigned int* athena_trace_sm = nullptr;          // [grid]: SM id
__device__ unsigned long long* athena_trace_marks = nullptr; // [grid][8]: globaltimer at ATHENA_TRACE_MARK(i)
__device__ __forceinline__ void athena_trace_mark(int i) {
    if (athena_trace_marks != nullptr && threadIdx.x == 0) {
        unsigned long long g;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g));
        athena_trace_marks[8ull * blockIdx.x + i] = g;
    }
}
struct AthenaTraceScope {  // thread 0 of each CTA records its CTA's entry (construction) and exit (any return)
    unsigned long long g0, c0;
    __device__ AthenaTraceScope() {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g0));
        c0 = clock64();
    }
    __device__ ~AthenaTraceScope() {
        if (athena_trace_buf != nullptr && threadIdx.x == 0) {
            unsigned long long g1, c1 = clock64();
            unsigned int sm;
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1));
            asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
            unsigned long long* p = athena_trace_buf + 4ull * blockIdx.x;
            p[0] = g0; p[1] = g1; p[2] = c0; p[3] = c1;
            athena_trace_sm[blockIdx.x] = sm;
        }
    }
};
"""

_TRACE_HOST = r"""
void athena_set_trace(torch::Tensor buf, torch::Tensor sm, torch::Tensor marks) {
    unsigned long long* p = buf.numel() ? reinterpret_cast<unsigned long long*>(buf.data_ptr<int64_t>()) : nullptr;
    unsigned int* s = sm.numel() ? reinterpret_cast<unsigned int*>(sm.data_ptr<int>()) : nullptr;
    unsigned long long* m = marks.numel() ? reinterpret_cast<unsigned long long*>(marks.data_ptr<int64_t>()) : nullptr;
    C10_CUDA_CHECK(cudaMemcpyToSymbol(athena_pq::athena_trace_buf, &p, sizeof(p)));
    C10_CUDA_CHECK(cudaMemcpyToSymbol(athena_pq::athena_trace_sm, &s, sizeof(s)));
    C10_CUDA_CHECK(cudaMemcpyToSymbol(athena_pq::athena_trace_marks, &m, sizeof(m)));
}
"""

# the scope goes before the first of these lines that occurs once (the kernel's first line, before any return)
_MARKS = ("    using TabT = typename std::conditional<FP16_TABLE, __half, float>::type;\n",
          "    if ((int)blockIdx.x < rank) {  // a u CTA\n")


def traced(source: str) -> str:
    """`source` (the whole translation unit of pq_cuda) with the trace scope in the lookup kernel."""
    mark = next((m for m in _MARKS if source.count(m) == 1), None)
    if mark is None:
        raise RuntimeError("lut_trace: the kernel's first line moved; update _MARKS")
    src = source.replace("namespace athena_pq {", "namespace athena_pq {\n" + _TRACE_DEVICE, 1)
    src = src.replace("#ifndef ATHENA_TRACE_MARK", "#define ATHENA_TRACE_MARK(i) athena_trace_mark(i)\n#ifndef ATHENA_TRACE_MARK", 1)
    return src.replace(mark, "    AthenaTraceScope athena_trace_scope;\n" + mark, 1) + _TRACE_HOST


def trace_extension(source_fn, tag: str, mod=pq_cuda) -> InlineExtension:
    return InlineExtension("athena_pq_cuda_trace", f"the CUDA PQ decode kernel, traced ({tag})",
                           mod._CPP_DECL + "void athena_set_trace(torch::Tensor buf, torch::Tensor sm, torch::Tensor marks);\n",
                           lambda: traced(source_fn()), ["pq_lut_gemv", "athena_set_trace"])


def one_trace(call, sets, ext, dev, grid_max=8192):
    """Replays `call` over all sets as one graph, returns the last call's records (int64 [grid, 4], sm [grid],
    marks int64 [grid, 8])."""
    buf = torch.zeros(grid_max, 4, device=dev, dtype=torch.int64)
    sm = torch.full((grid_max,), -1, device=dev, dtype=torch.int32)
    mod = ext.load()
    marks = torch.zeros(grid_max, 8, device=dev, dtype=torch.int64)
    mod.athena_set_trace(buf, sm, marks)
    g = graph_of(call, sets)
    out = []
    for _ in range(3):
        buf.zero_()
        sm.fill_(-1)
        marks.zero_()
        g.replay()
        torch.cuda.synchronize()
        out.append((buf.cpu(), sm.cpu(), marks.cpu()))
    none = torch.empty(0, device=dev, dtype=torch.int64)
    mod.athena_set_trace(none, torch.empty(0, device=dev, dtype=torch.int32), none)
    return out[-1]


def summarise(buf, sm, kinds, marks=None):
    """kinds: list of (name, first CTA, end CTA). Times in µs from the first CTA's entry (globaltimer)."""
    n = sum(e - b for _, b, e in kinds)
    rec = buf[:n]
    t0 = int(rec[:, 0].min())
    rel = (rec[:, :2] - t0).double() / 1e3
    ghz = statistics.median(((rec[i, 3] - rec[i, 2]).item() / max(1, (rec[i, 1] - rec[i, 0]).item()))
                            for i in range(n) if rec[i, 1] - rec[i, 0] > 2000)
    row = {"span": float(rel[:, 1].max()), "ghz": ghz}
    for name, b, e in kinds:
        if e <= b:
            continue
        st, en = rel[b:e, 0], rel[b:e, 1]
        dur = (rec[b:e, 3] - rec[b:e, 2]).double() / ghz / 1e3
        row[name] = dict(n=e - b, start=(float(st.min()), float(st.median()), float(st.max())),
                         end=(float(en.min()), float(en.median()), float(en.max())),
                         dur=(float(dur.min()), float(dur.median()), float(dur.max())))
    # per SM: table CTAs per SM and when the SM's last table CTA ended
    name, b, e = next(k for k in kinds if k[0] == "table")
    per_sm: dict[int, list[float]] = {}
    for i in range(b, e):
        per_sm.setdefault(int(sm[i]), []).append(float(rel[i, 1]))
    counts: dict[int, list[float]] = {}
    for ends in per_sm.values():
        counts.setdefault(len(ends), []).append(max(ends))
    row["sm_load"] = {c: (len(v), statistics.median(v), max(v)) for c, v in sorted(counts.items())}
    if marks is not None:  # ATHENA_TRACE_MARK(i) of the table CTAs: median µs after the CTA's entry
        mk = marks[b:e]
        row["marks"] = [statistics.median(((mk[k, i] - rec[b + k, 0]).item() / 1e3) for k in range(e - b))
                        if bool((mk[:, i] > 0).all()) else None for i in range(8)]
    row["sms_used"] = len(per_sm)
    return row


def fmt(name, r):
    s = f"  {name}: span {r['span']:.2f} µs (SM clock {r['ghz']:.2f} GHz), SMs with table CTAs {r['sms_used']}\n"
    for k in ("u", "table", "epi"):
        if k in r:
            v = r[k]
            s += (f"    {k:5s} n={v['n']:4d} start {v['start'][0]:5.2f}/{v['start'][1]:5.2f}/{v['start'][2]:5.2f} "
                  f"end {v['end'][0]:5.2f}/{v['end'][1]:5.2f}/{v['end'][2]:5.2f} "
                  f"dur {v['dur'][0]:5.2f}/{v['dur'][1]:5.2f}/{v['dur'][2]:5.2f} (min/med/max µs)\n")
    if r.get("marks") and any(m is not None for m in r["marks"]):
        s += "    table CTA marks (median µs after entry): " + ", ".join(
            f"{i}: {m:.2f}" for i, m in enumerate(r["marks"]) if m is not None) + "\n"
    s += "    table CTAs per SM: " + ", ".join(f"{c} on {n} SMs (last end med {m:.2f}, max {x:.2f})"
                                             for c, (n, m, x) in r["sm_load"].items())
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="11008x4096,4096x11008,4096x4096,14336x4096")
    ap.add_argument("--variants", default="base", help="source variants (bench.diag.lut_parts.source_variant names, "
                    "'base': the runtime's source, 'rev:DIR': another revision's, as bench.diag.t1_ab_rev loads it)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from bench.diag.lut_parts import source_variant
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    from bench.diag.t1_ab_rev import load_old
    mods, exts = {}, {}
    for v in args.variants.split(","):
        mods[v] = load_old(v[4:]) if v.startswith("rev:") else pq_cuda
        src = mods[v].cuda_source if v == "base" or v.startswith("rev:") else source_variant(v)
        exts[v] = trace_extension(src, v, mods[v])
    defaults = {v: m.EXTENSION for v, m in mods.items()}
    try:
        for sh in args.shapes.split(","):
            N, M = (int(v) for v in sh.split("x"))
            rank = max(1, round(0.01 * min(N, M)))
            sets = weight_sets(N, M, rank, dev, l2, seed=N)
            x = torch.randn(1, M, device=dev).half()
            geo = sets[0]["geo"]
            print(f"== {sh}", flush=True)
            for v, ext in exts.items():
                mod = mods[v]
                mod.EXTENSION = ext
                ext.load()

                def call(L, mod=mod):
                    return mod.pq_gemv_cuda(x, L["qweight"], L["codebook"], geo, L["A"], L["B"], fused_epilogue=True)

                _, n_row = mod.row_chunks(geo, mod.t1_rows_per_chunk(geo, dev))  # the runtime's one-token launch
                n_table = n_row * (geo.GW // mod.T1_SLAB_W)
                rk = sets[0]["B"].shape[0]
                spans = []
                for rep in range(args.reps):
                    buf, sm, marks = one_trace(call, sets, ext, dev)
                    grid = int((sm >= 0).sum())  # every CTA records itself: the epilogue CTAs are the rest
                    kinds = [("u", 0, rk), ("table", rk, rk + n_table), ("epi", rk + n_table, grid)]
                    r = summarise(buf, sm, kinds, marks)
                    spans.append(r["span"])
                    if rep == args.reps - 1:
                        print(fmt(v, r), flush=True)
                print(f"  {v}: spans {', '.join(f'{s:.2f}' for s in spans)} µs", flush=True)
            del sets
            torch.cuda.empty_cache()
    finally:
        for v, m in mods.items():
            m.EXTENSION = defaults[v]


if __name__ == "__main__":
    main()
