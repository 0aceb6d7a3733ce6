"""Diagnostic: the Triton paged decode kernel vs the reference over a grid of small cache configurations
(format, head_dim, group size, page size, GQA, window, key basis, splits); prints the worst ones.
Usage: python -m bench.diag.attn_matrix  (CUDA, or TRITON_INTERPRET=1 on CPU)"""
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import test_paged_attention as TP  # noqa: E402

pa = TP.pa


def main():
    dev = TP.DEVICE
    rows = []
    grid = itertools.product(("int4", "int8", "fp16"), (16, 64), (16, 64), (4, 16), (1, 2), (None, 7), (False, True),
                             (1, None))
    for fmt, hd, gs, bs, qpk, window, cal, splits in grid:
        if gs > hd or (fmt == "fp16" and gs != 16):
            continue
        seq_lens = [5, 9, 14, 17, 30, 70]
        cache, table, _, _ = TP._filled_cache(fmt, seq_lens, 2, hd, bs, seed=2, hadamard=cal or fmt == "int4",
                                              calibrated=cal, group_size=None if fmt == "fp16" else gs)
        q = cache.query(0, torch.randn(len(seq_lens), 2 * qpk, hd, device=dev)).to(
            torch.float16 if dev == "cuda" else torch.float32)
        args = (q, cache, 0, table, torch.tensor(seq_lens, dtype=torch.int32, device=dev),
                torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=dev), hd**-0.5, window)
        err = (pa.paged_attention_decode(*args, num_splits=splits).float()
               - pa.paged_attention_reference(*args).float()).abs().max().item()
        rows.append((err, fmt, hd, gs, bs, qpk, window, cal, splits))
    rows.sort(key=lambda r: r[0], reverse=True)
    print("err       fmt  hd  gs  bs qpk window cal splits")
    for r in rows[:25]:
        print(f"{r[0]:.2e}  " + " ".join(f"{x!s:>4}" for x in r[1:]))
    print(f"{sum(r[0] > 4e-3 for r in rows)} of {len(rows)} configurations over 4e-3")


if __name__ == "__main__":
    main()
