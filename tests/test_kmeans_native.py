"""The compiled k-means steps (quantize/kmeans_native.c) against the PyTorch loop they replace on the CPU."""

import logging

import pytest
import torch

from quantize.kmeans import NATIVE, assign, gather_points, kmeans, kmeans_pp_seed_indices
from quantize.kmeans_native import NativeKMeans


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", autouse=True)
def built():
    ok = NATIVE.usable_for(torch.zeros(1))
    if not ok:  # CI has a compiler (the CPU kernels need one too): a failed build is a failure here
        pytest.fail("the compiled k-means did not build: " + str(NATIVE._error))


def _problem(B, d, K, n, seed, padded=True, scale=None):
    g = gen(seed)
    z = torch.randn(B, d, K, generator=g)
    w = torch.ones(B, K) if scale is None else torch.rand(B, K, generator=g) * scale
    if padded and B > 1:
        w[0, K // 2 :] = 0  # a shorter problem padded into the batch: zero points, weight 0
        z[0, :, K // 2 :] = 0
    init = gather_points(z, kmeans_pp_seed_indices(z, n, w, g))
    return z, w, init


@pytest.mark.parametrize(
    "B,d,K,n",
    [(3, 2, 576, 64), (2, 2, 1537, 64), (1, 1, 333, 16), (2, 4, 1101, 256), (5, 3, 65, 8), (1, 2, 63, 2), (1, 8, 9, 4)],
)
def test_lloyd_matches_pytorch(B, d, K, n):
    """Same steps, same order of sums: the centroids agree to float rounding and the assignments exactly (odd
    point counts across the 64-point tiles, padding, d = 1..8, n = 2..256)."""
    z, w, init = _problem(B, d, K, n, seed=B * 1000 + K)
    ref = kmeans(z, n, 8, None, w, init=init, native=False)
    got = kmeans(z, n, 8, None, w, init=init)
    assert got.shape == ref.shape == (B, d, n) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    i_ref, s_ref = assign(z, ref, native=False)
    i_got, s_got = assign(z, got)
    assert torch.equal(i_got, i_ref)
    torch.testing.assert_close(s_got, s_ref, rtol=1e-5, atol=1e-5)


def test_weighted_means():
    """Non-uniform weights (the row-scaled quantizer's s²): weighted means, as the PyTorch loop."""
    z, w, init = _problem(2, 2, 400, 32, seed=7, scale=3.0)
    torch.testing.assert_close(
        kmeans(z, 32, 6, None, w, init=init), kmeans(z, 32, 6, None, w, init=init, native=False), rtol=1e-5, atol=1e-6
    )


def test_ties_go_to_the_lowest_index():
    z = torch.tensor([[[0.0, 1.0, -1.0]]])  # [1, 1, 3]
    C = torch.tensor([[[1.0, -1.0, 1.0, -1.0]]])  # duplicate centroids; 0 is equidistant from all four
    idx, smin = assign(z, C)
    assert idx.tolist() == [[0, 0, 1]]
    assert torch.equal(idx, assign(z, C, native=False)[0])
    torch.testing.assert_close(smin, torch.tensor([[1.0, -1.0, -1.0]]))


def test_empty_clusters_get_distinct_far_points():
    """Two centroids far from every point end empty: each gets a distinct real point of largest error
    (the two farthest from their centroids), never a padding point."""
    z = torch.tensor([[[0.0, 0.1, 5.0, 5.3, 9.0, 0.0, 0.0]]])  # [1, 1, 7]; last two are padding
    w = torch.tensor([[1.0, 1, 1, 1, 1, 0, 0]])
    init = torch.tensor([[[0.05, 5.1, 100.0, 200.0]]])
    got = kmeans(z, 4, 1, None, w, init=init)
    ref = kmeans(z, 4, 1, None, w, init=init, native=False)
    torch.testing.assert_close(got, ref)
    assert torch.equal(got[0, 0, 2:], torch.tensor([9.0, 5.3]))  # largest error first


def test_more_centroids_than_points():
    """n > K: every point becomes a centroid and the loss is 0, as with the PyTorch loop."""
    z, w, init = _problem(1, 2, 10, 16, seed=3, padded=False)
    C = kmeans(z, 16, 4, None, w, init=init)
    idx, smin = assign(z, C)
    assert float((smin + z.square().sum(1)).abs().max()) < 1e-5


def test_other_devices_and_dtypes_use_pytorch():
    assert not NATIVE.usable_for(torch.zeros(2, dtype=torch.float64))
    z, w, init = _problem(2, 2, 100, 8, seed=5)
    C64 = kmeans(z.double(), 8, 3, None, w.double(), init=init.double())
    assert C64.dtype == torch.float64  # the PyTorch loop ran (and kept the dtype)
    torch.testing.assert_close(C64.float(), kmeans(z, 8, 3, None, w, init=init), rtol=1e-4, atol=1e-5)


def test_no_compiler_falls_back_loudly(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("ATHENA_CACHE_DIR", str(tmp_path))  # no cached build to find
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path))
    lib = NativeKMeans()
    with caplog.at_level(logging.WARNING, logger="quantize.kmeans_native"):
        assert not lib.usable_for(torch.zeros(1))
        assert not lib.usable_for(torch.zeros(1))  # remembered: one warning
    warnings = [r for r in caplog.records if "using the PyTorch loop" in r.getMessage()]
    assert len(warnings) == 1 and "no C compiler found" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="no C compiler"):
        lib.load()


@pytest.mark.parametrize("B,d,K,n", [(64, 2, 1537, 64), (3, 1, 100, 16), (2, 4, 700, 256), (1, 3, 65, 8)])
def test_seeding_matches_pytorch(B, d, K, n):
    """The compiled D²-sampling rounds pick the same points from the same random keys (padding included)."""
    g = gen(K)
    z = torch.randn(B, d, K, generator=g)
    w = torch.ones(B, K)
    if B > 1:
        w[1, K // 2 :] = 0
        z[1, :, K // 2 :] = 0
    ref = kmeans_pp_seed_indices(z, n, w, gen(9), native=False)
    got = kmeans_pp_seed_indices(z, n, w, gen(9))
    assert got.shape == (B, n) and got.dtype == torch.int64
    assert torch.equal(got, ref)
    assert all(len(set(row.tolist())) == n for row in got)
