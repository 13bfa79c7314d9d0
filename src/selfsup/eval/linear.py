"""Linear evaluation of frozen features.

Two classifiers on top of cached features:

* :func:`linear_probe` - a linear layer trained with SGD (or AdamW) in
  PyTorch, optionally behind a parameter-free BatchNorm as in the MAE
  linear-probing protocol (He et al., "Masked Autoencoders Are Scalable
  Vision Learners", CVPR 2022, Sec. A.2);
* :func:`logistic_regression` - scikit-learn's L-BFGS multinomial logistic
  regression on standardized features, the usual choice for small datasets
  (e.g. the transfer protocol of Chen et al., "A Simple Framework for
  Contrastive Learning of Visual Representations", ICML 2020).
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

__all__ = ["linear_probe", "logistic_regression"]

Normalize = Literal["batchnorm", "l2", "none"]
Optimizer = Literal["sgd", "adamw"]

# Default learning rates. They assume inputs of squared norm ~D (unit variance per dimension),
# which BatchNorm produces and _prepare ensures for the other modes.
_SGD_BASE_LR = 0.1  # per 256 samples, as in MAE's linear probe (base lr 0.1, batch 16384 -> 6.4)
_ADAMW_BASE_LR = 1e-2  # converges within ~500 steps on small sets (checked on sklearn digits)
_EVAL_CHUNK = 8192
# Below this many multiply-adds per training step (batch x D x classes) a CPU probe runs on one
# thread: the ops are too small to pay for thread synchronisation, which on a busy 2-core machine
# made 10 epochs on 50k x 512 features take 35 s instead of 2.3 s (benchmarks/eval_speed.py).
_SINGLE_THREAD_MACS = 2**24


@contextmanager
def _cpu_threads_for(device: torch.device, step_macs: int) -> Iterator[None]:
    """Run small CPU training steps on one intra-op thread; restore the thread count afterwards."""
    if device.type != "cpu" or step_macs >= _SINGLE_THREAD_MACS:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_split(feats: Tensor, labels: Tensor, name: str) -> None:
    """Shapes must match and every sample must be labeled."""
    if feats.ndim != 2 or labels.ndim != 1 or feats.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name}: expected (N, D) features and (N,) labels, got {tuple(feats.shape)} and {tuple(labels.shape)}"
        )
    if feats.shape[0] == 0:
        raise ValueError(f"{name}: no samples")
    if int(labels.min()) < 0:
        raise ValueError(
            f"{name}: labels contain -1 (unlabeled samples); a linear probe needs a fully labeled split"
        )


def _infer_num_classes(*label_sets: Tensor) -> int:
    """Number of classes: one more than the largest label seen."""
    return int(max(int(labels.max()) for labels in label_sets)) + 1


def _input_scale(train_feats: Tensor) -> float:
    """The constant that brings the mean squared norm of the training features to D."""
    mean_sq_norm = float(train_feats.pow(2).sum(dim=1).mean())
    return math.sqrt(train_feats.shape[1] / max(mean_sq_norm, 1e-12))


def _prepare(feats: Tensor, normalize: Normalize, device: torch.device) -> Tensor:
    """Float32 features on ``device``, L2-normalized when ``normalize == "l2"``."""
    feats = feats.to(device, torch.float32)
    if normalize == "l2":
        feats = F.normalize(feats, dim=1)
    return feats


def _build_head(dim: int, num_classes: int, normalize: Normalize, generator: torch.Generator) -> nn.Module:
    """Optional parameter-free BatchNorm, then a linear layer: weights N(0, 0.01^2) truncated at 2 std, bias 0 (MAE)."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01, a=-0.02, b=0.02, generator=generator)
    nn.init.zeros_(linear.bias)
    if normalize == "batchnorm":
        return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)
    return linear


