"""The TPC-CMA objective (cmalign.objective.cma_loss): its distribution terms and how CMALoss assembles them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss

from cmalign.metrics import gap
from cmalign.objective.cma_loss import CMAConfig, CMALoss, bures2, coral, mmd2_rbf

BANDWIDTHS = (0.5, 1.0, 2.0, 4.0)


def centred(a: np.ndarray) -> np.ndarray:
    return a - a.mean(axis=0)


def clouds(n: int = 40, d: int = 6, seed: int = 0, m: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two centred clouds of different shape (anisotropic, rotated), float64."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * np.linspace(0.5, 1.5, d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    y = (rng.standard_normal((m or n, d)) * np.linspace(1.2, 0.3, d)) @ q + 0.3
    return centred(x), centred(y)


def ref_mmd2(x: np.ndarray, y: np.ndarray, sigma: float, mults=BANDWIDTHS) -> float:
    """Unbiased multi-bandwidth RBF MMD² at a fixed σ, written out term by term."""
    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.mean([np.exp(-d2 / (2 * (m * sigma) ** 2)) for m in mults], axis=0)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def torch_convention_sigma(x: np.ndarray, y: np.ndarray) -> float:
    """σ as losses.mmd2_rbf picks it: the lower median (torch.median) of the distances over the distinct
    pairs (i < j) of the pooled sample. gap.mmd2 uses np.median (mean of the two middle values) over the
    same pairs, so the two agree up to that half-step.
    """
    z = np.concatenate([x, y])
    d = np.sqrt(np.maximum(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1), 0))
    pooled = d[np.triu_indices(len(z), 1)]
    return float(np.sort(pooled)[(len(pooled) - 1) // 2])


# ------------------------------------------------------------------ MMD²


def test_mmd2_rbf_matches_hand_written_unbiased_estimator() -> None:
    x, y = clouds()
    got = mmd2_rbf(torch.tensor(x), torch.tensor(y)).item()
    assert got == pytest.approx(ref_mmd2(x, y, torch_convention_sigma(x, y)), abs=1e-9)


def test_mmd2_rbf_honours_bandwidth_multipliers() -> None:
    x, y = clouds(seed=3)
    mults = (0.25, 3.0)
    got = mmd2_rbf(torch.tensor(x), torch.tensor(y), mults).item()
    assert got == pytest.approx(ref_mmd2(x, y, torch_convention_sigma(x, y), mults), abs=1e-9)
    assert got != pytest.approx(mmd2_rbf(torch.tensor(x), torch.tensor(y)).item(), abs=1e-6)


def test_mmd2_rbf_is_close_to_gap_mmd2_despite_bandwidth_convention() -> None:
    # Same estimator; only the median-heuristic σ differs (see torch_convention_sigma): measured 3.6e-7 apart
    # on a value of 7.4e-3 here.
    x, y = clouds(n=60, seed=1)
    t = mmd2_rbf(torch.tensor(x), torch.tensor(y)).item()
    g = gap.mmd2(x, y, normalize=False, center=False)
    assert t == pytest.approx(g, abs=2e-6)
    # with σ chosen the numpy way, the hand-written estimator reproduces gap.mmd2 exactly
    pooled = np.concatenate([x, y])
    iu = np.triu_indices(len(pooled), k=1)
    d = np.sqrt(((pooled[:, None] - pooled[None]) ** 2).sum(-1))[iu]
    assert ref_mmd2(x, y, float(np.median(d))) == pytest.approx(g, abs=1e-9)


def test_mmd2_rbf_is_scale_invariant() -> None:
    # the bandwidth follows the data's median distance, whatever its convention
    x, y = clouds(seed=2)
    a = mmd2_rbf(torch.tensor(x), torch.tensor(y)).item()
    b = mmd2_rbf(torch.tensor(7.0 * x), torch.tensor(7.0 * y)).item()
    assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_mmd2_rbf_symmetric_for_equal_sizes() -> None:
    x, y = clouds(seed=4)
    a = mmd2_rbf(torch.tensor(x), torch.tensor(y)).item()
    b = mmd2_rbf(torch.tensor(y), torch.tensor(x)).item()
    assert a == pytest.approx(b, abs=1e-12)


def test_mmd2_rbf_symmetric_for_unequal_sizes() -> None:
    x, y = clouds(n=6, m=20, seed=5)
    a = mmd2_rbf(torch.tensor(x), torch.tensor(y)).item()
    b = mmd2_rbf(torch.tensor(y), torch.tensor(x)).item()
    assert a == pytest.approx(b, rel=1e-9)


def test_mmd2_near_zero_for_one_distribution_and_positive_for_different_ones() -> None:
    rng = np.random.default_rng(7)
    n, d = 128, 4
    x = torch.tensor(centred(rng.standard_normal((n, d))))
    y = torch.tensor(centred(rng.standard_normal((n, d))))
    z = torch.tensor(centred(rng.uniform(-1, 1, (n, d)) * np.array([3.0, 0.2, 0.2, 0.2])))
    same = mmd2_rbf(x, y).item()
    diff = mmd2_rbf(x, z).item()
    assert abs(same) < 0.015
    assert diff > 0.03
    assert diff > 5 * abs(same)


def test_mmd2_of_identical_samples_is_negative_small() -> None:
    # unbiased: the cross term includes the diagonal, so identical samples give a small negative value
    x, _ = clouds(n=30)
    v = mmd2_rbf(torch.tensor(x), torch.tensor(x)).item()
    assert -0.2 < v <= 0


# ------------------------------------------------------------------ CORAL / Bures


def test_coral_matches_gap_coral() -> None:
    x, y = clouds()
    got = coral(torch.tensor(x), torch.tensor(y)).item()
    assert got == pytest.approx(gap.coral(x, y, normalize=False), rel=1e-10)
    assert got > 0
    assert coral(torch.tensor(x), torch.tensor(x)).item() == 0.0


def test_bures2_matches_gap_bures_squared() -> None:
    x, y = clouds()
    got = bures2(torch.tensor(x), torch.tensor(y)).item()
    ref = gap.bures(x, y, normalize=False) ** 2
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-4)
    assert got > 0.1


def test_bures2_float32_and_zero_for_same_cloud() -> None:
    x, y = clouds()
    b32 = bures2(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert b32.dtype == torch.float32
    assert b32.item() == pytest.approx(gap.bures(x, y, normalize=False) ** 2, rel=1e-4, abs=1e-4)
    assert bures2(torch.tensor(x), torch.tensor(x)).item() == pytest.approx(0.0, abs=1e-4)


def test_bures2_has_finite_gradients() -> None:
    x, y = clouds()
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.tensor(y, requires_grad=True)
    bures2(xt, yt).backward()
    assert torch.isfinite(xt.grad).all() and torch.isfinite(yt.grad).all()
    assert xt.grad.abs().sum() > 0


def test_bures_term_has_finite_gradients_when_batch_is_smaller_than_dim() -> None:
    """A batch smaller than the embedding width gives rank-deficient covariances (zero eigenvalues)."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(16, 128, generator=g), dim=-1).requires_grad_(True)
    y = torch.nn.functional.normalize(torch.randn(16, 128, generator=g) + 0.3, dim=-1).requires_grad_(True)
    out = CMALoss(CMAConfig(distribution="bures"))(x, y, torch.tensor(100.0), alpha=0.5)
    out["total"].backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert out["distribution"].item() > 0


