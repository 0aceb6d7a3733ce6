"""Batched (metric) k-means and uint8 codebook quantization."""

import pytest
import torch

from athena_runtime.format.layers import dequantize_codebook_uint8, quantize_codebook_uint8
from quantize.kmeans import (
    assign,
    kmeans,
    kmeans_pp_seed_indices,
    metric_kmeans,
    quantization_error,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_seeds_are_distinct_real_points():
    z = torch.randn(4, 2, 100, generator=gen(0))
    weight = torch.ones(4, 100)
    weight[1, 70:] = 0
    z[1, :, 70:] = 0
    idx = kmeans_pp_seed_indices(z, 32, weight, gen(1))
    assert idx.shape == (4, 32)
    for b in range(4):
        assert len(set(idx[b].tolist())) == 32
    assert int(idx[1].max()) < 70  # padding never seeds while real points are left


def test_recovers_separated_clusters():
    centres = torch.tensor([[-10.0, 0.0, 10.0, 0.0], [0.0, 10.0, 0.0, -10.0]])  # [d=2, 4]
    pts = centres.repeat_interleave(25, dim=1) + 0.1 * torch.randn(2, 100, generator=gen(0))
    z = pts.unsqueeze(0)  # [1, 2, 100]
    C = kmeans(z, 4, 5, gen(2))
    idx, _ = assign(z, C)
    err = quantization_error(z, C, idx)
    assert float(err) < float((0.1 * torch.randn(2, 100, generator=gen(0))).square().sum()) * 1.01
    found = sorted(tuple(round(v) for v in c) for c in C[0].T.tolist())
    assert found == sorted(tuple(c) for c in centres.T.round().int().tolist())


def test_lloyd_iterations_do_not_hurt():
    z = torch.randn(3, 2, 300, generator=gen(1)) * torch.tensor([1.0, 3.0]).view(1, 2, 1)
    losses = []
    for iters in (1, 4, 12):
        C = kmeans(z, 16, iters, gen(5))
        idx, _ = assign(z, C)
        losses.append(float(quantization_error(z, C, idx)))
    assert losses[2] <= losses[1] * 1.0001 <= losses[0] * 1.0002


def test_metric_kmeans_beats_euclidean_on_metric_loss():
    for trial in range(4):
        g = gen(100 + trial)
        d = 2 + trial % 2
        A = torch.randn(d, d, generator=g)
        metric = A @ A.T + 0.05 * torch.eye(d)  # random, strongly anisotropic
        x = torch.randn(2, d, 256, generator=g)
        Cm, im = metric_kmeans(x, 16, metric, 10, gen(trial))
        Ce = kmeans(x, 16, 10, gen(trial))
        ie, _ = assign(x, Ce)
        # the Euclidean codebook, best-assigned under the metric (its most favourable reading)
        Lt = torch.linalg.cholesky(metric).T
        ie_m, _ = assign(Lt @ x, Lt @ Ce)
        loss_metric = float(quantization_error(x, Cm, im, metric))
        loss_euclid = min(float(quantization_error(x, Ce, ie, metric)), float(quantization_error(x, Ce, ie_m, metric)))
        assert loss_metric <= loss_euclid


def test_empty_clusters_reseeded_fewer_points_than_centroids():
    z = torch.randn(2, 3, 10, generator=gen(3))
    C = kmeans(z, 64, 4, gen(4))
    idx, _ = assign(z, C)
    assert C.shape == (2, 3, 64)
    assert float(quantization_error(z, C, idx)) < 1e-10  # every point got its own centroid


def test_padding_never_pulls_centroids():
    z = torch.rand(2, 2, 40, generator=gen(6)) + 5.0  # real points in [5, 6]^2
    weight = torch.ones(2, 40)
    weight[1, 25:] = 0
    z[1, :, 25:] = 0.0  # padding rows are zero vectors
    C = kmeans(z, 8, 6, gen(7), weight)
    assert bool((C >= 5.0).all()) and bool((C <= 6.0).all())


def test_deterministic_with_seed():
    z = torch.randn(3, 2, 200, generator=gen(8))
    assert torch.equal(kmeans(z, 16, 5, gen(9)), kmeans(z, 16, 5, gen(9)))
    assert not torch.equal(kmeans(z, 16, 5, gen(9)), kmeans(z, 16, 5, gen(10)))


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_uint8_codebook_error_bound(scale):
    C = torch.randn(5, 7, 64, 3, generator=gen(11)) * scale - 0.3 * scale  # [Nb, G, n, d]
    C[0, 0] = 0.125  # a constant codebook: scale 0, exact
    codes, s, m = quantize_codebook_uint8(C, dim=-2)
    assert codes.dtype == torch.uint8 and s.dtype == torch.float16 and m.dtype == torch.float16
    assert s.shape == (5, 7, 3) and m.shape == (5, 7, 3)
    deq = dequantize_codebook_uint8(codes, s, m, dim=-2)
    bound = s.float().unsqueeze(-2) / 2 * (1 + 1e-5) + 1e-12 * scale
    assert bool(((C - deq).abs() <= bound).all())
    assert torch.equal(deq[0, 0], C[0, 0])
    assert int(codes.max()) == 255 and int(codes.min()) == 0  # the full range is used


def test_chunked_distances_give_identical_results(monkeypatch):
    """Large n or K bound the [B, K, n] scratch by chunking; the results must not change."""
    import quantize.kmeans as km

    z = torch.randn(5, 2, 300, generator=gen(12))
    weight = torch.ones(5, 300)
    full_seeds = kmeans_pp_seed_indices(z, 64, weight, gen(13))
    full = kmeans(z, 64, 4, gen(13), weight)
    monkeypatch.setattr(km, "_MAX_DIST_ELEMS", 300 * 20)
    assert torch.equal(kmeans_pp_seed_indices(z, 64, weight, gen(13)), full_seeds)
    chunked = kmeans(z, 64, 4, gen(13), weight)
    assert torch.allclose(chunked, full, atol=1e-6)
    assert torch.equal(assign(z, chunked)[0], assign(z, full)[0])