def _default_lr(optimizer: Optimizer, batch_size: int) -> float:
    """Default peak learning rate.

    SGD: ``0.1 * batch_size / 256`` (MAE's base lr with the linear scaling rule
    of Goyal et al. 2017); AdamW: 1e-2.
    """
    if optimizer == "sgd":
        return _SGD_BASE_LR * batch_size / 256
    return _ADAMW_BASE_LR


def _make_optimizer(
    head: nn.Module, optimizer: Optimizer, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 (MAE/DINO linear eval) or AdamW."""
    if optimizer == "sgd":
        return torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")


def _batches(num_samples: int, batch_size: int, generator: torch.Generator, drop_singleton: bool) -> list[Tensor]:
    """A seeded random permutation cut into batches.

    With BatchNorm a trailing batch of one sample is skipped (BatchNorm cannot
    train on it); since the order is reshuffled every epoch no sample is
    systematically left out.
    """
    order = torch.randperm(num_samples, generator=generator)
    chunks = list(order.split(batch_size))
    if drop_singleton and len(chunks) > 1 and chunks[-1].numel() == 1:
        chunks.pop()
    return chunks


@torch.no_grad()
def _evaluate(head: nn.Module, feats: Tensor, labels: Tensor, num_classes: int) -> tuple[float, float | None]:
    """Top-1 and top-5 accuracy in % (top-5 is ``None`` with fewer than 5 classes)."""
    head.eval()
    correct1 = correct5 = 0
    for start in range(0, feats.shape[0], _EVAL_CHUNK):
        logits = head(feats[start : start + _EVAL_CHUNK])
        targets = labels[start : start + _EVAL_CHUNK]
        top = logits.topk(min(5, num_classes), dim=1).indices
        hits = top == targets[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
    total = feats.shape[0]
    top5 = 100.0 * correct5 / total if num_classes >= 5 else None
    return 100.0 * correct1 / total, top5


def _train_epoch(
    head: nn.Module,
    opt: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    feats: Tensor,
    labels: Tensor,
    batch_size: int,
    generator: torch.Generator,
    drop_singleton: bool,
) -> float:
    """One shuffled pass over the training features; returns the mean cross-entropy."""
    head.train()
    total_loss, seen = 0.0, 0
    for idx in _batches(feats.shape[0], batch_size, generator, drop_singleton):
        idx = idx.to(feats.device)
        loss = F.cross_entropy(head(feats[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        total_loss += float(loss.detach()) * idx.numel()
        seen += idx.numel()
    return total_loss / max(seen, 1)


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float | None = None,
    optimizer: Optimizer = "sgd",
    weight_decay: float = 0.0,
    normalize: Normalize = "batchnorm",
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Train a linear classifier on frozen features and report test accuracy.

    Protocol (MAE linear probing, He et al. 2022, simplified to frozen cached
    features without augmentation): ``BatchNorm1d(affine=False)`` in front of
    a linear layer (``normalize="batchnorm"``; ``"l2"`` L2-normalizes the
    features instead, ``"none"`` uses them as they are), SGD with momentum 0.9
    (or AdamW) and no weight decay by default, learning rate annealed to 0
    with a per-step cosine schedule, cross-entropy loss. Default learning rate: ``0.1 * batch_size /
    256`` for SGD (MAE's base lr, linear scaling rule), ``1e-2`` for AdamW.

    Those rates are tuned for inputs with unit variance per dimension, which the
    BatchNorm produces. With ``"l2"`` or ``"none"`` the (normalized) features are
    therefore multiplied by one global constant, computed on the training set,
    that brings their mean squared norm to D. A linear classifier is invariant
    to such a rescaling (its weights absorb it), so this only conditions the
    optimisation: the same defaults converge in every mode (L2-normalized
    512-d features would otherwise need an SGD lr ~512x larger), and an
    explicit ``lr`` means the same thing in every mode.
    Each epoch the training set is reshuffled with a generator seeded by
    ``seed`` and the test set is evaluated.

    Args:
        train_feats, train_labels: ``(N, D)`` features and ``(N,)`` labels (no -1).
        test_feats, test_labels: the evaluation split.
        epochs, batch_size: training length; a trailing batch of one sample is
            skipped under BatchNorm.
        lr: peak learning rate (default: see above); ``optimizer``: "sgd" or "adamw".
        weight_decay: L2 penalty (SGD) / decoupled decay (AdamW).
        normalize: "batchnorm" (default), "l2" or "none".
        seed: seeds the weight init and the per-epoch shuffling.
        device: where to train ("cpu", "cuda", ...); on CPU, small problems
            (batch x D x classes < 2**24) train on one intra-op thread, which is
            faster than several (the thread count is restored afterwards).
        progress: tqdm bar on a terminal.
        num_classes: inferred as ``max label + 1`` when ``None``.

    Honest reporting: ``best_top1`` is the maximum of the per-epoch *test*
    accuracy, i.e. selected on the test set, and is therefore optimistically
    biased; ``last_top1`` (the final epoch) is the unbiased number to quote.

    Returns:
        ``{"best_top1", "best_epoch" (1-based), "last_top1", "last_top5"
        (None with fewer than 5 classes), "curve" (test top-1 per epoch),
        "train_loss" (mean train cross-entropy per epoch), "lr"}``.
    """
    _check_split(train_feats, train_labels, "train")
    _check_split(test_feats, test_labels, "test")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train and test feature dims differ: {train_feats.shape[1]} vs {test_feats.shape[1]}")
    if normalize not in ("batchnorm", "l2", "none"):
        raise ValueError(f"normalize must be 'batchnorm', 'l2' or 'none', got {normalize!r}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if normalize == "batchnorm" and train_feats.shape[0] < 2:
        raise ValueError("BatchNorm needs at least 2 training samples; use normalize='l2' or 'none'")

    device = torch.device(device)
    num_classes = num_classes or _infer_num_classes(train_labels, test_labels)
    x_train = _prepare(train_feats, normalize, device)
    x_test = _prepare(test_feats, normalize, device)
    if normalize != "batchnorm":
        scale = _input_scale(x_train)
        x_train, x_test = x_train * scale, x_test * scale
    y_train = train_labels.to(device, torch.int64)
    y_test = test_labels.to(device, torch.int64)

    generator = torch.Generator().manual_seed(seed)
    head = _build_head(x_train.shape[1], num_classes, normalize, generator).to(device)
    lr = lr if lr is not None else _default_lr(optimizer, batch_size)
    opt = _make_optimizer(head, optimizer, lr, weight_decay)
    steps_per_epoch = len(_batches(x_train.shape[0], batch_size, torch.Generator(), normalize == "batchnorm"))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)

    curve: list[float] = []
    losses: list[float] = []
    top5: float | None = None
    bar = tqdm(range(epochs), desc="linear probe", disable=not (progress and sys.stderr.isatty()), leave=False)
    with _cpu_threads_for(device, batch_size * x_train.shape[1] * num_classes):
        for _ in bar:
            losses.append(
                _train_epoch(head, opt, schedule, x_train, y_train, batch_size, generator, normalize == "batchnorm")
            )
            top1, top5 = _evaluate(head, x_test, y_test, num_classes)
            curve.append(top1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", top1=f"{top1:.2f}")

    best_epoch = int(np.argmax(curve))
    return {
        "best_top1": curve[best_epoch],
        "best_epoch": best_epoch + 1,
        "last_top1": curve[-1],
        "last_top5": top5,
        "curve": curve,
        "train_loss": losses,
        "lr": lr,
    }


def _numpy_splits(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor,
                  test_labels: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checked float64 features and int labels of both splits as NumPy arrays, for scikit-learn."""
    _check_split(train_feats, train_labels, "train")
    _check_split(test_feats, test_labels, "test")
    return (train_feats.detach().to("cpu", torch.float64).numpy(), train_labels.detach().cpu().numpy(),
            test_feats.detach().to("cpu", torch.float64).numpy(), test_labels.detach().cpu().numpy())


def _topk_accuracy(proba: np.ndarray, classes: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Share (%) of targets among the k most probable classes."""
    top = classes[np.argsort(-proba, axis=1)[:, :k]]
    return 100.0 * float((top == targets[:, None]).any(axis=1).mean())


def logistic_regression(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
) -> dict[str, float]:
    """Multinomial L-BFGS logistic regression on standardized features (scikit-learn).

    Features are standardized with the training mean/std (``StandardScaler``);
    ``C`` is the inverse L2-regularisation strength. Meant for small sets
    (up to tens of thousands of samples); use :func:`linear_probe` beyond.

    Returns:
        ``{"top1": %, "top5": %, "converged": bool}``; ``top5`` only with at least 5 classes.
        ``converged`` is False when L-BFGS stopped at ``max_iter`` (logged once as a warning,
        instead of scikit-learn's ConvergenceWarning): the scores are then the last iterate's.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train, y_train, x_test, y_test = _numpy_splits(train_feats, train_labels, test_feats, test_labels)
    if np.unique(y_train).size < 2:
        raise ValueError("logistic regression needs at least 2 classes in the training labels")

    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(scaler.transform(x_train), y_train)
    converged = True
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            converged = False
        else:  # anything else is passed on as it came
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not converged:
        logging.getLogger(__name__).warning(
            "logistic regression: L-BFGS stopped at max_iter=%d before converging (C=%g); the accuracy is the "
            "last iterate's", max_iter, C)
    proba = model.predict_proba(scaler.transform(x_test))
    result: dict[str, Any] = {"top1": _topk_accuracy(proba, model.classes_, y_test, 1)}
    if model.classes_.size >= 5:
        result["top5"] = _topk_accuracy(proba, model.classes_, y_test, 5)
    result["converged"] = converged
    return result


SVM_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, float("inf"))


def svm_probe(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, *,
              max_samples: int = 10_000) -> dict[str, Any]:
    """An RBF-kernel SVM on the frozen features: TS2Vec's classification protocol (Yue et al. 2022,
    official ``tasks/_eval_protocols.fit_svm``), the one its UCR/UEA tables report.

    ``SVC(kernel='rbf', gamma='scale')`` on the raw features (no scaling). With fewer than 50 training
    samples or fewer than 5 per class, C = inf (a hard margin); otherwise C is chosen by 5-fold
    cross-validated grid search over 1e-4, 1e-3, ..., 1e4, inf on at most ``max_samples`` training
    samples (a stratified subsample, ``random_state=0``, as the official), then refit on them. Folds
    are sklearn's unshuffled stratified ones and one job runs at a time, so the result is deterministic.

    Returns:
        ``{"top1": %, "C": the chosen C, "searched": bool}``.
    """
    from sklearn.model_selection import GridSearchCV, train_test_split
    from sklearn.svm import SVC

    x_train, y_train, x_test, y_test = _numpy_splits(train_feats, train_labels, test_feats, test_labels)
    classes = np.unique(y_train).size
    if classes < 2:
        raise ValueError("an SVM needs at least 2 classes in the training labels")
    n = x_train.shape[0]
    if n // classes < 5 or n < 50:
        model, searched = SVC(C=float("inf"), kernel="rbf", gamma="scale").fit(x_train, y_train), False
    else:
        if n > max_samples:
            x_train, _, y_train, _ = train_test_split(x_train, y_train, train_size=max_samples, random_state=0,
                                                      stratify=y_train)
        grid = GridSearchCV(SVC(kernel="rbf", gamma="scale", max_iter=10_000_000), {"C": list(SVM_C_GRID)}, cv=5,
                            n_jobs=1)
        model, searched = grid.fit(x_train, y_train).best_estimator_, True
    top1 = 100.0 * float((model.predict(x_test) == y_test).mean())
    return {"top1": top1, "C": float(model.C), "searched": searched}