# ------------------------------------------------------------------ CMALoss


def features(n: int = 16, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g) + 1.0, dim=-1)
    y = torch.nn.functional.normalize(torch.randn(n, d, generator=g) - 0.5, dim=-1)
    return x, y, torch.tensor(20.0)


@pytest.mark.parametrize("dist", ["mmd", "coral", "bures"])
def test_cma_loss_parts(dist: str) -> None:
    x, y, scale = features()
    cfg = CMAConfig(lambda_centroid=0.7, lambda_distribution=2.0, lambda_paired=0.0, distribution=dist)
    out = CMALoss(cfg)(x, y, scale, alpha=0.3)
    assert set(out) == {"clip", "centroid2", "distribution", "cma", "total"}
    assert out["centroid2"].item() == pytest.approx(float(((x.mean(0) - y.mean(0)) ** 2).sum()), rel=1e-6)
    xc, yc = x - x.mean(0), y - y.mean(0)
    term = {"mmd": lambda a, b: mmd2_rbf(a, b, paired=True), "coral": coral, "bures": bures2}[dist](xc, yc)
    assert out["distribution"].item() == pytest.approx(term.item(), rel=1e-5, abs=1e-7)
    # in logit units: the bracket times the (detached) logit scale, as the contrastive logits are
    bracket = 0.7 * out["centroid2"].item() + 2.0 * out["distribution"].item()
    assert out["cma"].item() == pytest.approx(float(scale) * bracket, rel=1e-5)
    unscaled = CMALoss(CMAConfig(lambda_centroid=0.7, lambda_distribution=2.0, lambda_paired=0.0, distribution=dist,
                                 scale_by_logit_scale=False))(x, y, scale, alpha=0.3)
    assert unscaled["cma"].item() == pytest.approx(bracket, rel=1e-5)
    assert out["total"].item() == pytest.approx(out["clip"].item() + 0.3 * out["cma"].item(), rel=1e-6)
    assert out["centroid2"].item() > 0.1  # the fixture has a real gap


