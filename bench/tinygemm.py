"""PyTorch's int4 "tinygemm" (torch._weight_int4pack_mm, group 128, bf16 activations: the kernel of gpt-fast and
torchao's int4 weight-only layout) against cuBLAS fp16 at the linear shapes of a Llama model: per layer shape, and
all the decode step's linear layers plus the fp16 lm_head as one step (an estimate of a tinygemm 7B decode step
without attention, norms or sampling).

    python -m bench.tinygemm [--shape llama2-7b|tiny] [--tokens 1] [--layers 32] [--json]

Every measured call reads its own weights (one copy per layer, as in a model: no L2 reuse between calls), replayed
from a CUDA graph (so launch costs are the graph's); on the CPU (the tiny shape, a check of the plumbing) the
`_for_cpu` variants of the two ops are timed with the wall clock instead. int4 weights: asymmetric min/max per
group of 128 input columns, dequantized by the kernel as (q - 8) * scale + zero (bf16 scale and zero), 4.25 bits
per weight with them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch

GROUP = 128
INNER_K_TILES = 8


def layer_linears(cfg: dict) -> list[tuple[str, int, int]]:
    """(name, out features N, in features K) of one decoder layer's linear layers (unfused, as in the checkpoint)."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return [
        ("q_proj", q, h),
        ("k_proj", kv, h),
        ("v_proj", kv, h),
        ("o_proj", h, q),
        ("gate_proj", f, h),
        ("up_proj", f, h),
        ("down_proj", h, f),
    ]


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes int32 [N, K] in 0..15, scale_and_zero bf16 [K/GROUP, N, 2]) with w ~ (q - 8) * s + z."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    zero = lo + 8 * scale
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return q, sz


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    s = sz[..., 0].float().repeat_interleave(GROUP, 0).T
    z = sz[..., 1].float().repeat_interleave(GROUP, 0).T
    return (q.float() - 8) * s + z


@dataclass(frozen=True)
class Int4Weight:
    packed: torch.Tensor
    scale_zero: torch.Tensor

    @staticmethod
    def from_codes(q: torch.Tensor, sz: torch.Tensor) -> "Int4Weight":
        if q.is_cuda:
            u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            return Int4Weight(torch._convert_weight_to_int4pack(u8, INNER_K_TILES), sz)
        return Int4Weight(torch._convert_weight_to_int4pack_for_cpu(q, INNER_K_TILES), sz)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return torch._weight_int4pack_mm(x, self.packed, GROUP, self.scale_zero)
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scale_zero)

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale_zero.numel() * 2


def check_error(n: int, k: int, tokens: int, device) -> float:
    """max |tinygemm - reference| / max |reference| at one shape, the reference the fp32 product with the
    dequantized weights (tells that codes and scales are laid out as the kernel reads them)."""
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(n, k, generator=g, device=device) * 0.02
    q, sz = quantize_int4(w)
    x = torch.randn(tokens, k, generator=g, device=device).to(torch.bfloat16)
    ref = x.float() @ dequantize_int4(q, sz).T
    out = Int4Weight.from_codes(q, sz).mm(x).float()
    return float((out - ref).abs().max() / ref.abs().max())


class _Timer:
    """Seconds per call of fn (a list of calls made in order): a CUDA graph replayed with events, or the wall clock."""

    def __init__(self, fns, device, reps: int):
        self.fns, self.device, self.reps = fns, device, reps
        self.graph = None
        if device.type == "cuda":
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for f in fns:
                    f()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                for f in fns:
                    f()

    def seconds(self) -> float:
        """Median over `reps` runs of the whole list, in seconds per run."""
        times = []
        for _ in range(self.reps + 2):
            if self.graph is not None:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                self.graph.replay()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                for f in self.fns:
                    f()
                times.append(time.perf_counter() - t0)
        return statistics.median(times[2:])


