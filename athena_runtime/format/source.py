"""Source models for the quantizer: a Hugging Face folder (Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 text) or a
GGUF file (llama, qwen2, gemma3).

`resolve_source` turns whatever the user named into a validated Hugging Face folder (converting a
GGUF file once, into a cache); `load_hf_model` builds the transformers model from it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from athena_runtime.format.checkpoint import read_json
from athena_runtime.format.config import SUPPORTED_ARCHITECTURES as SUPPORTED_MODEL_TYPES  # one list for both packages
from athena_runtime.format.environment import Environment

log = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def cache_dir() -> Path:
    """Where Athena caches converted and compressed models (`ATHENA_CACHE_DIR`, default ~/.cache/athena)."""
    return Environment.read().cache_dir


@dataclass(frozen=True)
class SourceInfo:
    path: Path  # a Hugging Face folder
    kind: str  # "hf" | "gguf"
    original: Path  # what the user named
    model_type: str


def check_hf_folder(path: Path) -> str:
    """Validate a Hugging Face model folder; return its model_type. Clear ValueError otherwise."""
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{path}: no config.json (not a Hugging Face model folder)")
    cfg = read_json(cfg_path)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = cfg.get("architectures")
        raise ValueError(
            f"{path}: unsupported architecture model_type={model_type!r} (architectures={archs}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ValueError(f"{path}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ValueError(f"{path}: no tokenizer files (tokenizer.json / tokenizer.model / tokenizer_config.json)")
    return model_type


def _file_digest(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def resolve_source(name: str | Path) -> SourceInfo:
    """Map a user-given model (HF folder or .gguf file) to a validated HF folder."""
    p = Path(name).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{p}: not a GGUF file and not a model folder")
        from athena_runtime.format.gguf_import import convert_gguf

        out = cache_dir() / "gguf" / f"{p.stem}-{_file_digest(p)}"
        if not (out / "config.json").is_file():
            tmp = out.with_name(out.name + ".tmp")
            convert_gguf(p, tmp)
            tmp.rename(out)
        return SourceInfo(path=out, kind="gguf", original=p, model_type=check_hf_folder(out))
    if (p / "athena.json").is_file():
        raise ValueError(f"{p}: this is already an Athena compressed checkpoint, not a source model")
    return SourceInfo(path=p, kind="hf", original=p, model_type=check_hf_folder(p))


def load_hf_model(folder: Path, dtype: torch.dtype = torch.float32):
    """The transformers causal LM on CPU, eval mode, SDPA attention."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, attn_implementation="sdpa", low_cpu_mem_usage=True
        )
    except (OSError, RuntimeError, KeyError) as exc:
        raise ValueError(f"{folder}: could not load the model weights ({type(exc).__name__}: {exc})") from exc
    model.eval()
    model.config.use_cache = False
    return model


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
