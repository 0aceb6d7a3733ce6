"""Calibration windows for the quantizer: how many, how long, and from which text (`athena_runtime.format.text`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from athena_runtime.format.text import default_calibration_text, read_text_files, sample_windows, tokenize_text

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


def calibration_text(files: tuple[str, ...] | list[str]) -> str:
    return read_text_files(files) if files else default_calibration_text()


def calibration_batch(tokenizer, cfg: CalibConfig) -> torch.Tensor:
    if cfg.nsamples is None or cfg.seqlen is None:
        raise ValueError("calibration_batch needs a resolved CalibConfig (see CalibConfig.resolved)")
    return sample_windows(tokenize_text(tokenizer, calibration_text(cfg.files)), cfg.nsamples, cfg.seqlen, cfg.seed)
