"""The compressed checkpoint folder (FORMAT.md): writing, validating, reading.

The only module that knows file names and the on-disk layout. Layers are (de)serialized by
`athena_runtime.format.layers`; this module handles the folder, athena.json, safetensors headers and resume parts.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from athena_runtime.format.layers import layer_from_tensors

FORMAT_NAME = "athena"
FORMAT_VERSION = 2  # written; 2 added per-row scales (FORMAT.md "Versioning")
READABLE_VERSIONS = (1, 2)  # a version-1 file is a version-2 file without row scales
META_FILE = "athena.json"
WEIGHTS_FILE = "model.safetensors"
PARTIAL_DIR = ".partial"
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


# ---------------------------------------------------------------- safetensors validation


def check_safetensors(path: Path, want_format: str | None = None) -> dict:
    """Validate a safetensors file's header against its size; return the header's metadata.

    Catches truncated files (data shorter than the header promises) and foreign files (no parsable
    header) with a message naming the file, before any tensor is read.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated (only {size} bytes), not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, 100 << 20):
            raise ValueError(f"{path}: not a safetensors file (bad header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a safetensors file (unreadable header: {exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not an object)")
    meta = header.pop("__metadata__", {}) or {}
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated: header needs {8 + n + end} bytes, file has {size}")
    if want_format is not None and meta.get("format") != want_format:
        raise ValueError(f"{path}: not an Athena weights file (metadata format={meta.get('format')!r})")
    return meta


# ---------------------------------------------------------------- reading


def read_json(path: Path):
    """A JSON file's content; invalid JSON is a ValueError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc


def read_meta(path: str | Path) -> dict:
    """athena.json of a checkpoint folder, validated (format, version, completeness)."""
    folder = Path(path)
    meta_path = folder / META_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory")
    if not meta_path.is_file():
        raise ValueError(f"{folder}: no {META_FILE} (not an Athena compressed checkpoint)")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{meta_path}: not an Athena checkpoint description (format={meta.get('format')!r})")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{meta_path}: format_version {meta.get('format_version')!r} is not supported "
            f"(this build reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    if not meta.get("complete", False):
        raise ValueError(f"{folder}: incomplete checkpoint (an interrupted quantization: rerun with --resume)")
    return meta


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """(athena.json, all tensors) of a checkpoint folder, with every quantized layer validated."""
    folder = Path(path)
    meta = read_meta(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{folder}: no {WEIGHTS_FILE}")
    check_safetensors(weights, want_format=FORMAT_NAME)
    try:
        tensors = load_file(str(weights), device=str(device))
    except Exception as exc:  # safetensors raises SafetensorError for damaged data
        raise ValueError(f"{weights}: unreadable ({exc})") from exc
    for prefix, layer_meta in meta.get("layers", {}).items():
        if meta["format_version"] < 2 and isinstance(layer_meta, dict) and layer_meta.get("row_scale"):
            raise ValueError(f"{folder}: layer {prefix} has row scales, which format version 1 does not have")
        layer_from_tensors(prefix, tensors, layer_meta, unpack=False)  # dtypes/shapes; ValueError naming the tensor
    return meta, tensors


# ---------------------------------------------------------------- writing (driver side)


def partial_dir(out: Path) -> Path:
    return out / PARTIAL_DIR


def write_job(out: Path, job: dict, resume: bool) -> None:
    """Record the job in the partial folder; on resume, refuse a different job."""
    part = partial_dir(out)
    job_file = part / "job.json"
    if resume and job_file.is_file():
        old = json.loads(job_file.read_text())
        if old != job:
            diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
            raise ValueError(f"{out}: --resume with different settings than the interrupted run ({', '.join(diff)})")
        return
    if out.exists() and any(out.iterdir()) and not resume:
        if (out / META_FILE).is_file() or part.is_dir():
            raise ValueError(f"{out}: already holds a checkpoint (use --resume to continue, or another --out)")
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    job_file.write_text(json.dumps(job, indent=2, sort_keys=True))


def write_partial_json(out: Path, name: str, obj) -> None:
    """A JSON file of the run in the partial folder (e.g. the --target-bits plan), for --resume."""
    (partial_dir(out) / name).write_text(json.dumps(obj, indent=2))


def read_partial_json(out: Path, name: str):
    path = partial_dir(out) / name
    return read_json(path) if path.is_file() else None


def write_layer_part(out: Path, index: int, tensors: dict[str, torch.Tensor], stats: dict) -> None:
    """Persist one finished decoder layer at once (atomic rename), so an interrupted run resumes."""
    part = partial_dir(out)
    tmp = part / f"layer_{index:04d}.tmp.safetensors"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    (part / f"layer_{index:04d}.json").write_text(json.dumps(stats, indent=2))
    tmp.rename(part / f"layer_{index:04d}.safetensors")


def read_layer_part(out: Path, index: int) -> tuple[dict[str, torch.Tensor], dict] | None:
    part = partial_dir(out)
    f = part / f"layer_{index:04d}.safetensors"
    s = part / f"layer_{index:04d}.json"
    if not (f.is_file() and s.is_file()):
        return None
    return load_file(str(f)), json.loads(s.read_text())


def finalize(out: Path, source_folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write model.safetensors + athena.json + copied files; drop the partial folder."""
    weights = out / WEIGHTS_FILE
    save_file(
        {k: v.contiguous().cpu() for k, v in tensors.items()},
        str(weights),
        metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)},
    )
    for name in COPIED_FILES:
        if (source_folder / name).is_file():
            shutil.copy2(source_folder / name, out / name)
    meta = dict(meta, format=FORMAT_NAME, format_version=FORMAT_VERSION, complete=True)
    file_bytes = weights.stat().st_size
    meta.setdefault("bytes", {})["file"] = file_bytes
    nparams = meta.get("source_parameters")
    if nparams:
        meta.setdefault("bits_per_weight", {})["file"] = 8.0 * file_bytes / nparams
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(partial_dir(out), ignore_errors=True)
