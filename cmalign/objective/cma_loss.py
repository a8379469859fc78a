"""The TPC-CMA objective: open_clip's contrastive loss plus the cross-modal alignment (CMA) term.

    L = L_clip + α(t) · s · (λ_c · ||μ̂_x − μ̂_y||² + λ_d · D̂(x̃, ỹ))

``L_clip`` is ``open_clip.ClipLoss`` (symmetric InfoNCE, learnable logit scale). μ̂ are batch
means of the L2-normalised embeddings, x̃/ỹ the batch-centred embeddings, and ``D̂`` a distribution
distance between the centred clouds: unbiased multi-bandwidth RBF MMD² of the paired batch (default), CORAL, or the
Bures distance of the covariances. ``s`` is the detached logit scale when ``scale_by_logit_scale``
(default), so the term is in the same units as the contrastive logits, else 1. ``text_share`` scales the terms'
gradient to the text features (their values unchanged): the image tower does most of the moving. Under DDP the
statistics use the features gathered from all ranks with gradients (``torch.distributed.nn.all_gather``,
as ``ClipLoss(gather_with_grad=True)`` does), so the loss is the same whatever the world size.
"""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss

from cmalign.errors import ConfigError
from cmalign.objective.config import DISTRIBUTION_TERMS, CMAConfig  # noqa: F401  (re-exported)


def gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size <= 1:
        return x
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    aa = (a * a).sum(1, keepdim=True)
    bb = (b * b).sum(1, keepdim=True)
    return (aa + bb.T - 2 * a @ b.T).clamp_min(0)


@torch.no_grad()
def _median_sq_distance(dxx: torch.Tensor, dyy: torch.Tensor, dxy: torch.Tensor) -> torch.Tensor:
    """Median heuristic over the distinct pairs (i < j) of the pooled sample, as cmalign.metrics.gap.mmd2 does."""
    n, m = dxx.shape[0], dyy.shape[0]
    pooled = torch.cat([dxx[torch.triu_indices(n, n, 1, device=dxx.device).unbind()],
                        dyy[torch.triu_indices(m, m, 1, device=dyy.device).unbind()], dxy.flatten()])
    return pooled.sqrt().median().clamp_min(1e-6) ** 2


def mmd2_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.5, 1.0, 2.0, 4.0), paired: bool = False,
             sigma: float | None = None) -> torch.Tensor:
    """Unbiased MMD² with a mixture of RBF kernels, bandwidths as multiples of the median distance.

    The median is taken without gradient (it sets the scale, it is not a thing to optimise). ``paired``: row i of
    x and of y are a matched pair, so the cross term leaves out k(x_i, y_i) as the within terms leave out their
    diagonals (the U-statistic over i ≠ j, as ``cmalign.metrics.gap.mmd2(paired=True)``). With the diagonal in,
    the term would also pull each pair together and its estimate would be biased low. ``sigma``: a fixed kernel
    scale instead of the median heuristic.
    """
    n, m = x.shape[0], y.shape[0]
    dxx, dyy, dxy = _sq_dists(x, x), _sq_dists(y, y), _sq_dists(x, y)
    sigma2 = _median_sq_distance(dxx, dyy, dxy) if sigma is None else float(sigma) ** 2
    kxx = kyy = kxy = 0
    for mult in bandwidths:
        gamma = 1.0 / (2 * (mult**2) * sigma2)
        kxx = kxx + torch.exp(-gamma * dxx)
        kyy = kyy + torch.exp(-gamma * dyy)
        kxy = kxy + torch.exp(-gamma * dxy)
    k = len(bandwidths)
    kxx, kyy, kxy = kxx / k, kyy / k, kxy / k
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    sxy = (kxy.sum() - kxy.diagonal().sum()) / (n * (n - 1)) if paired else kxy.mean()
    return sxx + syy - 2 * sxy


def _cov(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def coral(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    return ((_cov(x) - _cov(y)) ** 2).sum() / (4 * d * d)


def bures2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Bures distance of the covariances of paired, centred batches (n rows each).

    tr((Σx^½ Σy Σx^½)^½) equals the nuclear norm of X̃ᵀỸ/n, i.e. of the n×n matrix X̃Ỹᵀ/n: no matrix
    square root, and finite gradients when the covariances are rank-deficient (batch ≤ dim), where
    eigendecomposition backward divides by zero on repeated eigenvalues.
    """
    if x.shape[0] != y.shape[0]:
        raise ConfigError("bures2 needs paired batches of equal size")
    xd, yd = x.double(), y.double()
    n = x.shape[0]
    fidelity = torch.linalg.matrix_norm(xd @ yd.T / n, ord="nuc")
    return ((xd * xd).sum() / n + (yd * yd).sum() / n - 2 * fidelity).clamp_min(0).to(x.dtype)


class CMALoss(torch.nn.Module):
    """Returns the parts separately: the gradient-aware scheduler needs them apart."""

    def __init__(self, cfg: CMAConfig | None = None, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.cfg = cfg or CMAConfig()
        self.world_size = world_size
        self.clip = ClipLoss(gather_with_grad=True, rank=rank, world_size=world_size, cache_labels=True)

    def alignment_terms(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        x = gather_with_grad(image_features, self.world_size).float()
        y = gather_with_grad(text_features, self.world_size).float()
        if self.cfg.text_share < 1:
            # the terms' values as they are, their gradient to the text tower scaled (0: stopped)
            y = y.detach() + self.cfg.text_share * (y - y.detach()) if self.cfg.text_share else y.detach()
        mu_x, mu_y = x.mean(0), y.mean(0)
        centroid = ((mu_x - mu_y) ** 2).sum()
        xc, yc = x - mu_x, y - mu_y
        if self.cfg.distribution == "mmd":
            distribution = mmd2_rbf(xc, yc, self.cfg.mmd_bandwidths, paired=True)
        elif self.cfg.distribution == "coral":
            distribution = coral(xc, yc)
        else:
            distribution = bures2(xc, yc)
        cma = self.cfg.lambda_centroid * centroid + self.cfg.lambda_distribution * distribution
        out = {"centroid2": centroid, "distribution": distribution}
        if self.cfg.lambda_paired:
            out["paired2"] = ((xc - yc) ** 2).sum(1).mean()
            cma = cma + self.cfg.lambda_paired * out["paired2"]
        out["cma"] = cma
        return out

    def forward(self, image_features, text_features, logit_scale, alpha: float = 0.0) -> dict[str, torch.Tensor]:
        out = {"clip": self.clip(image_features, text_features, logit_scale)}
        out.update(self.alignment_terms(image_features, text_features))
        if self.cfg.scale_by_logit_scale:
            out["cma"] = out["cma"] * logit_scale.detach().float().reshape(())
        # α = 0: the CMA term is only logged; keep it out of the graph (a NaN there must not leak in)
        out["total"] = out["clip"] + alpha * out["cma"] if alpha else out["clip"]
        return out