def test_centroid_term_matches_gap_centroid_gap_squared() -> None:
    x, y, scale = features(seed=3)
    out = CMALoss()(x, y, scale)
    ref = gap.centroid_gap(x.numpy(), y.numpy(), normalize=False) ** 2
    assert out["centroid2"].item() == pytest.approx(ref, rel=1e-5)


def test_alpha_zero_total_is_open_clip_clip_loss_exactly() -> None:
    x, y, scale = features(seed=1)
    out = CMALoss()(x, y, scale, alpha=0.0)
    expected = ClipLoss()(x, y, scale)
    assert torch.equal(out["total"], expected)
    assert torch.equal(out["clip"], expected)


def test_clip_term_is_open_clip_clip_loss_at_any_alpha() -> None:
    x, y, scale = features(seed=2)
    out = CMALoss()(x, y, scale, alpha=2.0)
    assert torch.allclose(out["clip"], ClipLoss()(x, y, scale))


def test_alignment_is_zero_when_modalities_coincide() -> None:
    x, _, scale = features()
    out = CMALoss(CMAConfig(distribution="coral"))(x, x.clone(), scale, alpha=1.0)
    assert out["centroid2"].item() == 0.0
    assert out["cma"].item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("dist", ["mmd", "coral", "bures"])
def test_gradients_flow_to_both_feature_tensors(dist: str) -> None:
    x, y, scale = features()
    x.requires_grad_(True)
    y.requires_grad_(True)
    scale.requires_grad_(True)
    out = CMALoss(CMAConfig(distribution=dist))(x, y, scale, alpha=0.5)
    out["total"].backward()
    for t in (x, y):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert scale.grad is not None

    # and the alignment part on its own reaches both towers too
    x2, y2 = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
    CMALoss(CMAConfig(distribution=dist))(x2, y2, scale.detach())["cma"].backward()
    assert x2.grad.abs().sum() > 0 and y2.grad.abs().sum() > 0


def test_centroid_gradient_pulls_the_means_together() -> None:
    x, y, scale = features()
    x.requires_grad_(True)
    y.requires_grad_(True)
    out = CMALoss(CMAConfig(lambda_distribution=0.0, lambda_paired=0.0, scale_by_logit_scale=False,
                            text_share=1.0))(x, y, scale)
    out["cma"].backward()
    n = x.shape[0]
    diff = (x.mean(0) - y.mean(0)).detach()
    assert torch.allclose(x.grad, (2 * diff / n).expand_as(x), atol=1e-6)
    assert torch.allclose(y.grad, (-2 * diff / n).expand_as(y), atol=1e-6)


@pytest.mark.parametrize("dist", ["mmd", "bures"])
def test_text_share_scales_only_the_text_towers_alignment_gradient(dist: str) -> None:
    x, y, scale = features(seed=6)
    grads = {}
    for share in (1.0, 0.25, 0.0):
        xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        out = CMALoss(CMAConfig(distribution=dist, text_share=share))(xs, ys, scale, alpha=0.5)
        out["cma"].backward()
        grads[share] = (out["cma"].item(), xs.grad, torch.zeros_like(y) if ys.grad is None else ys.grad)
    value, gx, gy = grads[1.0]
    for share in (0.25, 0.0):
        v, sx, sy = grads[share]
        assert v == value  # the terms measure the same gap
        torch.testing.assert_close(sx, gx, rtol=0, atol=0)  # the image tower gets all of it
        torch.testing.assert_close(sy, share * gy, rtol=1e-6, atol=1e-9)
    # the contrastive loss still reaches the text side at 0
    ys = y.clone().requires_grad_(True)
    CMALoss(CMAConfig(text_share=0.0))(x, ys, scale, alpha=0.5)["total"].backward()
    assert ys.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="text_share"):
        CMAConfig(text_share=1.5)


