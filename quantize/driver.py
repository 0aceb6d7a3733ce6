"""The layer-by-layer quantization driver: model walking, calibration activations, resume.

One decoder layer lives on the device at a time. For each layer: collect one Hessian per distinct
input (q/k/v share one, gate/up share one) from the calibration activations, quantize its linear
layers (Athena, GPTQ or RTN), write the finished layer to disk at once, then propagate the
activations through the *quantized* layer (weights rebuilt from the stored tensors, so a resumed run
sees bit-identical activations).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from athena_runtime.format import checkpoint
from quantize.athena import quantize_athena
from quantize.calibration import CalibConfig, calibration_batch
from quantize.gptq import quantize_gptq
from quantize.hessian import HessianAccumulator
from athena_runtime.format.layers import layer_from_tensors
from quantize.recipe import AthenaRecipe, ScalarRecipe
from quantize.rtn import quantize_rtn
from athena_runtime.format.source import load_hf_model, load_tokenizer, resolve_source

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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    def recipe_dict(self) -> dict:
        return dataclasses.asdict(self.athena if self.method == "athena" else self.scalar)

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
    masks: dict[str, torch.Tensor]  # layer type -> additive mask [1, 1, S, S]
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
    masks = {"full_attention": torch.where(dist >= 0, 0.0, neg).to(dtype)[None, None]}
    window = getattr(config, "sliding_window", None)
    if window:
        allowed = (dist >= 0) & (dist < window)
        masks["sliding_attention"] = torch.where(allowed, 0.0, neg).to(dtype)[None, None]
    return LayerContext(pos, rope, masks, types)


@torch.no_grad()
def run_layer(layer, index: int, inps: torch.Tensor, ctx: LayerContext, batch_size: int) -> torch.Tensor:
    """inps [ns, S, H] -> outputs [ns, S, H] of decoder layer `index` (same dtype/device as inps)."""
    p = next(layer.parameters())
    mask = ctx.masks[ctx.layer_types[index]]
    rope = ctx.position_embeddings[ctx.layer_types[index]]
    outs = torch.empty_like(inps)
    for s in range(0, inps.shape[0], batch_size):
        x = inps[s : s + batch_size].to(p.dtype)
        y = layer(
            x,
            attention_mask=mask.to(p.dtype),
            position_ids=ctx.position_ids,
            position_embeddings=tuple(t.to(p.dtype) for t in rope),
            use_cache=False,
        )
        y = y[0] if isinstance(y, tuple) else y
        outs[s : s + batch_size] = y.to(inps.dtype)
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


@torch.no_grad()
def collect_hessians(layer, index, inps, ctx, batch_size) -> dict[str, HessianAccumulator]:
    accs: dict[str, HessianAccumulator] = {}
    hooks = []
    for group in LINEAR_GROUPS:
        mod = _submodule(layer, group[0])
        acc = HessianAccumulator(mod.in_features, device=inps.device)
        accs[group[0]] = acc
        hooks.append(mod.register_forward_hook(lambda m, args, out, acc=acc: acc.add_batch(args[0])))
    try:
        run_layer(layer, index, inps, ctx, batch_size)
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


def quantize_group(weights: list[torch.Tensor], H: torch.Tensor | None, job: QuantizeJob) -> list[tuple[object, dict]]:
    if job.method == "athena":
        return quantize_athena(weights, H, job.athena)
    if job.method == "gptq":
        return [quantize_gptq(w, H, job.scalar) for w in weights]
    return [quantize_rtn(w, job.scalar, H) for w in weights]


@torch.no_grad()
def quantize_layer(layer, index: int, prefix: str, inps, ctx, job: QuantizeJob):
    """Quantize every linear of one decoder layer in place. Returns (tensors, stats)."""
    accs = collect_hessians(layer, index, inps, ctx, job.batch_size)
    tensors: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    for group in LINEAR_GROUPS:
        mods = [_submodule(layer, n) for n in group]
        H = accs[group[0]].hessian(0.0)  # undamped: the algorithms damp it (recipe.damp) and score on it
        t0 = time.perf_counter()
        with _cpu_threads(1 if H.device.type == "cpu" else None):
            results = quantize_group([m.weight.detach().float() for m in mods], H, job)
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
    return tensors, stats


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
        src.original, src.model_type, len(layers), job.method, device, ids.shape[0], ids.shape[1],
    )
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
            bar.set_postfix_str(f"layer {i} resumed")
        else:
            part, part_stats = quantize_layer(layer, i, prefix, inps, ctx, job)
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
        t.numel() * t.element_size() for k, t in tensors.items()
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
    checkpoint.finalize(out, src.path, tensors, meta)
    return json.loads((out / checkpoint.META_FILE).read_text())
