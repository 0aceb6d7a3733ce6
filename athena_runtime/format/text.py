"""Text for calibration and evaluation: the default text, .txt / .jsonl files, token windows."""

from __future__ import annotations

import json
from pathlib import Path

import torch


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
