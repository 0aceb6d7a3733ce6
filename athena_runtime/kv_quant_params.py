"""The int8 / int4 KV-cache quantization constants, shared by the PyTorch reference (`kv_cache.py`) and the
one-launch write kernel (`kernels/kv_write.py`), so neither imports the other for them."""

from __future__ import annotations

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # int4: range shrink factors tried per group
SCALE_MIN = 2.0**-14  # smallest normal float16: a scale never underflows to a subnormal
SCALE_ROUND_UP = 1.0 + 2.0**-10  # > float16 rounding error, so the stored scale covers the range
