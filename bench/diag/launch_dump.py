"""Dump the launch decisions of the GPU kernels' host-side planners, without a GPU (a before/after check).

    python -m bench.diag.launch_dump > out/launch_dump.txt

For each device profile (SM count, shared memory per CTA: sm_89 RTX 4090, sm_90 H100 SXM / PCIe, a small Ada part),
every layer geometry (7B-family shapes, fused q/k/v and gate/up, small and odd shapes) and every recipe of the
--target-bits menu at several codebook-block heights k, one line per decision:

    resolve   the registry's backend per token class (toolchain present or not), with the backends passed over
    lut       LutPlan: kernel instance, slab width, rows per chunk, grid, shared memory, fused epilogue and its tile
    frag      frag_matmul: kernel instance, grid, shared memory, K split, in-kernel low-rank
    dequant   choose_launch, the compiled instances (dequant / fold), fold rows, low-rank mode
    splitk    the split-K epilogue's launch (token tiles, or row / slab blocks and warps)
    decode    the paged decode attention's splits and tile shape; kv_write's warps

Only the device queries are replaced: the registry's toolchain probe (set to present / absent), the compiled kernel
(its occupancy query: a fixed function of shared memory) and the launches (recorded, not run). Lines are sorted.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import sys
from unittest import mock

import torch

from athena_runtime.kernels import backends, dequant, frag, lut, splitk
from athena_runtime.kernels.layout import PQGeometry
from athena_runtime.kernels.tuning import Tuning

PROFILES = {  # name -> (SMs, opt-in shared memory per CTA)
    "sm89-128": (128, 99 * 1024),
    "sm90-132": (132, 227 * 1024),
    "sm90-114": (114, 227 * 1024),
    "sm89-34": (34, 99 * 1024),
}
SHAPES = [  # W [N, M] as PQLinear sees them (fused q/k/v and gate/up at k = 4096 included)
    (4096, 4096),
    (11008, 4096),
    (4096, 11008),
    (14336, 4096),
    (12288, 4096),
    (23296, 4096),
    (6144, 4096),
    (32768, 4096),
    (4096, 14336),
    (3584, 3584),
    (18944, 3584),
    (3584, 18944),
    (512, 3584),
    (3840, 3840),
    (15360, 3840),
    (3840, 15360),
    (576, 576),
    (1536, 576),
    (576, 1536),
    (192, 576),
    (1000, 2050),
    (300, 301),
    (257, 1030),
    (70, 130),
]
MENU = [(1, 4), (1, 8), (1, 16), (2, 8), (2, 16), (2, 32), (2, 64), (2, 128), (2, 256), (3, 32), (3, 64), (3, 128)]
MENU += [(3, 256), (4, 256), (4, 16), (2, 4)]
KS = (4096, 512, 128, 100)
RANKS = (0, 48, 96)
TOKENS = (1, 2, 4, 5, 8, 9, 33, 64, 65, 2048)


class FakeKernel:
    """A compiled kernel's stand-in: records launches; occupancy a fixed function of the shared memory."""

    def __init__(self, *key, **kw):
        self.key, self.launches = key, []

    def occupancy(self, smem: int) -> int:
        return max(1, min(8, (228 * 1024) // max(smem, 1024)))

    def launch(self, grid, smem, params):
        self.launches.append((tuple(grid), smem))


def registry(tuning: Tuning, toolchain: bool) -> backends.Registry:
    reg = object.__new__(backends.Registry)
    reg.device, reg.tuning = torch.device("cuda", 0), tuning
    reg.cuda_reason = None if toolchain else "no NVRTC (dump)"
    reg.triton_reason = None  # (the Triton PQ backends, before they were removed: present)
    return reg


def token_classes(tuning):
    return backends.token_classes(tuning)


def geometries():
    for (N, M), (d, n), k in itertools.product(SHAPES, MENU, KS):
        if n <= N:
            yield PQGeometry(N, M, d, n, k)


def g(geo: PQGeometry) -> str:
    return f"{geo.N}x{geo.M} d{geo.d} n{geo.n} k{geo.k}"


def dump_resolve(out, prof, tuning):
    for geo in geometries():
        for tc, dtype in ((True, torch.float16), (False, torch.float16), (True, torch.bfloat16)):
            reg = registry(tuning, tc)
            for T in TOKENS if dtype == torch.float16 else (1, 2048):
                name, skipped = reg.resolve(geo, T, dtype)
                skip = [s for s, _ in skipped]
                out.append(f"resolve {prof} {g(geo)} toolchain={tc} {dtype} T={T}: {name} skip={skip}")


def layer(geo: PQGeometry, rank: int):
    qw = torch.empty(geo.GW, geo.N_pad, dtype=torch.int32)
    cb = torch.empty(geo.Nb, geo.G_pad, geo.d, geo.n, dtype=torch.float16)
    A = torch.empty(geo.N, rank, dtype=torch.float16) if rank else None
    B = torch.empty(rank, geo.M, dtype=torch.float16) if rank else None
    return qw, cb, A, B


def glus(geo: PQGeometry):
    yield None
    if geo.N >= 2 * 512:  # a fused gate/up layer: gate rows [0, F), up rows from the next codebook block
        F = geo.N // 2 // 8 * 8
        up = -(-F // geo.k) * geo.k if -(-F // geo.k) * geo.k + F <= geo.N else F
        if up % 8 == 0:
            yield (up, F)


def dump_lut(out, prof, tuning):
    sync = torch.zeros(lut.SYNC_INTS, dtype=torch.int32)
    with (
        mock.patch.object(lut, "_kernel", FakeKernel),
        mock.patch.object(lut, "sync_buffer", lambda dev: sync),
    ):
        for geo in geometries():
            if geo.k not in (4096, 128) or geo.N > 16000:
                continue
            for t_inst in lut.TOKENS:
                if lut.supports(geo, t_inst, torch.float16) is not None:
                    continue
                for rank in RANKS:
                    qw, cb, A, B = layer(geo, rank)
                    for glu in glus(geo):
                        p = lut.LutPlan(qw, cb, geo, A, B, None, t_inst, tuning=tuning, glu=glu)
                        ints = [a.value for a in p.args if isinstance(a, ctypes.c_int)]
                        ep = p.ep
                        out.append(
                            f"lut {prof} {g(geo)} T={t_inst} rank={rank} glu={glu}: {p.kernel.key[0]} slab={p.slab_w} "
                            f"rows={p.rows} grid={p.grid} smem={p.smem} fused={p.fused} n_epi={ep.n_epi} "
                            f"tile={ep.tile} poll={ep.poll_ns} n_out={p.n_out} ints={ints}"
                        )


def dump_frag(out, prof, tuning):
    kernels = {}

    def kernel(*key):
        return kernels.setdefault(key, FakeKernel(*key))

    seen = []

    def epilogue(partial, u_part, lowrank_a, bias, T, N, dtype, glu, *, tuning):
        seen.append((tuple(partial.shape), None if u_part is None else tuple(u_part.shape), T, N, glu))
        return None

    with mock.patch.object(frag, "_kernel", kernel), mock.patch.object(frag, "splitk_epilogue", epilogue):
        for geo in geometries():
            if geo.k not in (4096, 128, 512) or frag.supports(geo, 1, torch.float16) is not None:
                continue
            for rank in RANKS:
                qw, cb, A, B = layer(geo, rank)
                for T in (1, 2, 5, 16, 17, 32, 33, 64):
                    x = torch.empty(T, geo.M, dtype=torch.float16)
                    for glu in glus(geo):
                        kernels.clear()
                        seen.clear()
                        frag.frag_matmul(x, qw, cb, geo, A, B, None, glu=glu, tuning=tuning, checked=True)
                        ((key, k),) = kernels.items()
                        out.append(
                            f"frag {prof} {g(geo)} T={T} rank={rank} glu={glu}: {frag.kernel_name(*key[:4])} "
                            f"launch={k.launches} epilogue={seen}"
                        )


def dump_dequant(out, prof, tuning):
    for geo in geometries():
        if dequant.supports(geo, torch.float16) is not None:
            out.append(f"dequant {prof} {g(geo)}: unsupported ({dequant.supports(geo, torch.float16)})")
            continue
        s, r = dequant.choose_launch(geo, tuning)
        n_row = -(-min(geo.k, geo.N) // r) * geo.Nb
        smem = dequant.smem_bytes(geo.bits, geo.d, s)
        line = f"dequant {prof} {g(geo)}: slab={s} rows={r} grid=({n_row}, {geo.GW // s}) smem={smem}"
        for rank in (0, 16, 48, 64, 96, 144):
            names = dequant.kernel_names(geo, rank)
            fold = dequant.fold_supports(geo, rank) if rank else "-"
            rows = dequant.choose_fold_rows(geo, tuning) if rank and fold is None else None
            mode = _lowrank_mode(geo, rank) if rank else None
            line += f" | rank {rank}: {names} fold={fold} fold_rows={rows} mode={mode}"
        out.append(line)


def _lowrank_mode(geo, rank):
    from athena_runtime.kernels import dequant_matmul

    try:
        return dequant_matmul.default_lowrank_mode(geo, "cuda", rank)
    except TypeError:
        return dequant_matmul.default_lowrank_mode(geo, rank)


def dump_splitk(out, prof, tuning):
    for T, n_out, n_s in itertools.product(
        (1, 2, 3, 4, 5, 16, 64), (576, 1536, 4096, 11008, 14336, 18944), (1, 8, 16, 64, 100, 140, 256, 300)
    ):
        if T > tuning.splitk_tile_min_tokens:
            out.append(f"splitk {prof} T={T} n_out={n_out}: tile 16x64 grid=({-(-n_out // 64)}, {-(-T // 16)})")
        else:
            launch = splitk._few_token_launch(T, n_out, n_s, tuning)
            out.append(f"splitk {prof} T={T} n_out={n_out} slabs={n_s}: {launch}")


def dump_decode(out, prof, tuning):
    from athena_runtime.kernels.paged_decode import decode_num_splits

    for seqs, heads, pages, window, hd in itertools.product(
        (1, 2, 4, 16, 64), (1, 4, 8, 32), (1, 8, 64, 256), (None, 512, 4096), (64, 128, 256)
    ):
        tile, warps = tuning.decode_launch_shape(hd)
        out.append(
            f"decode {prof} seqs={seqs} kv_heads={heads} pages={pages} window={window} head_dim={hd}: "
            f"splits={decode_num_splits(seqs, heads, pages, 16, tile, tuning, window)} tile={tile} warps={warps} "
            f"kv_write_warps={1 if hd <= tuning.kv_write_one_warp_max_head_dim else 2}"
        )


def main() -> None:
    out: list[str] = []
    for prof, (sms, smem) in PROFILES.items():
        tuning = dataclasses.replace(Tuning(), sms=sms, smem_per_cta=smem)
        out.append(f"tuning {prof}: classes={token_classes(tuning)}")
        for fn in (dump_resolve, dump_lut, dump_frag, dump_dequant, dump_splitk, dump_decode):
            fn(out, prof, tuning)
    sys.stdout.write("\n".join(sorted(out)) + "\n")


if __name__ == "__main__":
    main()