def test_paired_term_is_the_centred_pairs_squared_distance_and_closes_the_raw_gap() -> None:
    x, y, scale = features(seed=4)
    off = CMALoss(CMAConfig(lambda_paired=0.0, scale_by_logit_scale=False))(x, y, scale)
    assert "paired2" not in off  # at 0, the paper's loss
    cfg = CMAConfig(lambda_paired=0.5, scale_by_logit_scale=False)
    out = CMALoss(cfg)(x, y, scale)
    xc, yc = x - x.mean(0), y - y.mean(0)
    assert out["paired2"].item() == pytest.approx(float(((xc - yc) ** 2).sum(1).mean()), rel=1e-6)
    assert out["cma"].item() == pytest.approx(off["cma"].item() + 0.5 * out["paired2"].item(), rel=1e-6)
    # with the centroid term it is the raw gap: G_R² = G_C² + G_P²
    raw2 = float(((x - y) ** 2).sum(1).mean())
    assert out["centroid2"].item() + out["paired2"].item() == pytest.approx(raw2, rel=1e-5)
    # a gradient step on it alone brings every pair's centred points closer
    x2, y2 = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    CMALoss(CMAConfig(lambda_centroid=0.0, lambda_distribution=0.0, lambda_paired=1.0,
                      scale_by_logit_scale=False))(x2, y2, scale)["cma"].backward()
    xs, ys = x - 0.1 * x2.grad, y - 0.1 * y2.grad
    before = ((xc - yc) ** 2).sum(1)
    after = (((xs - xs.mean(0)) - (ys - ys.mean(0))) ** 2).sum(1)
    assert (after < before).all()


def test_invalid_distribution_name_raises() -> None:
    with pytest.raises(ValueError, match="distribution"):
        CMAConfig(distribution="kl")


# ------------------------------------------------------------------ MMD² on paired samples: unbiased


def gaussian_mmd2(d: int, var_x: float, var_y: float, sigma: float, mults=BANDWIDTHS) -> float:
    """Closed-form MMD² between N(0, var_x·I_d) and N(0, var_y·I_d) for the mixture of RBF kernels at scale σ:
    E exp(−|a − b|²/2h²) = (h²/(h² + v))^{d/2} when a − b ~ N(0, v·I)."""
    def e(v):
        return np.mean([((m * sigma) ** 2 / ((m * sigma) ** 2 + v)) ** (d / 2) for m in mults])

    return float(e(2 * var_x) + e(2 * var_y) - 2 * e(var_x + var_y))


def paired_draw(rng, n: int, d: int, rho: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (x_i, y_i) with x ~ N(0, I), y ~ N(0, scale²·I) marginally and corr(x_i, y_i) = ρ per coordinate."""
    x = rng.standard_normal((n, d))
    y = scale * (rho * x + np.sqrt(1 - rho**2) * rng.standard_normal((n, d)))
    return x, y


@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_paired_mmd2_is_unbiased_on_dependent_pairs(scale: float) -> None:
    # 400 draws of 32 strongly dependent pairs (ρ = 0.9). The paired U-statistic's mean must sit on the closed
    # form (0 for equal marginals) within 4 standard errors; the estimator with the paired diagonal in the cross
    # term is pulled far below it (measured: its bias is ~30 standard errors at scale 1).
    d, n, sigma, draws = 4, 32, 2.0, 400
    rng = np.random.default_rng(0)
    truth = gaussian_mmd2(d, 1.0, scale**2, sigma)
    paired, with_diagonal = [], []
    for _ in range(draws):
        x, y = paired_draw(rng, n, d, 0.9, scale)
        paired.append(gap.mmd2(x, y, center=False, paired=True, sigma=sigma, normalize=False))
        with_diagonal.append(gap.mmd2(x, y, center=False, paired=False, sigma=sigma, normalize=False))
    se = np.std(paired) / np.sqrt(draws)
    assert abs(np.mean(paired) - truth) < 4 * se
    assert np.mean(with_diagonal) < truth - 10 * se


def test_torch_paired_mmd2_agrees_with_numpy() -> None:
    rng = np.random.default_rng(5)
    x, y = paired_draw(rng, 48, 6, 0.8, 1.2)
    for sigma in (None, 1.7):
        t = mmd2_rbf(torch.tensor(x), torch.tensor(y), paired=True, sigma=sigma).item()
        g = gap.mmd2(x, y, center=False, paired=True, sigma=sigma, normalize=False)
        assert t == pytest.approx(g, abs=2e-6 if sigma is None else 1e-12)
    # and differs from the unpaired estimate by the paired diagonal's share
    assert mmd2_rbf(torch.tensor(x), torch.tensor(y), paired=True).item() > \
        mmd2_rbf(torch.tensor(x), torch.tensor(y)).item() + 1e-3


def test_cma_loss_distribution_term_is_the_paired_estimator() -> None:
    x, y = (torch.tensor(a, dtype=torch.float32) for a in paired_draw(np.random.default_rng(9), 32, 8, 0.9, 1.0))
    terms = CMALoss(CMAConfig()).alignment_terms(x, y)
    paired = mmd2_rbf(x - x.mean(0), y - y.mean(0), paired=True).item()
    assert terms["distribution"].item() == pytest.approx(paired, abs=1e-9)
    assert abs(mmd2_rbf(x - x.mean(0), y - y.mean(0)).item() - paired) > 1e-4
