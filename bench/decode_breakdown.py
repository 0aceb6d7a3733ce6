"""Where one batch-1 decode step's time goes, by part of the model, with the CUDA graph replay accounted for.

A CUDA graph replay shows the profiler its kernels but not the Python modules that launched them. So the
decode forward is first run eagerly under the profiler with each module wrapped in a `cat::<category>` scope
(the same function the graph captured: ModelRunner._graph_forward), which names the category of every kernel
in launch order; the replays are then profiled and their kernels matched, in order, to that sequence. Kernels of
a step that are not in the sequence ran outside the graph (input copies, the logits clone, argmax). A kernel
without a scope (or when the eager sequence is not found in the replays) is classified by its name (CATEGORY_BY_NAME).

Per step: GPU time per category, the GPU's idle time between the graph's kernels ("gaps inside the graph"), and
the rest of the wall-clock step (host work between replays: input copies' launch, replay launch, logits clone,
argmax, Python) as "outside the graph".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")
# name patterns for kernels without a module scope (first match wins)
CATEGORY_BY_NAME = (
    ("RoPE", r"rope"),
    ("KV-cache write", r"kv_write|scatter_pair|index_put|scatter"),
    ("attention", r"paged|attention|attn|combine_splits|flash"),
    ("norms (+ residual add)", r"rmsnorm|norm"),
    ("activation (SiLU x up)", r"silu|gelu"),
    ("sampling (argmax)", r"argmax|arg_max|ArgMax"),
    ("input copies (H2D)", r"Memcpy HtoD|memcpy.*HtoD"),
    ("linear layers", r"gemv|gemm|cutlass|xmma|splitk|pq_|lut|frag|dequant|fold|Kernel2"),
)


def module_category(qualname: str, type_name: str) -> str | None:
    """The breakdown category of a module of the model (None: not one of ours; its kernels go to the parent's)."""
    parts = qualname.split(".")
    last = parts[-1]
    if "lm_head" in parts:
        return "lm_head"
    if any(p in LINEAR_NAMES for p in parts):  # also the layer inside a fused one (gate_up_proj.linear: the PQ
        return "linear layers"  # gate/up call, SiLU x up in its epilogue, is made through it)
    if last == "embed_tokens":
        return "embedding"
    if type_name == "RMSNorm":
        return "norms (+ residual add)"
    if type_name == "RotaryEmbedding":
        return "RoPE"
    if type_name == "Attention":
        return "attention"
    if type_name == "MLP":
        return "activation (SiLU x up)"
    return None


def refine(category: str, kernel: str) -> str:
    """Inside the attention module's own scope, RoPE and the KV-cache write are told apart by kernel name."""
    if category == "attention":
        for cat, pat in CATEGORY_BY_NAME[:2]:
            if re.search(pat, kernel, re.I):
                return cat
    return category


def by_name(kernel: str, default: str = "other") -> str:
    for cat, pat in CATEGORY_BY_NAME:
        if re.search(pat, kernel, re.I):
            return cat
    return default


@dataclass(frozen=True)
class GpuEvent:
    name: str
    start_us: float
    end_us: float

    @property
    def us(self) -> float:
        return self.end_us - self.start_us


def busy_us(events: list[GpuEvent]) -> float:
    """GPU time covered by at least one event (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for e in sorted(events, key=lambda e: e.start_us):
        if e.end_us <= end:
            continue
        total += e.end_us - max(e.start_us, end)
        end = e.end_us
    return total


def split_replays(events: list[GpuEvent], sequence: list[str]) -> tuple[list[list[int]], list[int]]:
    """Match the graph's kernel `sequence` (names, launch order) in the replays' `events` (by start time).
    Returns (for each complete replay the indices of its events in order, the indices of every other event)."""
    replays, outside, cur = [], [], []
    for i, e in enumerate(events):
        if sequence and e.name == sequence[len(cur)]:
            cur.append(i)
            if len(cur) == len(sequence):
                replays.append(cur)
                cur = []
        else:
            outside.append(i)
    outside.extend(cur)  # an incomplete last replay
    return replays, sorted(outside)


def breakdown(events: list[GpuEvent], sequence: list[tuple[str, str]], steps: int, wall_us_per_step: float) -> dict:
    """Per-step µs by category from the profiled replays `events` (all GPU events of `steps` steps) and the eager
    `sequence` [(kernel name, category)]. Falls back to names alone when no replay matches the sequence."""
    events = sorted(events, key=lambda e: e.start_us)
    names = [n for n, _ in sequence]
    replays, outside = split_replays(events, names)
    per_cat: dict[str, float] = {}
    calls: dict[str, float] = {}
    method = "eager sequence matched in the replays"
    if not replays:
        method = "kernel names only (the eager sequence was not found in the replays)"
        for e in events:
            c = by_name(e.name)
            per_cat[c] = per_cat.get(c, 0.0) + e.us
            calls[c] = calls.get(c, 0) + 1
        n_steps = steps
        span = busy_us(events)
        gaps = 0.0
    else:
        n_steps = len(replays)
        span = gaps = 0.0
        for idx in replays:
            evs = [events[i] for i in idx]
            for (_, cat), e in zip(sequence, evs):
                c = refine(cat, e.name) if cat else by_name(e.name, "other (in the graph)")
                per_cat[c] = per_cat.get(c, 0.0) + e.us
                calls[c] = calls.get(c, 0) + 1
            s = evs[-1].end_us - evs[0].start_us
            span += s
            gaps += s - busy_us(evs)
        for i in outside:
            e = events[i]
            c = "outside the graph: " + by_name(e.name, "logits clone / other")
            per_cat[c] = per_cat.get(c, 0.0) + e.us
            calls[c] = calls.get(c, 0) + 1
    rows = {c: {"us": v / n_steps, "calls": calls[c] / n_steps} for c, v in per_cat.items()}
    graph_span = span / n_steps
    if replays:
        rows["gaps inside the graph (GPU idle between its kernels)"] = {"us": gaps / n_steps, "calls": 0}
    outside_gpu = sum(v["us"] for c, v in rows.items() if c.startswith("outside the graph"))
    rows["host between replays (wall - graph span - GPU work outside it)"] = {
        "us": max(0.0, wall_us_per_step - graph_span - outside_gpu),
        "calls": 0,
    }
    return {
        "method": method,
        "steps_matched": len(replays),
        "kernels_per_replay": len(sequence),
        "wall_us_per_step": wall_us_per_step,
        "graph_span_us": graph_span,
        "rows": rows,
    }
