"""The Athena quantizer: error feedback, low rank, shapes, batching, storage round trips, refusals."""

import pytest
import torch

from athena_runtime.format.layers import AthenaLayer, layer_from_tensors
from quantize.athena import quantize_athena
from quantize.hessian import HessianAccumulator, prepare_hessian
from quantize.recipe import AthenaRecipe


def calibration(M, S=None, seed=0):
    """Correlated inputs X [S, M] with uneven channel scales, and H = 2/S XᵀX."""
    g = torch.Generator().manual_seed(seed)
    S = S or 4 * M
    scales = torch.exp(0.7 * torch.randn(M, generator=g))
    X = (torch.randn(S, M, generator=g) @ (torch.eye(M) + 0.5 * torch.randn(M, M, generator=g) / M**0.5)) * scales
    acc = HessianAccumulator(M)
    acc.add_batch(X[: S // 2])
    acc.add_batch(X[S // 2 :])
    return X, acc.hessian(0.0)


def weights(shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, M, generator=g) * 0.02 for N, M in shapes]


def layer_loss(W, layer, X, include_lowrank=True):
    """‖(W - W_eff) Xᵀ‖² relative to ‖W Xᵀ‖², straight from the calibration inputs."""
    E = W - layer.dequantize(include_lowrank)
    return float((E @ X.T).square().sum() / (W @ X.T).square().sum())


@pytest.mark.parametrize("d", [1, 2, 3, 4])
@pytest.mark.parametrize("codebook_bits", [8, 16])
def test_error_feedback_is_exact(d, codebook_bits):
    """Σ over groups of the whitened errors equals tr(E H_damped Eᵀ): the updates are the optimal ones."""
    M = 37  # not a multiple of 2, 3, 4
    _, H = calibration(M)
    Ws = weights([(45, M), (20, M)])  # 45 rows: blocks of 16, 16, 13
    recipe = AthenaRecipe(d=d, n=4, k=16, codebook_bits=codebook_bits, lowrank=0, block_size=5, kmeans_iters=3)
    Hd = prepare_hessian(H, recipe.damp).double()
    for W, (layer, stats) in zip(Ws, quantize_athena(Ws, H, recipe)):
        E = W.double() - layer.dequantize().double()
        expected = float(((E @ Hd) * E).sum())
        assert stats["hessian_loss_damped"] == pytest.approx(expected, rel=2e-4)


def test_feedback_and_lowrank_lower_the_layer_loss():
    M = 64
    X, H = calibration(M)
    (W,) = weights([(96, M)])
    base = dict(d=2, n=8, k=32, codebook_bits=16, kmeans_iters=6)
    ((l_fb, s_fb),) = quantize_athena([W], H, AthenaRecipe(lowrank=0, **base))
    ((l_nofb, _),) = quantize_athena([W], H, AthenaRecipe(lowrank=0, **base), _error_feedback=False)
    ((l_lr, s_lr),) = quantize_athena([W], H, AthenaRecipe(lowrank=0.1, **base))
    loss_nofb, loss_fb, loss_lr = layer_loss(W, l_nofb, X), layer_loss(W, l_fb, X), layer_loss(W, l_lr, X)
    assert loss_fb < 0.9 * loss_nofb
    assert loss_lr < 0.95 * loss_fb
    assert l_lr.rank == 6  # round(0.1 * 64)
    # the reported proxy loss is the same quantity (H = 2/S XᵀX, undamped)
    assert s_fb["proxy_loss"] == pytest.approx(loss_fb, rel=1e-3)
    assert s_lr["proxy_loss"] == pytest.approx(loss_lr, rel=1e-3)
    assert s_lr["proxy_loss"] < s_lr["proxy_loss_no_lowrank"]


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_shapes_not_multiples_of_d_or_k(d):
    N, M, k, n = 21, 10, 8, 4
    _, H = calibration(M)
    (W,) = weights([(N, M)])
    recipe = AthenaRecipe(d=d, n=n, k=k, lowrank=0.2, kmeans_iters=3)
    ((layer, stats),) = quantize_athena([W], H, recipe)
    G, Nb = -(-M // d), -(-N // k)
    assert layer.indices.shape == (N, G) and int(layer.indices.max()) < n
    assert layer.codebook.shape == (Nb, G, n, d) and layer.codebook.dtype == torch.uint8
    assert layer.codebook_scale.shape == (Nb, G, d) and layer.codebook_min.shape == (Nb, G, d)
    assert layer.lowrank_a.shape == (N, 2) and layer.lowrank_b.shape == (2, M)
    W_hat = layer.dequantize(include_lowrank=False)
    assert W_hat.shape == (N, M)
    C = layer.codebook_f32()
    for i in (0, 7, 8, 20):  # Ŵ[i, d j + l] = C[i // k, j, I[i, j], l]
        for c in range(M):
            j, l = divmod(c, d)
            assert W_hat[i, c] == C[i // k, j, layer.indices[i, j], l]
    assert stats["proxy_loss"] < 1.0


def test_lossless_when_every_row_gets_a_centroid():
    M = 12
    _, H = calibration(M)
    (W,) = weights([(8, M)])
    ((layer, stats),) = quantize_athena([W], H, AthenaRecipe(d=2, n=8, k=8, codebook_bits=16, lowrank=0))
    assert stats["proxy_loss"] < 1e-6


@pytest.mark.parametrize("k", [64, 4096])  # several blocks per matrix / one padded block each
def test_batched_qkv_matches_separate_calls(k):
    """One batched call over q/k/v is as good as three calls (up to k-means noise, summed over seeds)."""
    M = 32
    X, H = calibration(M)
    Ws = weights([(96, M), (32, M), (32, M)])
    together, alone = [0.0] * 3, [0.0] * 3
    for seed in (0, 1):
        recipe = AthenaRecipe(d=2, n=8, k=k, lowrank=0, kmeans_iters=6, seed=seed)
        for i, (W, (layer, _)) in enumerate(zip(Ws, quantize_athena(Ws, H, recipe))):
            ((single, _),) = quantize_athena([W], H, recipe)
            assert layer.indices.shape == single.indices.shape and layer.codebook.shape == single.codebook.shape
            assert layer.codebook.shape[0] == -(-W.shape[0] // k)
            together[i] += layer_loss(W, layer, X)
            alone[i] += layer_loss(W, single, X)
    for t, a in zip(together, alone):
        assert t < 1.2 * a


@pytest.mark.parametrize("codebook_bits,lowrank", [(8, 0.1), (16, 0.0)])
def test_storage_round_trip_and_bits(codebook_bits, lowrank):
    N, M = 40, 30
    _, H = calibration(M)
    (W,) = weights([(N, M)])
    recipe = AthenaRecipe(d=3, n=16, k=32, codebook_bits=codebook_bits, lowrank=lowrank, kmeans_iters=3)
    ((layer, _),) = quantize_athena([W], H, recipe)
    layer.bias = torch.randn(N).half()
    tensors = layer.to_tensors("model.layers.0.mlp.up_proj")
    meta = layer.meta()
    assert meta == {
        "method": "athena",
        "shape": [N, M],
        "d": 3,
        "n": 16,
        "k": 32,
        "codebook_bits": codebook_bits,
        "rank": recipe.rank(N, M),
    }
    again = layer_from_tensors("model.layers.0.mlp.up_proj", tensors, meta)
    assert isinstance(again, AthenaLayer)
    assert torch.equal(again.dequantize(), layer.dequantize())
    assert torch.equal(again.indices, layer.indices) and torch.equal(again.bias, layer.bias)
    stored = sum(t.numel() * t.element_size() for name, t in tensors.items() if not name.endswith(".bias"))
    assert stored == layer.stored_bytes() == recipe.stored_bytes(N, M)
    assert recipe.bits_estimate(N, M) == pytest.approx(8 * stored / (N * M))


def test_bits_formula_matches_design_examples():
    # 16 n / k + log2(n) / d for fp16 codebooks (docs/ARCHITECTURE.md §3)
    for (d, n, k), bits in [((2, 64, 1024), 4.0), ((2, 64, 4096), 3.25), ((3, 64, 4096), 2.25)]:
        r = AthenaRecipe(d=d, n=n, k=k, codebook_bits=16, lowrank=0)
        assert r.bits_estimate(8192, 4096 - (4096 % d)) == pytest.approx(bits, abs=2e-3)
    # uint8 codebooks halve the codebook share and add 32 / k for the per-dimension min/scale
    r8 = AthenaRecipe(d=2, n=64, k=4096, codebook_bits=8, lowrank=0)
    assert r8.bits_estimate(8192, 4096) == pytest.approx(3 + 8 * 64 / 4096 + 32 / 4096)


def test_from_tensors_names_the_bad_tensor():
    N, M = 20, 12
    _, H = calibration(M)
    (W,) = weights([(N, M)])
    ((layer, _),) = quantize_athena([W], H, AthenaRecipe(d=2, n=4, k=8, lowrank=0.1, kmeans_iters=2))
    good, meta = layer.to_tensors("p"), layer.meta()

    def broken(**changes):
        t = dict(good)
        for key, value in changes.items():
            if value is None:
                t.pop(f"p.{key}")
            else:
                t[f"p.{key}"] = value
        return t

    cases = [
        (broken(codebook=good["p.codebook"].float()), "p.codebook.*dtype"),
        (broken(indices=good["p.indices"][:-1]), "p.indices.*shape"),
        (broken(codebook_scale=good["p.codebook_scale"].float()), "p.codebook_scale"),
        (broken(codebook_min=None), "p.codebook_min.*missing"),
        (broken(lowrank_b=good["p.lowrank_b"][:, :-1]), "p.lowrank_b.*shape"),
        (broken(lowrank_a=None), "p.lowrank_a.*missing"),
        (broken(bias=torch.zeros(N + 1).half()), "p.bias"),
    ]
    for tensors, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            layer_from_tensors("p", tensors, meta)
    with pytest.raises(ValueError, match="'d'"):
        layer_from_tensors("p", good, {k: v for k, v in meta.items() if k != "d"})
    with pytest.raises(ValueError, match="p.codebook.*shape"):
        layer_from_tensors("p", good, dict(meta, k=4))
    with pytest.raises(ValueError, match="p.indices.*shape"):
        layer_from_tensors("p", good, dict(meta, n=8))
    with pytest.raises(ValueError, match="unknown method"):
        layer_from_tensors("p", good, dict(meta, method="awq"))
    with pytest.raises(ValueError, match="shape"):
        layer_from_tensors("p", good, dict(meta, shape=[N, M, 1]))
    with pytest.raises(ValueError, match="codebook_bits is 16"):
        layer_from_tensors("p", dict(good, **{"p.codebook": good["p.codebook"].half()}), dict(meta, codebook_bits=16))


def test_deterministic_with_seed():
    M = 16
    _, H = calibration(M)
    Ws = weights([(24, M), (8, M)])
    runs = [quantize_athena(Ws, H, AthenaRecipe(d=2, n=8, k=16, seed=s, kmeans_iters=3)) for s in (3, 3, 4)]
    for (a, _), (b, _) in zip(runs[0], runs[1]):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.codebook, b.codebook)
        assert torch.equal(a.lowrank_a, b.lowrank_a)
    assert any(not torch.equal(a.indices, c.indices) for (a, _), (c, _) in zip(runs[0], runs[2]))


def test_dead_input_columns():
    M = 10
    X, _ = calibration(M)
    X[:, 3] = 0  # an input that is always zero
    acc = HessianAccumulator(M)
    acc.add_batch(X)
    H = acc.hessian(0.0)
    assert H[3, 3] == 1.0
    (W,) = weights([(16, M)])
    ((layer, stats),) = quantize_athena([W], acc.H, AthenaRecipe(d=2, n=4, k=16, kmeans_iters=2))
    assert torch.isfinite(layer.dequantize()).all() and 0 <= stats["proxy_loss"] < 1


def test_refuses_bad_input():
    _, H = calibration(8)
    W = torch.randn(4, 8)
    r = AthenaRecipe(d=2, n=4, k=4)
    with pytest.raises(ValueError, match="same M"):
        quantize_athena([W, torch.randn(4, 6)], H, r)
    with pytest.raises(ValueError, match="H must be"):
        quantize_athena([W], H[:4, :4], r)
    with pytest.raises(ValueError, match="NaN"):
        quantize_athena([W.masked_fill(W > 1, float("nan"))], H, r)
    with pytest.raises(ValueError, match="non-empty"):
        quantize_athena([], H, r)
    with pytest.raises(ValueError, match="AthenaRecipe"):
        quantize_athena([W], H, {"d": 2})
    for bad in (
        dict(n=48),
        dict(d=0),
        dict(k=0),
        dict(codebook_bits=4),
        dict(lowrank=1.5),
        dict(kmeans_iters=0),
        dict(damp=-1.0),
        dict(block_size=0),
        dict(d=2.0),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AthenaRecipe(**bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_matches_eager_on_gpu():
    M = 600  # 4 full lazy blocks of 128 columns (graph replays) and a partial one (eager)
    _, H = calibration(M)
    Ws = [w.cuda() for w in weights([(300, M), (100, M)])]
    for codebook_bits in (8, 16):
        recipe = AthenaRecipe(k=256, codebook_bits=codebook_bits, kmeans_iters=4)
        graphed = quantize_athena(Ws, H.cuda(), recipe)
        eager = quantize_athena(Ws, H.cuda(), recipe, _cuda_graph=False)
        again = quantize_athena(Ws, H.cuda(), recipe)
        for (a, _), (c, _) in zip(graphed, again):  # reproducible on the GPU too
            assert torch.equal(a.indices, c.indices) and torch.equal(a.lowrank_a, c.lowrank_a)
        for (a, sa), (b, sb) in zip(graphed, eager):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.codebook, b.codebook)
            assert sa["proxy_loss"] == pytest.approx(sb["proxy_loss"], rel=1e-5)
        cpu = quantize_athena([w.cpu() for w in Ws], H, recipe)  # other random streams: same quality
        gpu_loss, cpu_loss = (sum(s["proxy_loss"] for _, s in res) for res in (graphed, cpu))
        assert gpu_loss < 1.25 * cpu_loss and cpu_loss < 1.25 * gpu_loss
