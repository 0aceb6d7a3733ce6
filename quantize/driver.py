"""The layer-by-layer quantization driver: model walking, calibration activations, resume.

One decoder layer lives on the device at a time. For each layer: collect one Hessian per distinct
input (q/k/v share one, gate/up share one) from the calibration activations, quantize its linear
layers (Athena, GPTQ or RTN), write the finished layer to disk at once, then propagate the
activations through the *quantized* layer (weights rebuilt from the stored tensors, so a resumed run
sees bit-identical activations).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from athena_runtime.format import checkpoint
from athena_runtime.format.layers import layer_from_tensors
from athena_runtime.format.source import load_hf_model, load_tokenizer, resolve_source
from quantize.allocate import BitBudget
from quantize.athena import quantize_athena
from quantize.calibration import CalibConfig, calibration_batch
from quantize.finetune import FinetuneConfig, finetune_block
from quantize.gptq import quantize_gptq
from quantize.hessian import HessianAccumulator
from quantize.recipe import AthenaRecipe, ScalarRecipe
from quantize.rtn import quantize_rtn

log = logging.getLogger(__name__)

# Linear layers of one decoder layer, grouped by the input they read (one Hessian per group).
LINEAR_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
METHODS = ("athena", "gptq", "rtn")


@dataclass(frozen=True)
class QuantizeJob:
    model: str
    out: str
    method: str = "athena"
    athena: AthenaRecipe = field(default_factory=AthenaRecipe)
    scalar: ScalarRecipe = field(default_factory=ScalarRecipe)
    calib: CalibConfig = field(default_factory=CalibConfig)
    device: str | None = None  # None: cuda when available, else cpu
    resume: bool = False
    batch_size: int = 8  # calibration samples per forward chunk
    budget: BitBudget | None = None  # --target-bits: per-layer (d, n) from the menu, the rest from `athena`
    finetune: FinetuneConfig | None = None  # --finetune: block-wise tuning of the continuous parameters

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.budget is not None and self.method != "athena":
            raise ValueError("--target-bits allocates Athena recipes: it needs --method athena")
        if self.finetune is not None and self.method != "athena":
            raise ValueError("--finetune tunes Athena layers (codebooks, low-rank factors, row scales): needs athena")

    def recipe_dict(self) -> dict:
        if self.method != "athena":
            return dataclasses.asdict(self.scalar)
        recipe = dataclasses.asdict(self.athena)
        if self.budget is not None:  # d and n are per layer (athena.json layers[P])
            recipe = {k: v for k, v in recipe.items() if k not in ("d", "n")}
            recipe["budget"] = dataclasses.asdict(self.budget)
        if self.finetune is not None:
            recipe["finetune"] = dataclasses.asdict(self.finetune)
        return recipe

    def identity(self) -> dict:
        """What must match for --resume to continue a run."""
        ident = {
            "model": str(Path(self.model).resolve()),
            "method": self.method,
            "recipe": self.recipe_dict(),
            "calib": dataclasses.asdict(self.calib),
        }
        return json.loads(json.dumps(ident))  # tuples -> lists, as read back from job.json


# ---------------------------------------------------------------- running one HF decoder layer


@dataclass
class LayerContext:
    """What a Hugging Face decoder layer needs besides the hidden states — built here, never taken
    from the model's own forward kwargs (those carry its KV-cache object, which would leak context
    from one calibration sample into the next)."""

    position_ids: torch.Tensor  # [1, S]
    position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer type -> cos, sin (Gemma 3: two RoPEs)
    masks: dict[str, torch.Tensor | None]  # layer type -> additive mask [1, 1, S, S]; None: causal (SDPA is_causal)
    layer_types: list[str]


def _layer_types(config, num_layers: int) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    window = getattr(config, "sliding_window", None)
    use = getattr(config, "use_sliding_window", True)
    return ["sliding_attention" if (window and use) else "full_attention"] * num_layers


def build_context(model, seqlen: int, device, dtype) -> LayerContext:
    config = model.config
    layers = model.model.layers
    pos = torch.arange(seqlen, device=device).unsqueeze(0)
    dummy = torch.zeros(1, seqlen, config.hidden_size, device=device, dtype=dtype)
    rotary = model.model.rotary_emb.to(device)
    types = _layer_types(config, len(layers))
    if getattr(rotary, "layer_types", None):  # Gemma 3: one RoPE per layer type
        rope = {t: tuple(x.to(dtype) for x in rotary(dummy, pos, t)) for t in set(types)}
    else:
        cos, sin = rotary(dummy, pos)
        rope = {t: (cos.to(dtype), sin.to(dtype)) for t in set(types)}
    i = torch.arange(seqlen, device=device)
    dist = i[:, None] - i[None, :]  # query - key
    neg = torch.finfo(dtype).min
    masks: dict[str, torch.Tensor | None] = {"full_attention": None}  # SDPA's causal kernel, no [S, S] mask to read
    window = getattr(config, "sliding_window", None)
    if window:
        allowed = (dist >= 0) & (dist < window)
        masks["sliding_attention"] = torch.where(allowed, 0.0, neg).to(dtype)[None, None]
    return LayerContext(pos, rope, masks, types)


def _call_layer(layer, index: int, x: torch.Tensor, ctx: LayerContext, params: dict | None = None) -> torch.Tensor:
    """Decoder layer `index` on one batch x [b, S, H] (in the layer's dtype); `params` (parameter name -> tensor)
    stand in for the layer's own (torch.func.functional_call), for fine-tuning."""
    p = next(layer.parameters())
    mask = ctx.masks[ctx.layer_types[index]]
    kwargs = dict(
        attention_mask=None if mask is None else mask.to(p.dtype),
        position_ids=ctx.position_ids,
        position_embeddings=tuple(t.to(p.dtype) for t in ctx.position_embeddings[ctx.layer_types[index]]),
        use_cache=False,
    )
    if params is None:
        y = layer(x.to(p.dtype), **kwargs)
    else:
        y = torch.func.functional_call(layer, params, (x.to(p.dtype),), kwargs)
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def run_layer(layer, index: int, inps: torch.Tensor, ctx: LayerContext, batch_size: int) -> torch.Tensor:
    """inps [ns, S, H] -> outputs [ns, S, H] of decoder layer `index` (same dtype/device as inps)."""
    outs = torch.empty_like(inps)
    for s in range(0, inps.shape[0], batch_size):
        outs[s : s + batch_size] = _call_layer(layer, index, inps[s : s + batch_size], ctx).to(inps.dtype)
    return outs


@torch.no_grad()
def embed(model, ids: torch.Tensor, device, dtype) -> torch.Tensor:
    return model.model.embed_tokens(ids).to(device=device, dtype=dtype)


# ---------------------------------------------------------------- one layer


def _submodule(layer, name: str):
    mod = layer
    for part in name.split("."):
        mod = getattr(mod, part)
    return mod


class _InputsSeen(Exception):
    """Raised by the last Hessian hook of a batch: the rest of the layer's forward is not needed."""


@torch.no_grad()
def collect_hessians(layer, index, inps, ctx, batch_size) -> dict[str, HessianAccumulator]:
    """One Hessian per linear group from the inputs the (unquantized) layer feeds them. Each batch's
    forward stops at the last group's input (the down projection and what follows it are not run)."""
    accs: dict[str, HessianAccumulator] = {}
    hooks = []
    last_group = LINEAR_GROUPS[-1]
    for group in LINEAR_GROUPS:
        mod = _submodule(layer, group[0])
        acc = HessianAccumulator(mod.in_features, device=inps.device)
        accs[group[0]] = acc

        def hook(m, args, acc=acc, last=group is last_group):
            acc.add_batch(args[0])
            if last:
                raise _InputsSeen

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for s in range(0, inps.shape[0], batch_size):
            x = inps[s : s + batch_size]
            try:
                _call_layer(layer, index, x, ctx)
            except _InputsSeen:
                pass
            seen = {name: acc.nsamples for name, acc in accs.items()}
            if len(set(seen.values())) != 1:  # a group's input came after the last group's: none may be missed
                raise RuntimeError(f"collect_hessians: layer {index} fed its linear groups unevenly: {seen}")
    finally:
        for h in hooks:
            h.remove()
    return accs


@contextlib.contextmanager
def _cpu_threads(n: int | None):
    """The quantizers issue many small ops: on a busy CPU, one thread beats two that stall each other."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def quantize_group(
    weights: list[torch.Tensor], H: torch.Tensor | None, job: QuantizeJob, recipes: list[AthenaRecipe] | None = None
) -> list[tuple[object, dict]]:
    """Quantize matrices that share H; Athena matrices with one recipe run as one batched call."""
    if job.method == "athena":
        recipes = recipes or [job.athena] * len(weights)
        out: list = [None] * len(weights)
        for recipe in dict.fromkeys(recipes):
            mine = [i for i, r in enumerate(recipes) if r == recipe]
            for i, res in zip(mine, quantize_athena([weights[i] for i in mine], H, recipe)):
                out[i] = res
        return out
    if job.method == "gptq":
        return [quantize_gptq(w, H, job.scalar) for w in weights]
    return [quantize_rtn(w, job.scalar, H) for w in weights]


@torch.no_grad()
def quantize_layer(layer, index: int, prefix: str, inps, ctx, job: QuantizeJob, plan: dict | None = None):
    """Quantize every linear of one decoder layer in place (`plan`: full name -> AthenaRecipe, from
    --target-bits). Returns (tensors, stats)."""
    accs = collect_hessians(layer, index, inps, ctx, job.batch_size)
    tensors: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    for group in LINEAR_GROUPS:
        mods = [_submodule(layer, n) for n in group]
        H = accs[group[0]].hessian(0.0)  # undamped: the algorithms damp it (recipe.damp) and score on it
        t0 = time.perf_counter()
        with _cpu_threads(1 if H.device.type == "cpu" else None):
            recipes = [plan[f"{prefix}.{n}"] for n in group] if plan else None
            results = quantize_group([m.weight.detach().float() for m in mods], H, job, recipes)
        seconds = (time.perf_counter() - t0) / len(mods)
        for name, mod, (qlayer, st) in zip(group, mods, results):
            full = f"{prefix}.{name}"
            if mod.bias is not None:
                qlayer.bias = mod.bias.detach().to(torch.float16).cpu()
            part = {k: v.cpu() for k, v in qlayer.to_tensors(full).items()}
            tensors.update(part)
            meta = qlayer.meta()
            # The layer as stored: rebuild from the tensors so resumed and fresh runs agree bit for bit.
            stored = layer_from_tensors(full, part, meta)
            mod.weight.copy_(stored.dequantize().to(mod.weight.dtype))
            stats[full] = dict(
                meta,
                bits_per_weight=8.0 * stored.stored_bytes() / (mod.out_features * mod.in_features),
                proxy_loss=float(st.get("proxy_loss", float("nan"))),
                seconds=float(st.get("seconds", seconds)),
            )
            if plan:
                stats[full]["recipe"] = recipe_name(plan[full])
    return tensors, stats


@torch.no_grad()
def finetune_layer(layer, reference, index: int, prefix: str, inps, ctx, job: QuantizeJob, part: dict, stats: dict):
    """--finetune on one freshly quantized layer (quantize/finetune.py), toward `reference` (the layer before
    quantization) on the calibration activations; updates the layer, `part` (stored tensors, plus the tuned norm
    weights) and `stats` (``finetune_rel_err_before`` / ``_after`` / ``_kept`` per linear) in place."""
    targets = run_layer(reference, index, inps, ctx, job.batch_size)  # [ns, S, H]
    linears = {name[len(prefix) + 1 :]: layer_from_tensors(name, part, meta) for name, meta in stats.items()}
    norms = {
        n: p.detach().clone()
        for n, p in layer.named_parameters()
        if n.rsplit(".", 1)[0] not in linears  # the layer's own weights beside its linears: its norms
    }

    def forward(params, x):
        named = {(f"{n}.weight" if n in linears else n): v for n, v in params.items()}
        return _call_layer(layer, index, x, ctx, named)

    with torch.enable_grad(), _cpu_threads(1 if inps.device.type == "cpu" else None):  # small ops: see _cpu_threads
        tuned, tuned_norms, st = finetune_block(forward, inps, targets, linears, norms, job.finetune)
    log.info(
        "layer %d fine-tuned: relative output error %.5f -> %.5f (%s, %.1f s)",
        index,
        st["rel_err_before"],
        st["rel_err_after"],
        "kept" if st["kept"] else "not better: kept as quantized",
        st["seconds"],
    )
    for name, qlayer in tuned.items():
        full = f"{prefix}.{name}"
        part.update({k: v.cpu() for k, v in qlayer.to_tensors(full).items()})
        stored = layer_from_tensors(full, part, stats[full])
        mod = _submodule(layer, name)
        mod.weight.copy_(stored.dequantize().to(mod.weight.dtype))
        stats[full].update(
            finetune_rel_err_before=st["rel_err_before"],
            finetune_rel_err_after=st["rel_err_after"],
            finetune_kept=st["kept"],
            seconds=stats[full]["seconds"] + st["seconds"] / len(tuned),
        )
    for n, v in tuned_norms.items():
        layer.get_parameter(n).copy_(v)  # fp16-rounded already: as stored, so a resumed run sees the same layer
        part[f"{prefix}.{n}"] = v.to(torch.float16).cpu()


# ---------------------------------------------------------------- the whole model


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def run(job: QuantizeJob, stop_after_layers: int | None = None) -> dict:
    """Quantize `job.model` into `job.out`. Returns the written athena.json as a dict.

    `stop_after_layers` interrupts the run after that many newly quantized layers (for tests of --resume).
    """
    t_start = time.perf_counter()
    device = pick_device(job.device)
    job = dataclasses.replace(job, calib=job.calib.resolved(device.type))
    src = resolve_source(job.model)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_job(out, job.identity(), job.resume)

    on_gpu = device.type == "cuda"
    act_dtype = torch.float16 if on_gpu else torch.float32
    model = load_hf_model(src.path, dtype=torch.float16 if on_gpu else torch.float32)
    tokenizer = load_tokenizer(src.path)
    ids = calibration_batch(tokenizer, job.calib)  # [ns, S]
    layers = model.model.layers
    log.info(
        "quantizing %s (%s, %d layers) with %s on %s; calibration %d x %d tokens",
        src.original,
        src.model_type,
        len(layers),
        job.method,
        device,
        ids.shape[0],
        ids.shape[1],
    )
    plan, allocation = None, None
    if job.budget is not None:
        allocation = plan_allocation(model, ids, job, out, device)
        plan = {
            name: AthenaRecipe(**{**dataclasses.asdict(job.athena), **entry["recipe_fields"]})
            for name, entry in allocation["layers"].items()
        }
    inps = embed(model, ids, device, act_dtype)
    ctx = build_context(model, ids.shape[1], device, torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    fresh = 0
    bar = tqdm(range(len(layers)), desc="layers", unit="layer")
    for i in bar:
        prefix = f"model.layers.{i}"
        layer = layers[i].to(device=device, dtype=torch.float32)
        t0 = time.perf_counter()
        done = checkpoint.read_layer_part(out, i) if job.resume else None
        if done is not None:
            part, part_stats = done
            for name, meta in part_stats.items():
                stored = layer_from_tensors(name, part, meta)
                _submodule(layer, name[len(prefix) + 1 :]).weight.copy_(stored.dequantize())
            for name, t in part.items():  # fine-tuned norm weights
                if name.rsplit(".", 1)[0] not in part_stats:
                    if not name.endswith(".bias"):
                        layer.get_parameter(name[len(prefix) + 1 :]).copy_(t)
            bar.set_postfix_str(f"layer {i} resumed")
        else:
            reference = copy.deepcopy(layer) if job.finetune else None
            part, part_stats = quantize_layer(layer, i, prefix, inps, ctx, job, plan)
            if job.finetune:
                finetune_layer(layer, reference, i, prefix, inps, ctx, job, part, part_stats)
                del reference
            checkpoint.write_layer_part(out, i, part, part_stats)
            fresh += 1
            bar.set_postfix_str(f"layer {i}: {time.perf_counter() - t0:.1f}s")
        tensors.update(part)
        stats.update(part_stats)
        inps = run_layer(layer, i, inps, ctx, job.batch_size)
        layers[i] = layer.to("cpu")
        if on_gpu:
            torch.cuda.empty_cache()
        if stop_after_layers is not None and fresh >= stop_after_layers and i + 1 < len(layers):
            raise KeyboardInterrupt(f"stopped after {fresh} layers (test hook)")

    quantized = set(stats)
    for name, t in model.state_dict().items():
        mod_name = name.rsplit(".", 1)[0]
        if mod_name in quantized:
            continue  # stored as packed tensors (bias included)
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        tensors[name] = t.detach().to(torch.float16).cpu()

    linear_bytes = sum(
        t.numel() * t.element_size()
        for k, t in tensors.items()
        if k.rsplit(".", 1)[0] in quantized and not k.endswith(".bias")
    )
    linear_params = sum(s["shape"][0] * s["shape"][1] for s in stats.values())
    source_params = sum(p.numel() for p in model.parameters())  # tied weights count once
    meta = {
        "architecture": src.model_type,
        "source": {"path": str(src.original), "kind": src.kind},
        "method": job.method,
        "recipe": job.recipe_dict(),
        "calibration": dataclasses.asdict(job.calib),
        "layers": stats,
        "num_layers": len(layers),
        "source_parameters": source_params,
        "bytes": {"linear": linear_bytes},
        "bits_per_weight": {"linear": 8.0 * linear_bytes / linear_params},
        "seconds": time.perf_counter() - t_start,
        "device": str(device),
    }
    if allocation is not None:
        meta["allocation"] = allocation
    checkpoint.finalize(out, src.path, tensors, meta)
    return json.loads((out / checkpoint.META_FILE).read_text())


# ---------------------------------------------------------------- --target-bits


def recipe_name(r: AthenaRecipe) -> str:
    return f"{r.d},{r.n},{r.k}"


@torch.no_grad()
def plan_allocation(model, ids: torch.Tensor, job: QuantizeJob, out: Path, device: torch.device) -> dict:
    """Per-layer recipes for job.budget (quantize/allocate.py), from the unquantized model; saved in the
    partial folder so that --resume continues with the same plan. The Fisher pass holds the whole model in
    fp32 on `device` (fine for small models; a 7B model needs it layer by layer, not built yet)."""
    from quantize.allocate import Option, allocate
    from quantize.sensitivity import fisher_traces, kmeans_mse

    saved = checkpoint.read_partial_json(out, "allocation.json") if job.resume else None
    if saved is not None:
        return saved
    t0 = time.perf_counter()
    budget, base = job.budget, job.athena
    names = [f"model.layers.{i}.{n}" for i in range(len(model.model.layers)) for g in LINEAR_GROUPS for n in g]
    modules = {name: _submodule(model, name) for name in names}
    windows = ids[: budget.sensitivity_windows].to(device)
    on_cpu_fp32 = device.type == "cpu" and next(model.parameters()).dtype == torch.float32
    work = model if on_cpu_fp32 else copy.deepcopy(model).to(device=device, dtype=torch.float32)  # model untouched
    traces = fisher_traces(work, windows, {name: _submodule(work, name) for name in names})
    del work
    options, numel, mse = {}, {}, {}
    for name, mod in modules.items():
        W = mod.weight.detach().to(device=device, dtype=torch.float32)
        N, M = W.shape
        numel[name] = N * M
        options[name] = []
        for r in budget.recipes(base, N):
            e = kmeans_mse(W, r.d, r.n, row_scale=r.row_scale, groups=budget.sample_groups, seed=base.seed)
            mse[(name, recipe_name(r))] = e
            options[name].append(Option(r, r.stored_bytes(N, M), 0.5 * traces[name] * e))
    choice = allocate(options, numel, budget.target_bits)
    total_bytes = sum(o.bytes for o in choice.values())
    allocation = {
        "target_bits": budget.target_bits,
        "planned_bits": 8.0 * total_bytes / sum(numel.values()),
        "sensitivity": "Fisher trace on calibration windows x k-means error of each (d, n) (quantize/sensitivity.py)",
        "seconds": time.perf_counter() - t0,
        "layers": {
            name: {
                "recipe": recipe_name(o.recipe),
                "recipe_fields": {"d": o.recipe.d, "n": o.recipe.n},
                "planned_bits": 8.0 * o.bytes / numel[name],
                "fisher_trace": traces[name],
                "kmeans_mse": mse[(name, recipe_name(o.recipe))],
                "expected_loss": o.loss,
            }
            for name, o in choice.items()
        },
    }
    log.info(
        "--target-bits %g: planned %.3f bits per linear weight in %.0f s; recipes %s",
        budget.target_bits,
        allocation["planned_bits"],
        allocation["seconds"],
        ", ".join(f"{k}: {v}" for k, v in sorted(_count(a["recipe"] for a in allocation["layers"].values()).items())),
    )
    checkpoint.write_partial_json(out, "allocation.json", allocation)
    return allocation


def _count(items) -> dict:
    counts: dict = {}
    for x in items:
        counts[x] = counts.get(x, 0) + 1
    return counts
