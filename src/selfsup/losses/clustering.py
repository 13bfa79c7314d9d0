"""Clustering / self-distillation objectives with soft targets: SwAV's swapped prediction of
Sinkhorn-Knopp codes and DINO's cross-entropy to a centered, sharpened teacher.

Targets (codes, teacher probabilities) carry no gradient. Everything runs in float32 even under
autocast (``fp32_loss``): Sinkhorn exponentiates scores / 0.05 (e^20), and DINO's softmax over
65,536 outputs at temperature 0.04 loses most of its mass to rounding in bf16. Cross-rank
statistics (the Sinkhorn marginals, the DINO center) go through ``selfsup.dist``, so one process
and many GPUs share one code path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from selfsup import dist
from selfsup.losses._precision import autocast_off, fp32_loss

__all__ = ["sinkhorn_knopp", "swav_loss", "dino_loss", "dino_center_update"]


@torch.no_grad()
@fp32_loss
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    r"""Soft codes Q of SwAV (Caron et al. 2020, sec. 3.1 and Algorithm 1 / appendix A.1).

    For the scores :math:`C^\top Z` of B samples against K prototypes (rows of ``scores``), Q
    solves the entropy-regularized transport problem

    .. math::
        \max_{Q \in \mathcal{Q}} \operatorname{Tr}(Q^\top C^\top Z) + \varepsilon H(Q), \quad
        \mathcal{Q} = \{Q \in \mathbb{R}_+^{K \times B} : Q 1_B = \tfrac{1}{K} 1_K,\;
                                                           Q^\top 1_K = \tfrac{1}{B} 1_B\}

    whose solution is :math:`Q^* = \operatorname{Diag}(u) \exp(C^\top Z / \varepsilon)
    \operatorname{Diag}(v)`; ``iterations`` alternating normalizations of the K rows (each
    prototype gets 1/K of the mass) and the B columns (each sample 1/B) approximate u and v. The
    B columns span every rank: the row sums are all-reduced, so the equipartition holds over the
    global batch (the official ``distributed_sinkhorn``). The result is rescaled so each sample's
    code sums to 1 (the row normalization of the last step is exact; the prototype marginals are
    uniform only approximately after few iterations, exactly in the limit).

    Args:
        scores: (B, K) sample-prototype similarities (any dtype; computed in float32).
        epsilon: ε, the entropy weight (paper: 0.05; smaller is sharper).
        iterations: Sinkhorn iterations (paper: 3).
    Returns: (B, K) float32 codes; every row is a probability vector.

    Example:
        >>> q = sinkhorn_knopp(torch.randn(256, 3000).clamp(-1, 1))
        >>> q.sum(dim=1)  # all ones
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    s = scores.detach()
    # subtracting one global constant leaves Q unchanged and keeps exp() from overflowing; scores
    # spread over more than ~80ε would underflow whole rows (cosines with ε >= 0.025 are safe)
    top = dist.gather(s.max().reshape(1), grad=False).max()
    q = torch.exp((s - top) / epsilon).T  # (K, B): prototypes x samples
    n_protos, n_samples = q.shape[0], q.shape[1] * dist.world_size()
    q /= dist.all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= dist.all_reduce_sum(q.sum(dim=1, keepdim=True)) * n_protos  # rows: 1/K each
        q /= q.sum(dim=0, keepdim=True) * n_samples  # columns: 1/B each
    return (q * n_samples).T  # each sample's code sums to 1


