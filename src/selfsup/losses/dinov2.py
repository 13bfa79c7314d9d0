"""DINOv2's objectives beyond DINO's (Oquab et al. 2024, "DINOv2: Learning Robust Visual
Features without Supervision", TMLR): the iBOT masked-patch loss, the KoLeo regularizer, and
Sinkhorn-Knopp centering of the teacher. DINO's own cross-entropy and EMA center are
``selfsup.losses.dino_loss`` / ``dino_center_update``; with Sinkhorn targets, DINO's loss is
``selfsup.losses.swav_loss`` (the same pair average over soft targets).

Everything runs in float32 even under autocast (``fp32_loss``; softmax over 65,536 prototypes at
temperature 0.04-0.07, and exp(x / 0.04) in Sinkhorn, lose most of their mass in bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.losses._precision import fp32_loss
from selfsup.losses.clustering import sinkhorn_knopp

__all__ = ["ibot_patch_loss", "koleo_loss", "sinkhorn_knopp_teacher"]


@fp32_loss
def ibot_patch_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                    student_temp: float = 0.1) -> torch.Tensor:
    r"""iBOT's masked-image-modeling loss as DINOv2 computes it (Zhou et al. 2022 eq. 2; DINOv2
    sec. 4 "iBOT loss"; official ``iBOTPatchLoss.forward_masked`` with ``masks_weight``).

    For global-crop image b with the set :math:`M_b` of masked patches, the student sees the
    mask token at those positions, the teacher the visible image; teacher patch target
    :math:`t_{bi}` (a probability vector: centered-softmax or Sinkhorn-Knopp) is predicted from the
    student's output :math:`s_{bi}` at the same position:

    .. math::
        L = \frac{1}{B} \sum_{b=1}^{B} \frac{1}{|M_b|} \sum_{i \in M_b}
            -\sum_k t_{bi}^{(k)} \log \operatorname{softmax}(s_{bi} / \tau_s)^{(k)}

    Each masked image counts once whatever its mask ratio (weight 1/|M_b| per patch); B counts
    every global-crop sample, masked or not (official: ``/ student_masks_flat.shape[0]``), so with
    half the samples masked the loss is half the mean over masked images. No gradient reaches
    the teacher.

    Args:
        student: (M, K) student head outputs at the masked positions, in the row-major order of
            ``mask.nonzero()`` (what ``tokens[mask]`` gives).
        teacher: (M, K) teacher target probabilities at the same positions.
        mask: (B, N) bool, True = masked patch; M = mask.sum().
        student_temp: τ_s (official: 0.1).
    Returns: scalar loss.

    Example:
        >>> mask = torch.zeros(4, 16, dtype=torch.bool); mask[0, :3] = True; mask[2, 5:9] = True
        >>> s, t = torch.randn(7, 32), torch.softmax(torch.randn(7, 32), -1)
        >>> loss = ibot_patch_loss(s, t, mask)
    """
    if student_temp <= 0:
        raise ValueError(f"student_temp must be > 0, got {student_temp}")
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (B, N) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    n_masked = int(student.shape[0])
    if teacher.shape != student.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    weight = (1.0 / mask.sum(dim=1).clamp(min=1).float()).unsqueeze(1).expand(mask.shape)[mask]  # (M,)
    if weight.shape[0] != n_masked:
        raise ValueError(f"{n_masked} student rows for {weight.shape[0]} masked patches")
    log_p = F.log_softmax(student / student_temp, dim=-1)
    ce = -(teacher.detach() * log_p).sum(dim=-1)
    return (ce * weight).sum() / mask.shape[0]


@fp32_loss
def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Kozachenko-Leonenko differential-entropy estimator as a regularizer (Sablayrolles, Douze,
    Schmid, Jégou 2019, "Spreading vectors for similarity search", ICLR; DINOv2 sec. 4 "KoLeo
    regularizer"; official ``KoLeoLoss``):

    .. math::
        L_{koleo} = -\frac{1}{n} \sum_{i=1}^{n} \log(d_{n,i}), \qquad
        d_{n,i} = \min_{j \ne i} \lVert x_i - x_j \rVert

    over the L2-normalized features :math:`x_i` of one batch (DINOv2: the student's CLS tokens
    after the backbone norm, one global crop at a time, weight 0.1). It pushes each feature away
    from its nearest neighbour, spreading the batch uniformly over the sphere. ``eps`` enters as
    the official ``PairwiseDistance(eps)`` (``||x - y + eps||``) and ``log(d + eps)``.

    Args:
        x: (n, d) features, n >= 2 (not normalized; normalized here, in float32).
    Returns: scalar loss (per process: no gather, as the official code).

    Example:
        >>> loss = koleo_loss(torch.randn(64, 384))
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs (n >= 2, d) features, got {tuple(x.shape)}")
    x = F.normalize(x, p=2, dim=-1, eps=eps)
    with torch.no_grad():  # the nearest neighbour is an index: no gradient through the choice
        dots = x @ x.T
        dots.fill_diagonal_(-2.0)  # below any cosine: never one's own neighbour
        nn_idx = dots.argmax(dim=1)
    dist = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
    return -torch.log(dist + eps).mean()


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_output: torch.Tensor, teacher_temp: float, iterations: int = 3) -> torch.Tensor:
    r"""DINOv2's Sinkhorn-Knopp centering of the teacher (sec. 4, borrowed from SwAV; official
    ``DINOLoss.sinkhorn_knopp_teacher`` / ``iBOTPatchLoss.sinkhorn_knopp_teacher``): the
    teacher targets are the transport plan :math:`Q = \operatorname{Diag}(u)
    \exp(g_t / \tau_t) \operatorname{Diag}(v)` whose prototype marginals are uniform and whose
    rows (samples) sum to 1, approximated by ``iterations`` alternating normalizations.

    The same algorithm as SwAV's, so this is ``sinkhorn_knopp`` with ε = τ_t: both start from
    exp(scores / ε), normalize the total, alternate rows-per-prototype 1/K and columns-per-sample
    1/B (prototype sums all-reduced over ranks), and rescale columns to 1. Ours subtracts the
    global max first (a constant factor: no change). The official iBOT variant passes the number
    of masked patches all-reduced over ranks as B (it differs per rank); B only scales the whole
    matrix between normalizations that remove any global scale, so the result does not depend on
    it, and SwAV's ``B_local x world`` gives the same codes.

    Args:
        teacher_output: (B, K) teacher head outputs (every global crop's CLS, or every masked patch).
        teacher_temp: τ_t (0.04 -> 0.07 warm-up), the entropy weight ε.
        iterations: 3 (official).
    Returns: (B, K) float32 targets, rows sum to 1.
    """
    return sinkhorn_knopp(teacher_output, epsilon=teacher_temp, iterations=iterations)
