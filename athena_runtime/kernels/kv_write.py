"""The quantized KV-cache write of one layer (K and V) in one Triton launch.

`KVCache.write` (kv_cache.py) in one program per (token, KV head, K or V); the algorithm and its exactness against
`KVCache.write_reference` (the spec): docs/ARCHITECTURE.md §10 (kv_write.py).

Launch: one warp for D <= `Tuning.kv_write_one_warp_max_head_dim` (it holds the whole head: no cross-warp
reductions), else two.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from athena_runtime.kernels.pq_reference import interpreting
from athena_runtime.kernels.splitk import triton
from athena_runtime.kernels.tuning import Tuning
from athena_runtime.kv_quant_params import CLIP_RATIOS, SCALE_MIN, SCALE_ROUND_UP

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _hadamard_sign(i, j):
        """(-1)^popcount(i & j) as float32: the sign of entry (i, j) of a Sylvester-Hadamard matrix (i, j < 2^16)."""
        p = i & j
        p = p ^ (p >> 8)
        p = p ^ (p >> 4)
        p = p ^ (p >> 2)
        p = p ^ (p >> 1)
        return 1.0 - 2.0 * (p & 1).to(tl.float32)

    @triton.jit
    def _round_half_even(y):
        """torch.round (half to even) of float32 y with |y| < 2^31."""
        f = tl.floor(y)
        d = y - f  # exact
        odd = (f.to(tl.int32) & 1) == 1
        return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)

    @triton.jit
    def _round_to_bfloat16(y):
        """float32 y rounded to bfloat16 (to nearest, ties to even, as torch), kept in float32. By hand:
        the interpreter's float32 -> bfloat16 cast truncates."""
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _div_const(a, C: tl.constexpr, INV_C: tl.constexpr, RECIPROCAL: tl.constexpr):
        """a / C as the device's PyTorch computes `tensor / python_scalar`."""
        if RECIPROCAL:
            return a * INV_C
        else:
            return tl.math.div_rn(a, C)

    @triton.jit
    def _load_in_basis(src_ptr, m_ptr, delta_ptr, d_ptr, offs, first, HAS_BASIS: tl.constexpr):
        """x[offs] in float32, with the key basis (x - m - first·δ) ⊙ d applied when HAS_BASIS."""
        x = tl.load(src_ptr + offs).to(tl.float32)
        if HAS_BASIS:
            x = (x - tl.load(m_ptr + offs)) - first * tl.load(delta_ptr + offs)
            x = x * tl.load(d_ptr + offs)
        return x

    @triton.jit
    def _head_in_stored_basis(
        src_ptr,
        m_ptr,
        delta_ptr,
        d_ptr,
        first,
        HAS_BASIS: tl.constexpr,
        ROTATE: tl.constexpr,
        ROUND: tl.constexpr,
        H_ENTRY: tl.constexpr,
        NG: tl.constexpr,
        G: tl.constexpr,
        BLOCK_I: tl.constexpr,
    ):
        """One head vector in the stored basis as a float32 [NG, G] tile (row = quantization group)."""
        offs_g = tl.arange(0, NG)
        offs_e = tl.arange(0, G)
        if ROTATE:
            # x·(H_NG ⊗ H_G) = H_NG · X · H_G. X·H_G in chunks of BLOCK_I inputs: the sign of (i0 + i, j) is
            # sign(i0, j)·sign(i, j) (i0 a multiple of BLOCK_I, i < BLOCK_I: disjoint bits).
            offs_i = tl.arange(0, BLOCK_I)
            sign = _hadamard_sign(offs_i[:, None], offs_e[None, :])  # [BLOCK_I, G]
            acc = tl.zeros([NG, G], dtype=tl.float32)
            for i0 in tl.static_range(0, G, BLOCK_I):
                x = (
                    _load_in_basis(
                        src_ptr, m_ptr, delta_ptr, d_ptr, offs_g[:, None] * G + i0 + offs_i[None, :], first, HAS_BASIS
                    )
                    * H_ENTRY
                )  # [NG, BLOCK_I]
                acc += _hadamard_sign(i0, offs_e)[None, :] * tl.sum(x[:, :, None] * sign[None, :, :], axis=1)
            if NG > 1:
                sign_g = _hadamard_sign(offs_g[:, None], offs_g[None, :])  # [NG, NG]
                acc = tl.sum(sign_g[:, :, None] * acc[:, None, :], axis=0)
            y = acc
        else:
            y = _load_in_basis(
                src_ptr, m_ptr, delta_ptr, d_ptr, offs_g[:, None] * G + offs_e[None, :], first, HAS_BASIS
            )
        if ROUND:  # the reference keeps x·H in the input dtype
            if src_ptr.dtype.element_ty == tl.bfloat16:
                y = _round_to_bfloat16(y)
            else:
                y = y.to(src_ptr.dtype.element_ty).to(tl.float32)
        return y

    @triton.jit
    def _clip_candidate(
        y,
        mid,
        c_half,
        QSTEPS: tl.constexpr,
        INV_QSTEPS: tl.constexpr,
        RECIPROCAL_DIV: tl.constexpr,
        SCALE_MIN: tl.constexpr,
        SCALE_ROUND_UP: tl.constexpr,
    ):
        """One clip ratio of `quantize_asymmetric` for y [NG, G]: the range [mid - c·half, mid + c·half] ->
        (squared error [NG], n [NG, G] float32, scale, zero float16 [NG]); zero and scale rounded first."""
        zero = (mid - c_half).to(tl.float16)
        z = zero.to(tl.float32)
        scale = tl.maximum(
            _div_const((mid + c_half) - z, QSTEPS, INV_QSTEPS, RECIPROCAL_DIV) * SCALE_ROUND_UP, SCALE_MIN
        ).to(tl.float16)
        s = scale.to(tl.float32)
        t = tl.minimum(tl.maximum(tl.math.div_rn(y - z[:, None], s[:, None]), -1.0), QSTEPS + 1.0)
        n = tl.minimum(tl.maximum(_round_half_even(t), 0.0), QSTEPS)
        e = (n * s[:, None] + z[:, None]) - y
        return tl.sum(e * e, axis=1), n, scale, zero

    @triton.jit
    def _quantize_store(
        y,
        data_ptr,
        scale_ptr,
        zero_ptr,
        INT4: tl.constexpr,
        NG: tl.constexpr,
        G: tl.constexpr,
        QSTEPS: tl.constexpr,
        INV_QSTEPS: tl.constexpr,
        RECIPROCAL_DIV: tl.constexpr,
        SCALE_MIN: tl.constexpr,
        SCALE_ROUND_UP: tl.constexpr,
        CLIP_RATIOS: tl.constexpr,
    ):
        """Quantize y [NG, G] per row and store it: int8 `quantize_symmetric` (QSTEPS = 127) or int4
        `quantize_asymmetric` (QSTEPS = 15, clip-ratio search, nibble-packed)."""
        offs_g = tl.arange(0, NG)
        if INT4:
            lo = tl.min(y, axis=1)
            hi = tl.max(y, axis=1)
            mid = (lo + hi) * 0.5  # = (lo + hi) / 2 exactly
            half = (hi - lo) * 0.5
            best_err, best_n, best_scale, best_zero = _clip_candidate(
                y, mid, CLIP_RATIOS[0] * half, QSTEPS, INV_QSTEPS, RECIPROCAL_DIV, SCALE_MIN, SCALE_ROUND_UP
            )
            for ci in tl.static_range(1, len(CLIP_RATIOS)):
                err, n, scale, zero = _clip_candidate(
                    y, mid, CLIP_RATIOS[ci] * half, QSTEPS, INV_QSTEPS, RECIPROCAL_DIV, SCALE_MIN, SCALE_ROUND_UP
                )
                better = err < best_err  # strictly: the first of equal errors wins
                best_err = tl.where(better, err, best_err)
                best_n = tl.where(better[:, None], n, best_n)
                best_scale = tl.where(better, scale, best_scale)
                best_zero = tl.where(better, zero, best_zero)
            nib = tl.reshape(best_n.to(tl.int32), (NG, G // 2, 2))
            n_even, n_odd = tl.split(nib)  # element 2i -> low nibble, 2i + 1 -> high
            offs_p = tl.arange(0, G // 2)
            tl.store(data_ptr + offs_g[:, None] * (G // 2) + offs_p[None, :], (n_even | (n_odd << 4)).to(tl.uint8))
            tl.store(scale_ptr + offs_g, best_scale)
            tl.store(zero_ptr + offs_g, best_zero)
        else:
            amax = tl.max(tl.abs(y), axis=1)  # [NG]
            scale = tl.maximum(_div_const(amax, QSTEPS, INV_QSTEPS, RECIPROCAL_DIV) * SCALE_ROUND_UP, SCALE_MIN).to(
                tl.float16
            )
            s = scale.to(tl.float32)
            t = tl.minimum(tl.maximum(tl.math.div_rn(y, s[:, None]), -QSTEPS - 1.0), QSTEPS + 1.0)
            q = tl.minimum(tl.maximum(_round_half_even(t), -QSTEPS), QSTEPS)
            offs_e = tl.arange(0, G)
            tl.store(data_ptr + offs_g[:, None] * G + offs_e[None, :], q.to(tl.int8))
            tl.store(scale_ptr + offs_g, scale)

    @triton.jit
    def _kv_write_kernel(
        k_ptr,
        v_ptr,
        slot_ptr,
        pos_ptr,
        k_data_ptr,
        v_data_ptr,
        k_scale_ptr,
        v_scale_ptr,
        k_zero_ptr,
        v_zero_ptr,
        m_ptr,
        delta_ptr,
        d_ptr,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_ds,
        stride_dh,
        stride_ps,
        stride_ph,
        HAS_BASIS: tl.constexpr,
        ROTATE: tl.constexpr,
        ROUND_K: tl.constexpr,
        H_ENTRY: tl.constexpr,
        INT4: tl.constexpr,
        D: tl.constexpr,
        G: tl.constexpr,
        BLOCK_I: tl.constexpr,
        QSTEPS: tl.constexpr,
        INV_QSTEPS: tl.constexpr,
        RECIPROCAL_DIV: tl.constexpr,
        SCALE_MIN: tl.constexpr,
        SCALE_ROUND_UP: tl.constexpr,
        CLIP_RATIOS: tl.constexpr,
    ):
        """Program (t, h, 0) writes token t's key of KV head h, (t, h, 1) its value."""
        t = tl.program_id(0)
        h = tl.program_id(1)
        NG: tl.constexpr = D // G
        row = tl.load(slot_ptr + t).to(tl.int64)
        t = t.to(tl.int64)  # t·stride may pass 2^31 on long prefills
        if tl.program_id(2) == 0:
            first = (tl.load(pos_ptr + t) == 0).to(tl.float32)
            y = _head_in_stored_basis(
                k_ptr + t * stride_kt + h * stride_kh,
                m_ptr + h * D,
                delta_ptr + h * D,
                d_ptr + h * D,
                first,
                HAS_BASIS,
                ROTATE,
                ROUND_K,
                H_ENTRY,
                NG,
                G,
                BLOCK_I,
            )
            data_ptr, scale_ptr, zero_ptr = k_data_ptr, k_scale_ptr, k_zero_ptr
        else:
            y = _head_in_stored_basis(
                v_ptr + t * stride_vt + h * stride_vh,
                m_ptr,
                delta_ptr,
                d_ptr,
                0.0,
                False,
                ROTATE,
                True,
                H_ENTRY,
                NG,
                G,
                BLOCK_I,
            )
            data_ptr, scale_ptr, zero_ptr = v_data_ptr, v_scale_ptr, v_zero_ptr
        _quantize_store(
            y,
            data_ptr + row * stride_ds + h * stride_dh,
            scale_ptr + row * stride_ps + h * stride_ph,
            zero_ptr + row * stride_ps + h * stride_ph,
            INT4,
            NG,
            G,
            QSTEPS,
            INV_QSTEPS,
            RECIPROCAL_DIV,
            SCALE_MIN,
            SCALE_ROUND_UP,
            CLIP_RATIOS,
        )


def _is_pow2(n: int) -> bool:
    return n > 0 and not n & (n - 1)


def _fp32(x: float) -> float:
    """x rounded to float32 (as PyTorch casts a Python scalar), back as a Python float."""
    return float(np.float32(x))


def hadamard_entry(n: int) -> float:
    """|H[i, j]| of the cache's `hadamard_matrix(n)`: 1/√n rounded as PyTorch computes it in float32."""
    return float(np.float32(1.0) / np.float32(math.sqrt(n)))


def kv_write_unsupported(kv_cache) -> str | None:
    """Why `kv_write` cannot take this cache, or None when it can."""
    if triton is None:
        return "no Triton"
    if kv_cache.fmt not in ("int8", "int4"):
        return f"format {kv_cache.fmt} is not quantized"
    D, G = kv_cache.head_dim, kv_cache.group_size
    if not (_is_pow2(D) and _is_pow2(G)) or D > 2**16 or (kv_cache.fmt == "int4" and G < 2):
        return f"head_dim {D} / group_size {G} not powers of two"
    return None


def kv_write(
    kv_cache, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor
) -> None:
    """Quantize k, v [T, Hkv, D] (tokens at `positions` [T]) into slots `slot_mapping` [T] of an int8 / int4
    cache's `layer`, one launch. Same result as `KVCache.write_reference` (module docstring: exactness)."""
    reason = kv_write_unsupported(kv_cache)
    if reason is not None:
        raise ValueError(f"kv_write cannot write {kv_cache}: {reason}")
    if not (k.is_cuda or interpreting()):
        raise ValueError("kv_write needs CUDA tensors (or TRITON_INTERPRET=1)")
    T, Hkv, D = k.shape
    if (Hkv, D) != (kv_cache.num_kv_heads, kv_cache.head_dim) or v.shape != k.shape:
        raise ValueError(
            f"kv_write takes k, v [T, {kv_cache.num_kv_heads}, {kv_cache.head_dim}], "
            f"got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.stride(-1) != 1 or v.stride(-1) != 1 or slot_mapping.shape != (T,) or positions.shape != (T,):
        raise ValueError("kv_write needs the head dimension contiguous and slot_mapping, positions [T]")
    if T == 0:
        return
    G, int4 = kv_cache.group_size, kv_cache.fmt == "int4"
    data = [t[layer].view(-1, Hkv, t.shape[-1]) for t in (kv_cache.k, kv_cache.v)]  # [slots, Hkv, D_stored]
    scale = [t[layer].view(-1, Hkv, D // G) for t in (kv_cache.k_scale, kv_cache.v_scale)]  # [slots, Hkv, D/G]
    zero = [t[layer].view(-1, Hkv, D // G) for t in (kv_cache.k_zero, kv_cache.v_zero)] if int4 else scale
    assert data[0].stride() == data[1].stride() and scale[0].stride() == scale[1].stride() == zero[0].stride()
    has_basis = kv_cache.key_offset is not None
    basis = (
        [t[layer] for t in (kv_cache.key_offset, kv_cache.sink_offset, kv_cache.key_scale)] if has_basis else [k, k, k]
    )  # [Hkv, D] float32 each (unused without a basis)
    assert not has_basis or all(b.is_contiguous() for b in basis)
    rotate = kv_cache.rotation is not None
    qsteps = 15.0 if int4 else 127.0
    _kv_write_kernel[(T, Hkv, 2)](
        k,
        v,
        slot_mapping,
        positions,
        data[0],
        data[1],
        scale[0],
        scale[1],
        zero[0],
        zero[1],
        *basis,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        data[0].stride(0),
        data[0].stride(1),
        scale[0].stride(0),
        scale[0].stride(1),
        HAS_BASIS=has_basis,
        ROTATE=rotate,
        ROUND_K=not has_basis,
        H_ENTRY=hadamard_entry(D),
        INT4=int4,
        D=D,
        G=G,
        BLOCK_I=min(G, 16),
        QSTEPS=qsteps,
        INV_QSTEPS=float(np.float32(1.0) / np.float32(qsteps)),
        RECIPROCAL_DIV=k.is_cuda,
        SCALE_MIN=SCALE_MIN,
        SCALE_ROUND_UP=SCALE_ROUND_UP,
        CLIP_RATIOS=tuple(_fp32(c) for c in CLIP_RATIOS),
        enable_fp_fusion=False,
        num_warps=1 if D <= Tuning.for_device(k.device).kv_write_one_warp_max_head_dim else 2,
    )