class TinygemmBench:
    """Weights of every linear layer of `cfg` in both formats on `device`; `measure()` can be called again later
    (the peers benchmark times once while llama.cpp builds and again on a quiet machine)."""

    def __init__(self, cfg: dict, device, tokens: int = 1, layers: int | None = None, reps: int = 20):
        self.cfg, self.device, self.tokens = cfg, torch.device(device), tokens
        self.layers = layers or cfg["num_hidden_layers"]
        gen = torch.Generator(device=self.device).manual_seed(0)
        half = torch.float16 if self.device.type == "cuda" else torch.float32
        self.fp16: dict[str, list[torch.Tensor]] = {}
        self.int4: dict[str, list[Int4Weight]] = {}
        for name, n, k in layer_linears(cfg):
            self.fp16[name], self.int4[name] = [], []
            for _ in range(self.layers):
                w = (torch.randn(n, k, generator=gen, device=self.device) * 0.02).to(half)
                self.int4[name].append(Int4Weight.from_codes(*quantize_int4(w)))
                self.fp16[name].append(w)
        self.lm_head = (
            torch.randn(cfg["vocab_size"], cfg["hidden_size"], generator=gen, device=self.device) * 0.02
        ).to(half)
        self.x16 = {
            k: torch.randn(tokens, k, generator=gen, device=self.device).to(half)
            for k in {k for _, _, k in layer_linears(cfg)}
        }
        self.xbf = {k: v.to(torch.bfloat16) for k, v in self.x16.items()}
        self.error = check_error(*layer_linears(cfg)[0][1:], tokens, self.device)
        shapes = {}
        for name, n, k in layer_linears(cfg):
            shapes.setdefault((n, k), []).append(name)
        self.shapes = shapes
        self.timers = {}
        for (n, k), names in shapes.items():
            name = names[0]
            self.timers[("fp16", n, k)] = _Timer([self._lin(w, k) for w in self.fp16[name]], self.device, reps)
            self.timers[("int4", n, k)] = _Timer([self._i4(w, k) for w in self.int4[name]], self.device, reps)
        head = self._lin(self.lm_head, cfg["hidden_size"])
        order = [name for name, _, _ in layer_linears(cfg)]
        ks = {name: k for name, _, k in layer_linears(cfg)}
        self.timers["step_fp16"] = _Timer(
            [self._lin(self.fp16[n][i], ks[n]) for i in range(self.layers) for n in order] + [head], self.device, reps
        )
        self.timers["step_int4"] = _Timer(
            [self._i4(self.int4[n][i], ks[n]) for i in range(self.layers) for n in order] + [head], self.device, reps
        )

    def _lin(self, w, k):
        x = self.x16[k]
        return lambda: torch.nn.functional.linear(x, w)

    def _i4(self, w: Int4Weight, k):
        x = self.xbf[k]
        return lambda: w.mm(x)

    def step_bytes(self, fmt: str) -> int:
        """Weight bytes one decode step reads: the layers' linears in `fmt` plus the fp16 lm_head."""
        head = self.lm_head.numel() * 2
        if fmt == "int4":
            return head + sum(w.nbytes() for ws in self.int4.values() for w in ws)
        return head + sum(w.numel() * 2 for ws in self.fp16.values() for w in ws)

    def measure(self, bandwidth: float) -> dict:
        """Per shape: µs per call of each format and the ratio; the whole step: ms, tok/s, % of bandwidth limit."""
        rows = []
        for (n, k), names in self.shapes.items():
            t16 = self.timers[("fp16", n, k)].seconds() / self.layers
            t4 = self.timers[("int4", n, k)].seconds() / self.layers
            rows.append(
                {
                    "shape": f"{n}x{k}",
                    "layers": names,
                    "fp16_us": t16 * 1e6,
                    "int4_us": t4 * 1e6,
                    "speedup": t16 / t4,
                    "int4_gb_s": (n * k * (4 + 32 / GROUP) / 8) / t4 / 1e9,
                }
            )
        step = {}
        for fmt in ("fp16", "int4"):
            t = self.timers[f"step_{fmt}"].seconds()
            b = self.step_bytes(fmt)
            step[fmt] = {
                "ms": t * 1e3,
                "tok_s": self.tokens / t,
                "bytes": b,
                "limit_tok_s": bandwidth / b,
                "pct_limit": 100 * (b / bandwidth) / t,
            }
        return {
            "dense": "cuBLAS fp16" if self.device.type == "cuda" else "torch fp32 (CPU)",
            "tokens": self.tokens,
            "layers": self.layers,
            "group": GROUP,
            "bits_per_weight": 4 + 32 / GROUP,
            "rel_error_vs_dequant": self.error,
            "shapes": rows,
            "step": step,
        }


def print_result(res: dict, device_name: str) -> None:
    print(
        f"\n{device_name}: int4 tinygemm g{res['group']} ({res['bits_per_weight']:.2f} bits) vs {res['dense']}, "
        f"{res['tokens']} token(s), {res['layers']} layers; rel. error vs dequantized reference "
        f"{res['rel_error_vs_dequant']:.1e}"
    )
    print(f"{'shape NxK':>12s} {'dense us':>8s} {'int4 us':>8s} {'speedup':>8s} {'int4 GB/s':>9s}  layers")
    for r in res["shapes"]:
        print(
            f"{r['shape']:>12s} {r['fp16_us']:8.1f} {r['int4_us']:8.1f} {r['speedup']:7.2f}x {r['int4_gb_s']:9.0f}  "
            f"{','.join(r['layers'])}"
        )
    for fmt, s in res["step"].items():
        print(
            f"whole step (linears + fp16 lm_head), {fmt}: {s['ms']:.3f} ms, {s['tok_s']:.1f} tok/s, "
            f"{s['pct_limit']:.0f}% of its bandwidth limit ({s['bytes'] / 1e9:.2f} GB/token)"
        )


def main(argv=None) -> int:
    from bench.decode import copy_bandwidth
    from bench.random_gguf import shape_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bench = TinygemmBench(shape_config(args.shape), dev, args.tokens, args.layers)
    res = bench.measure(copy_bandwidth(dev))
    print_result(res, torch.cuda.get_device_name() if dev.type == "cuda" else "cpu")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
