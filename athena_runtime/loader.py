"""Build our decoder from a compressed Athena folder, a Hugging Face folder, or a GGUF file.

Compressed folder (FORMAT.md; read and validated by `athena_runtime.format.checkpoint.read_checkpoint`):
  method "athena"      -> `PQLinear.from_tensors(prefix, tensors, layer_meta, device, dtype)`
  method "rtn"/"gptq"  -> dense `nn.Linear`, W[i, c] = (q[i, c] - zeros[i, c // g]) · scales[i, c // g]
  anything else        -> loaded as stored (embeddings, norms, lm_head, unquantized linears)
Hugging Face folder: `model.safetensors` (or sharded with its index), else `pytorch_model.bin`
(or sharded), read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from athena_runtime.format.checkpoint import read_json
from athena_runtime.format.config import ModelConfig
from athena_runtime.model import CausalLM

log = logging.getLogger(__name__)

HF_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def load_model(
    path, device, dtype: torch.dtype = torch.float16, max_len: int | None = None, fuse: bool = True
) -> tuple[CausalLM, ModelConfig]:
    """(model in eval mode on `device`, its ModelConfig). `max_len` only matters for dynamic RoPE;
    `fuse` computes q/k/v and gate/up as one layer each where they fit (split_linear.py)."""
    folder = _resolve_folder(Path(path))
    config = ModelConfig.from_hf_config(_read_json(folder / "config.json"))
    from athena_runtime.format.checkpoint import is_checkpoint, read_checkpoint

    if is_checkpoint(folder):
        meta, tensors = read_checkpoint(folder)
        layers = meta.get("layers", {})
        arch = meta.get("architecture")
        if arch is not None and arch != config.architecture:
            raise ValueError(
                f"{folder}: athena.json says architecture {arch!r}, config.json says {config.architecture!r}"
            )
        log.info(
            "loading compressed checkpoint %s (%d quantized layers, method %s)", folder, len(layers), meta.get("method")
        )
    else:
        tensors, layers = read_hf_weights(folder), {}
        log.info("loading Hugging Face checkpoint %s", folder)
    return build_model(config, tensors, layers, device, dtype, max_len, fuse, folder), config


def build_model(
    config: ModelConfig,
    tensors,
    layers: dict,
    device,
    dtype: torch.dtype = torch.float16,
    max_len: int | None = None,
    fuse: bool = True,
    source="checkpoint",
) -> CausalLM:
    """Our decoder for `config` from checkpoint tensors (a mapping name -> tensor) and athena.json's "layers", in
    eval mode on `device` (`load_model` after reading the files; benchmarks pass random tensors made on the device)."""
    build = LinearBuilder(tensors, layers, torch.device(device), dtype)
    model = CausalLM(config, build, max_len)
    unused_layers = set(layers) - build.built
    if unused_layers:
        raise ValueError(f"{source}: athena.json lists layers the model has no place for: {sorted(unused_layers)[:5]}")
    _materialize(model, tensors, torch.device(device), dtype, source)
    _warn_unused(model, tensors, build.built, source)
    model.to(device)  # buffers (RoPE inverse frequencies); parameters are already there
    if fuse:
        from athena_runtime.split_linear import fuse_projections

        fuse_projections(model)
    return model.eval()


def _resolve_folder(path: Path) -> Path:
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{path}: not a GGUF file and not a model folder")
        from athena_runtime.format.source import resolve_source

        log.info("converting GGUF file %s to a Hugging Face folder", path)
        return resolve_source(path).path
    if not path.is_dir():
        raise ValueError(f"{path}: no such model folder")
    return path


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: missing (a model folder needs config.json)")
    return read_json(path)


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder, on the CPU."""
    from safetensors.torch import load_file

    from athena_runtime.format.checkpoint import check_safetensors

    present = [name for name in HF_WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise ValueError(f"{folder}: no weights (expected one of {', '.join(HF_WEIGHT_FILES)})")
    first = present[0]
    if first.endswith(".index.json"):
        weight_map = _read_json(folder / first).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{folder / first}: no weight_map")
        files = sorted(set(weight_map.values()))
    else:
        files = [first]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        file = folder / name
        if not file.is_file():
            raise ValueError(f"{file}: missing (listed in {first})")
        try:
            if name.endswith(".safetensors"):
                check_safetensors(file)
                tensors.update(load_file(str(file)))
            else:
                state = torch.load(file, map_location="cpu", weights_only=True)
                if not isinstance(state, dict):
                    raise ValueError(f"holds a {type(state).__name__}, not a state dict")
                tensors.update(state)
        except ValueError as exc:
            raise ValueError(f"{file}: {exc}" if str(file) not in str(exc) else str(exc)) from exc
        except Exception as exc:  # pickle / zip / safetensors errors on foreign or damaged files
            raise ValueError(f"{file}: unreadable weights file ({type(exc).__name__}: {exc})") from exc
    return tensors


def dequantize_scalar(prefix: str, tensors: dict, meta: dict, device) -> torch.Tensor:
    """RTN / GPTQ layer -> W float32 [N, M] on `device` (FORMAT.md "Scalar baselines")."""
    from athena_runtime.format.bits import unpack_bits

    N, M = meta["shape"]
    bits, g = int(meta["bits"]), int(meta["group_size"])
    q = unpack_bits(tensors[f"{prefix}.qweight"].to(device), bits, M)  # [N, M] int64
    scales = tensors[f"{prefix}.scales"].to(device).float().repeat_interleave(g, 1)[:, :M]  # [N, M]
    zeros = tensors[f"{prefix}.zeros"].to(device).float().repeat_interleave(g, 1)[:, :M]
    return (q.float() - zeros) * scales


class LinearBuilder:
    """The loader's `LinearFactory`: builds each linear layer, materialized, from the checkpoint."""

    def __init__(self, tensors: dict, layers: dict, device: torch.device, dtype: torch.dtype):
        self.tensors, self.layers, self.device, self.dtype = tensors, layers, device, dtype
        self.built: set[str] = set()
        self._logged: set[str] = set()
        try:
            from athena_runtime.pq_linear import PQLinear
        except ImportError:
            PQLinear = None
        self.pq_linear = PQLinear

    def _log_once(self, key: str, level: int, msg: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, msg, *args)

    def __call__(self, prefix: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        self.built.add(prefix)
        layer = self.layers.get(prefix)
        if layer is not None and list(layer.get("shape", [])) != [out_features, in_features]:
            raise ValueError(
                f"layer {prefix}: athena.json shape {layer.get('shape')} != model's [{out_features}, {in_features}]"
            )
        if layer is not None and layer.get("method") == "athena":
            if self.pq_linear is not None:
                self._log_once("pq", logging.INFO, "athena layers -> PQLinear")
                return self.pq_linear.from_tensors(prefix, self.tensors, layer, self.device, self.dtype)
            self._log_once(
                "pq",
                logging.WARNING,
                "athena_runtime.pq_linear is missing: athena layers are "
                "DEQUANTIZED to dense fp weights (slow, memory-hungry stand-in)",
            )
            from athena_runtime.format.layers import AthenaLayer

            weight = AthenaLayer.from_tensors(prefix, self.tensors, layer).dequantize()
        elif layer is not None and layer.get("method") in ("rtn", "gptq"):
            self._log_once("scalar", logging.INFO, "%s layers -> dequantized dense nn.Linear", layer["method"])
            weight = dequantize_scalar(prefix, self.tensors, layer, self.device)
        elif layer is not None:
            raise ValueError(f"layer {prefix}: unknown method {layer.get('method')!r}")
        else:
            weight = self._tensor(f"{prefix}.weight", (out_features, in_features))
        linear = nn.Linear(in_features, out_features, bias=bias, device="meta")
        linear.weight = nn.Parameter(weight.to(self.device, self.dtype), requires_grad=False)
        if bias:
            linear.bias = nn.Parameter(
                self._tensor(f"{prefix}.bias", (out_features,)).to(self.device, self.dtype), requires_grad=False
            )
        elif f"{prefix}.bias" in self.tensors:
            raise ValueError(f"tensor {prefix}.bias present, but config.json says this layer has no bias")
        return linear

    def _tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise ValueError(f"tensor {name} missing from the checkpoint")
        if tuple(t.shape) != shape:
            raise ValueError(f"tensor {name} has shape {list(t.shape)}, config.json implies {list(shape)}")
        return t


def _warn_unused(model: nn.Module, tensors, linears: set[str], folder) -> None:
    """Tensors nothing consumed usually mean config.json and the weights disagree: say so."""
    params = {name for name, _ in model.named_parameters()}
    unused = sorted(
        name
        for name in tensors
        if name not in params
        and name.rsplit(".", 1)[0] not in linears
        and not name.endswith("rotary_emb.inv_freq")
        and not (name == "lm_head.weight" and model.lm_head is None)
    )
    if unused:
        log.warning(
            "%s: %d tensors not used by the model (config.json mismatch?): %s",
            folder,
            len(unused),
            ", ".join(unused[:5]),
        )


def _materialize(model: nn.Module, tensors, device: torch.device, dtype: torch.dtype, folder) -> None:
    """Give every parameter still on the meta device (embeddings, norms) its checkpoint tensor."""
    for name, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{folder}: tensor {name} missing from the checkpoint")
        if t.shape != param.shape:
            raise ValueError(
                f"{folder}: tensor {name} has shape {list(t.shape)}, config.json implies {list(param.shape)}"
            )
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, nn.Parameter(t.to(device, dtype), requires_grad=False))
