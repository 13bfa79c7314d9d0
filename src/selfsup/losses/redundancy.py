"""Redundancy-reduction objectives: no negatives, no predictor, no teacher; collapse is prevented by
statistics of the embedding dimensions over the batch (Barlow Twins, VICReg).

Both objectives are functions of batch statistics, so in multi-process runs they are computed over
the GLOBAL batch:

- Barlow Twins sums the per-rank partial sums of the cross-correlation matrix (and of the batch
  means and variances used to standardize the embeddings) over ranks, as the official code
  all-reduces ``c`` and divides by the global batch size;
- VICReg gathers the embeddings of all ranks before the variance and covariance terms (its
  invariance term is per sample and stays local).

Gradients: every rank computes the same global loss; the cross-rank sums and gathers send back
the sum of all ranks' gradients (backward of a sum is a sum), so each rank holds
``world_size x`` the gradient of the global loss for its own samples, and DDP's averaging over
ranks gives exactly the gradient of a one-process run on the global batch (tests/test_barlow_vicreg
checks this with two gloo processes). The official Barlow Twins code all-reduces ``c`` outside
autograd, which leaves its gradient ``1 / world_size`` of that; with LARS (which rescales each
layer's update) the difference only changes the balance against weight decay.

Batch statistics and d x d products are float32 even under autocast (``fp32_loss``): in bf16 a
C_ii near 1 would carry errors of ~4e-3, summed over thousands of dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup import dist
from selfsup.losses._precision import fp32_loss

__all__ = [
    "cross_correlation", "barlow_twins_terms", "barlow_twins_loss",
    "invariance_loss", "variance_loss", "covariance_loss", "vicreg_terms", "vicreg_loss",
]


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The d*(d-1) off-diagonal entries of a square matrix, flattened."""
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


# ---------------------------------------------------------------------------------------------
# Barlow Twins


@fp32_loss
def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5, *, gather: bool = True) -> torch.Tensor:
    r"""The cross-correlation matrix of Barlow Twins (Zbontar et al. 2021, eq. 2), over the batch:

    .. math::
        \mathcal{C}_{ij} = \frac{1}{N} \sum_b \hat z^A_{b,i} \, \hat z^B_{b,j}, \qquad
        \hat z_{b,i} = \frac{z_{b,i} - \mu_i}{\sqrt{\sigma_i^2 + \epsilon}}

    where each view's embeddings are standardized per dimension with the batch mean and the biased
    batch variance, exactly what the official code's affine-free ``BatchNorm1d`` does in training
    mode (same ε = 1e-5). With several ranks N is the global batch: the means, variances and the
    sum over b are all-reduced (with gradient), so C is that of the whole global batch.

    Args:
        z1, z2: (n, d) projector outputs of the two views (row b of each from the same image).
        eps: added to the variance, as in BatchNorm.
        gather: sum over ranks (False: this rank's batch only).
    Returns: (d, d) float32 matrix; C_ii in [-1, 1].
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (n, d); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    reduce = (lambda t: dist.all_reduce_sum(t, grad=True)) if gather else (lambda t: t)
    n = z1.shape[0] * (dist.world_size() if gather else 1)
    z = torch.stack([z1, z2])  # (2, n, d): one all-reduce for both views' statistics
    mean = reduce(z.sum(dim=1, keepdim=True)) / n
    centered = z - mean
    var = reduce(centered.pow(2).sum(dim=1, keepdim=True)) / n  # biased, as BatchNorm normalizes
    zn = centered / torch.sqrt(var + eps)
    return reduce(zn[0].T @ zn[1]) / n


@fp32_loss
def barlow_twins_terms(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The two sums of the Barlow Twins loss from the cross-correlation matrix C:
    the invariance term :math:`\sum_i (1 - \mathcal{C}_{ii})^2` and the redundancy-reduction term
    :math:`\sum_i \sum_{j \ne i} \mathcal{C}_{ij}^2`."""
    on_diag = (1.0 - torch.diagonal(c)).pow(2).sum()
    off_diag = _off_diagonal(c).pow(2).sum()
    return on_diag, off_diag


