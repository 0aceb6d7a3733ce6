"""Calibration (and evaluation) text: reading files, cutting token windows."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


# Defaults per device type: (nsamples, seqlen). A GPU takes GPTQ's usual 128 x 2048 tokens; on a CPU
# the two forward passes per layer dominate, and 32 x 512 tokens keep the embedded model's
# quantization within minutes while still giving each Hessian (at most 1536 x 1536 there) 16K samples.
DEFAULT_WINDOWS = {"cuda": (128, 2048), "cpu": (32, 512)}


@dataclass(frozen=True)
class CalibConfig:
    files: tuple[str, ...] = ()  # empty = the embedded default text (pydoc_data.topics)
    nsamples: int | None = None  # None: DEFAULT_WINDOWS for the device
    seqlen: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nsamples is not None and self.nsamples < 1:
            raise ValueError("--nsamples must be >= 1")
        if self.seqlen is not None and self.seqlen < 8:
            raise ValueError("--seqlen must be >= 8")

    def resolved(self, device_type: str) -> "CalibConfig":
        """The same settings with defaults filled in for a device type ('cuda' or 'cpu')."""
        ns, sl = DEFAULT_WINDOWS.get(device_type, DEFAULT_WINDOWS["cpu"])
        return CalibConfig(self.files, self.nsamples or ns, self.seqlen or sl, self.seed)


def default_calibration_text() -> str:
    """The English reference text shipped with every CPython (`pydoc_data.topics`, ~465 KB)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text_files(files: list[str] | tuple[str, ...]) -> str:
    """Plain text, or JSON lines with a `text` field (by extension .jsonl / .json lines)."""
    parts: list[str] = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        if path.suffix == ".jsonl":
            for lineno, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string 'text' field")
                parts.append(obj["text"])
        else:
            parts.append(raw)
    text = "\n\n".join(parts)
    if not text.strip():
        raise ValueError(f"no text in {', '.join(files)}")
    return text


def calibration_text(files: tuple[str, ...] | list[str]) -> str:
    return read_text_files(files) if files else default_calibration_text()


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one id sequence [T] (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens from ids [T] -> [nsamples, seqlen]."""
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def calibration_batch(tokenizer, cfg: CalibConfig) -> torch.Tensor:
    if cfg.nsamples is None or cfg.seqlen is None:
        raise ValueError("calibration_batch needs a resolved CalibConfig (see CalibConfig.resolved)")
    return sample_windows(tokenize_text(tokenizer, calibration_text(cfg.files)), cfg.nsamples, cfg.seqlen, cfg.seed)
