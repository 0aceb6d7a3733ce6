"""The ctypes mirrors of layer.c's structs: a compiled linear layer (`LinearDesc`, filled from a CPULinear or
PQ8Linear) and a whole decoder layer (`LayerDesc`) for `layer_decode`. The pointers are into the modules' buffers,
which live as long as the modules (the descriptors are kept beside them)."""

from __future__ import annotations

import ctypes

P, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
KINDS = {"fp16": 0, "int8": 1, "q8g": 2, "pq8": 3}  # layer.c athena_linear.kind


class LinearDesc(ctypes.Structure):
    _fields_ = [
        ("kind", I64),
        ("N", I64),
        ("M", I64),
        ("W", P),
        ("scale", P),
        ("bias", P),
        ("Mp", I64),
        ("P", I64),
        ("prow", P),
        ("pblk", P),
        ("start", P),
        ("nblk", I64),
        ("colscale", P),
        ("colmin", P),
        ("R", I64),
        ("A", P),
        ("B", P),
    ]


class LayerDesc(ctypes.Structure):
    _fields_ = [
        ("qkv", LinearDesc),
        ("o", LinearDesc),
        ("gate_up", LinearDesc),
        ("down", LinearDesc),
        ("ln1", P),
        ("ln2", P),
        ("eps1", F32),
        ("eps2", F32),
        ("Hd", I64),
        ("H", I64),
        ("Hkv", I64),
        ("D", I64),
        ("F", I64),
        ("up", I64),
        ("kc", P),
        ("vc", P),
        ("fp16", I64),
        ("block_size", I64),
        ("window", I64),
        ("scale", F32),
    ]


def scratch_floats(desc: LayerDesc, T: int) -> int:
    """Floats of scratch `layer_decode` needs for T tokens (layer.c)."""
    return T * (2 * desc.Hd + desc.qkv.N + desc.H * desc.D + desc.gate_up.N + desc.F)
