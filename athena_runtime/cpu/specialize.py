"""`specialize(model, ops)`: switch, in place, the modules of a loaded model that have a CPU fast form (decoder.py)
and the model itself (stack.py). State and submodules are unchanged; the counts per class are returned for the log."""

from __future__ import annotations

from torch import nn

from athena_runtime.cpu.decoder import CPUMLP, CPUAttention, CPUDecoderLayer, CPURMSNorm
from athena_runtime.cpu.stack import CPUCausalLM
from athena_runtime.model import MLP, Attention, CausalLM, DecoderLayer, RMSNorm

SWITCH = (
    (RMSNorm, CPURMSNorm),
    (Attention, CPUAttention),
    (MLP, CPUMLP),
    (DecoderLayer, CPUDecoderLayer),
    (CausalLM, CPUCausalLM),
)


def specialize(model: nn.Module, ops) -> dict[str, int]:
    """Switch the modules of `model` that have a CPU form to it (in place). Returns {class name: count}."""
    counts: dict[str, int] = {}
    for module in model.modules():
        for base, fast in SWITCH:
            if type(module) is base:
                module.__class__ = fast
                module._ops = ops
                counts[fast.__name__] = counts.get(fast.__name__, 0) + 1
    return counts