@fp32_loss
def swav_loss(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    r"""SwAV's swapped prediction (Caron et al. 2020, eq. 1-2, multi-crop sec. 3.2).

    Crop v's prediction is :math:`p_v = \operatorname{softmax}(z_v^\top C / \tau)`; each code
    :math:`q_i` (from one of the first ``len(codes)`` crops, the global ones) is predicted from
    every other crop:

    .. math::
        L = \frac{1}{|G|} \sum_{i \in G} \frac{1}{V - 1} \sum_{v \ne i}
            \frac{1}{n} \sum_{b=1}^{n} -\sum_k q_{i,bk} \log p_{v,bk}

    with V the number of crops (global and local) and G the crops codes are computed for
    (the official ``crops_for_assign``: the two 224-px crops). No gradient reaches the codes.

    Args:
        scores: V tensors (n, K) of prototype scores :math:`z^\top C` (unit z and unit prototypes,
            so cosines), global crops first.
        codes: |G| tensors (n, K), the Sinkhorn codes of the first |G| crops.
        temperature: τ (paper: 0.1).
    Returns: scalar loss.

    Example:
        >>> scores = [torch.randn(8, 30) for _ in range(4)]
        >>> codes = [sinkhorn_knopp(s) for s in scores[:2]]
        >>> loss = swav_loss(scores, codes, temperature=0.1)
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n_crops = len(scores)
    if not 1 <= len(codes) <= n_crops or n_crops < 2:
        raise ValueError(f"swav_loss needs >= 2 crops and 1..{n_crops} codes, got {n_crops} and {len(codes)}")
    log_p = [F.log_softmax(s / temperature, dim=1) for s in scores]
    total = scores[0].new_zeros(())
    for i, q in enumerate(codes):
        q = q.detach()
        sub = sum(-(q * log_p[v]).sum(dim=1).mean() for v in range(n_crops) if v != i)
        total = total + sub / (n_crops - 1)
    return total / len(codes)


@fp32_loss
def dino_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], center: torch.Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    r"""DINO's self-distillation loss (Caron et al. 2021, eq. 2-3 and Algorithm 1).

    Teacher outputs are centered and sharpened, :math:`P_t = \operatorname{softmax}((g_t - c) /
    \tau_t)`; student outputs are :math:`P_s = \operatorname{softmax}(g_s / \tau_s)`. Teacher crop
    t (one of the global crops, which are also the student's first crops) teaches every other
    student crop:

    .. math::
        L = \frac{1}{\#\text{pairs}} \sum_{t \in G} \sum_{s \ne t}
            \frac{1}{n} \sum_{b=1}^{n} -\sum_k P_t^{(bk)} \log P_s^{(bk)}

    over the pairs (t, s), s ranging over all V student crops (global and local) except t itself.
    No gradient reaches the teacher.

    Args:
        student: V tensors (n, K), the student's head outputs, global crops first.
        teacher: |G| tensors (n, K), the teacher's head outputs for the global crops.
        center: (K,) or (1, K) running mean of the teacher outputs (see ``dino_center_update``).
        student_temp: τ_s (paper: 0.1).
        teacher_temp: τ_t (paper: 0.04, warmed up to 0.07 in the longer runs).
    Returns: scalar loss.

    Example:
        >>> s = [torch.randn(8, 64) for _ in range(4)]
        >>> loss = dino_loss(s, [x.detach() for x in s[:2]], torch.zeros(64))
    """
    if student_temp <= 0 or teacher_temp <= 0:
        raise ValueError(f"temperatures must be > 0, got {student_temp} and {teacher_temp}")
    n_global, n_crops = len(teacher), len(student)
    if not 1 <= n_global <= n_crops or n_crops < 2:
        raise ValueError(f"dino_loss needs >= 2 student crops and 1..{n_crops} teacher crops")
    log_p = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    c = center.detach().reshape(1, -1)
    total = student[0].new_zeros(())
    for t, out in enumerate(teacher):
        p_t = F.softmax((out.detach() - c) / teacher_temp, dim=-1)
        for s in range(n_crops):
            if s != t:
                total = total + (-(p_t * log_p[s]).sum(dim=-1)).mean()
    return total / (n_global * (n_crops - 1))


@torch.no_grad()
def dino_center_update(center: torch.Tensor, teacher: torch.Tensor | Sequence[torch.Tensor],
                       momentum: float = 0.9) -> torch.Tensor:
    r"""DINO's center (Caron et al. 2021, eq. 4): :math:`c \leftarrow m c + (1 - m) \frac{1}{B}
    \sum_{i=1}^{B} g_t(x_i)`, the mean over the teacher outputs of every global crop of the
    global batch (summed across ranks). Returns the new center (same shape and dtype as
    ``center``); the caller stores it.

    Example:
        >>> c = torch.zeros(1, 64)
        >>> c = dino_center_update(c, torch.randn(16, 64), momentum=0.9)
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    out = torch.cat(list(teacher)) if not torch.is_tensor(teacher) else teacher
    with autocast_off(out):  # not fp32_loss: the result keeps ``center``'s dtype
        out = out.detach().float()
        total = dist.all_reduce_sum(out.sum(dim=0))
        count = out.shape[0] * dist.world_size()
        batch_center = (total / count).reshape(center.shape)
        return (center.float() * momentum + batch_center * (1.0 - momentum)).to(center.dtype)