@fp32_loss
def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, eps: float = 1e-5, *,
                      gather: bool = True) -> torch.Tensor:
    r"""Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny 2021, eq. 1):

    .. math::
        \mathcal{L}_{BT} = \sum_i (1 - \mathcal{C}_{ii})^2
                         + \lambda \sum_i \sum_{j \ne i} \mathcal{C}_{ij}^2

    with C the cross-correlation of the batch-standardized embeddings (:func:`cross_correlation`).
    It is 0 exactly when the two views' embeddings are perfectly correlated dimension by dimension
    (C_ii = 1) and the dimensions are decorrelated (C_ij = 0): invariance without collapse.

    Args:
        z1, z2: (n, d) projector outputs of the two views.
        lambd: λ, weight of the off-diagonal terms (paper 5e-3 from its search; official code
            0.0051). Tsai et al. 2021 suggest λ = 1/d; the method's ``lambd: "1/d"`` does that.
        eps: BatchNorm's ε for the standardization.
        gather: C over the global batch (all ranks).
    Returns: scalar loss (the same value on every rank).

    Example:
        >>> z1, z2 = torch.randn(32, 64), torch.randn(32, 64)
        >>> loss = barlow_twins_loss(z1, z2, lambd=1 / 64)
    """
    if lambd < 0:
        raise ValueError(f"lambd must be >= 0, got {lambd}")
    on_diag, off_diag = barlow_twins_terms(cross_correlation(z1, z2, eps, gather=gather))
    return on_diag + lambd * off_diag


# ---------------------------------------------------------------------------------------------
# VICReg


@fp32_loss
def invariance_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    r"""VICReg's invariance term s(Z, Z') (Bardes, Ponce, LeCun 2022, eq. 5), as the official code
    computes it: the mean squared error over all n x d entries,
    :math:`\frac{1}{nd} \sum_b \lVert z_b - z'_b \rVert_2^2` (the paper writes the mean over b of
    the squared distance; the extra 1/d is part of the λ = 25 it tunes). Per sample, so it is
    computed on this rank's batch (DDP's averaging makes it the global mean)."""
    return F.mse_loss(z1, z2)


@fp32_loss
def variance_loss(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    r"""VICReg's variance term (eq. 1-2): a hinge on the standard deviation of every dimension,

    .. math::
        v(Z) = \frac{1}{d} \sum_j \max\left(0, \gamma - \sqrt{\mathrm{Var}(z^j) + \epsilon}\right)

    with the unbiased batch variance. 0 when every dimension's std is >= γ; for a collapsed
    (constant) embedding it is γ - √ε. ``z`` is the whole batch (gather it first)."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(gamma - std).mean()


@fp32_loss
def covariance_loss(z: torch.Tensor) -> torch.Tensor:
    r"""VICReg's covariance term (eq. 3-4): the squared off-diagonal entries of the covariance
    matrix, scaled by 1/d,

    .. math::
        C(Z) = \frac{1}{n - 1} \sum_b (z_b - \bar z)(z_b - \bar z)^\top, \qquad
        c(Z) = \frac{1}{d} \sum_{i \ne j} C(Z)_{ij}^2

    ``z`` is the whole batch (gather it first)."""
    n, d = z.shape
    centered = z - z.mean(dim=0)
    cov = centered.T @ centered / (n - 1)
    return _off_diagonal(cov).pow(2).sum() / d


@fp32_loss
def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4, *,
                 gather: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(invariance, variance, covariance) as the official code combines the two branches: the
    variance term is the MEAN of v(Z) and v(Z'), the covariance term the SUM of c(Z) and c(Z')
    (the paper writes sums for both; the coefficients 25/25/1 are tuned with the code's form).
    Variance and covariance use the embeddings of all ranks (gathered with gradient)."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (n, d); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    inv = invariance_loss(z1, z2)
    if gather:
        z1, z2 = dist.gather(z1), dist.gather(z2)
    if z1.shape[0] < 2:
        raise ValueError("VICReg's variance and covariance need at least 2 samples")
    var = (variance_loss(z1, gamma, eps) + variance_loss(z2, gamma, eps)) / 2
    cov = covariance_loss(z1) + covariance_loss(z2)
    return inv, var, cov


@fp32_loss
def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, gamma: float = 1.0, eps: float = 1e-4, *, gather: bool = True) -> torch.Tensor:
    r"""VICReg (Bardes, Ponce, LeCun 2022, eq. 6):

    .. math::
        \ell(Z, Z') = \lambda\, s(Z, Z') + \mu\, \tfrac{1}{2}[v(Z) + v(Z')] + \nu\, [c(Z) + c(Z')]

    with s = :func:`invariance_loss`, v = :func:`variance_loss`, c = :func:`covariance_loss`, and the
    branch combination of the official code (see :func:`vicreg_terms`).

    Args:
        z1, z2: (n, d) expander outputs of the two views.
        sim_coeff, std_coeff, cov_coeff: λ = 25, μ = 25, ν = 1 (paper sec. 4.2 / official code).
        gamma: target standard deviation γ = 1; eps: ε = 1e-4 inside the square root.
        gather: variance and covariance over the global batch (all ranks).
    Returns: scalar loss.

    Example:
        >>> z1, z2 = torch.randn(32, 64), torch.randn(32, 64)
        >>> loss = vicreg_loss(z1, z2)
    """
    inv, var, cov = vicreg_terms(z1, z2, gamma, eps, gather=gather)
    return sim_coeff * inv + std_coeff * var + cov_coeff * cov
