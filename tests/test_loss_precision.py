"""Every loss computes in float32 under autocast (DESIGN: "Losses compute similarities, logits,
softmax and log-sum-exp in fp32 even under autocast").

For every public function of every module in ``selfsup.losses`` (a new one without a case here
fails ``test_every_loss_has_a_case``), on inputs of realistic shapes and scales:

- float32 inputs: value and input gradient under CPU bf16 autocast (the same mechanism as
  CUDA's) match plain float32: the gradient within 1e-3 relative norm, the value within 1e-6;
- bf16 inputs (what a network under autocast hands over): the result equals the float32 result
  of the same bf16-rounded values, so the only loss of precision is the inputs' own rounding.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import selfsup.losses as L

GRAD_TOL = 1e-3  # ||g_bf16 - g_fp32|| / ||g_fp32||, the criterion
# the returned values, float32 inputs: with autocast off it is the same float32 computation, so
# only float32 rounding may differ (a single bf16 matmul left in MoCo's negatives moves it 1e-5)
VALUE_TOL = 1e-6
BF16_INPUT_TOL = 1e-5  # bf16 inputs vs the float32 computation on the same rounded values

# targets and statistics: they carry no gradient by definition
NO_GRAD = {"sinkhorn_knopp", "sinkhorn_knopp_teacher", "dino_center_update", "data2vec_targets", "patch_stats"}

# a case: (inputs the network produces, a function of them returning the loss's output); fixed
# state (queues, centers, codes, masks, labels) is captured in float32 / integer by the closure
Case = tuple[dict[str, torch.Tensor], Callable[..., object]]


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _pair(g: torch.Generator, n: int, d: int, noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views' embeddings of the same n samples: correlated, as after some training."""
    a = _randn(g, n, d)
    return a, a + noise * _randn(g, n, d)


def _cosines(g: torch.Generator, n: int, k: int, d: int = 128) -> torch.Tensor:
    """(n, k) scores of unit embeddings against unit prototypes (SwAV, DINO heads)."""
    return F.normalize(_randn(g, n, d), dim=1) @ F.normalize(_randn(g, k, d), dim=1).T


def _two_view(fn: Callable, n: int = 256, d: int = 128, **kw) -> Callable[[torch.Generator], Case]:
    def build(g: torch.Generator) -> Case:
        a, b = _pair(g, n, d)
        return {"a": a, "b": b}, lambda a, b: fn(a, b, **kw)
    return build


def _timesteps(fn: Callable, b: int = 16, t: int = 48, d: int = 64) -> Callable[[torch.Generator], Case]:
    def build(g: torch.Generator) -> Case:
        a, c = _pair(g, b * t, d)
        return {"a": 0.15 * a.view(b, t, d), "b": 0.15 * c.view(b, t, d)}, lambda a, b: fn(a, b)
    return build


def _four_view(fn: Callable, n: int = 256, d: int = 256, **kw) -> Callable[[torch.Generator], Case]:
    """(p1, p2, z1, z2): predictions and projections of two views."""
    def build(g: torch.Generator) -> Case:
        z1, z2 = _pair(g, n, d)
        p1, p2 = z1 + 0.3 * _randn(g, n, d), z2 + 0.3 * _randn(g, n, d)
        return {"p1": p1, "p2": p2, "z1": z1, "z2": z2}, lambda p1, p2, z1, z2: fn(p1, p2, z1, z2, **kw)
    return build


def _one(fn: Callable, *shape: int, scale: float = 1.0, **kw) -> Callable[[torch.Generator], Case]:
    def build(g: torch.Generator) -> Case:
        return {"x": scale * _randn(g, *shape)}, lambda x: fn(x, **kw)
    return build


def _moco_info_nce(g):
    q, k = _pair(g, 256, 128)
    queue = F.normalize(_randn(g, 4096, 128), dim=1)
    return {"q": q, "k": k}, lambda q, k: L.moco_info_nce(q, k, queue, temperature=0.1)


def _sinkhorn(fn, **kw):
    def build(g):
        return {"scores": _cosines(g, 256, 3000)}, lambda scores: fn(scores, **kw)
    return build


def _swav_loss(g):
    crops = [_cosines(g, 128, 3000) for _ in range(6)]  # 2 global + 4 local crops
    codes = [L.sinkhorn_knopp(s) for s in crops[:2]]
    inputs = {f"s{i}": s for i, s in enumerate(crops)}
    return inputs, lambda **s: L.swav_loss(list(s.values()), codes, temperature=0.1)


def _dino_loss(g):
    k = 4096
    center = 0.1 * _randn(g, 1, k)
    inputs = {f"s{i}": _cosines(g, 64, k) for i in range(6)}  # student: 2 global + 4 local crops
    inputs.update({f"t{i}": _cosines(g, 64, k) for i in range(2)})  # teacher: the 2 global crops
    def call(**x):
        student = [x[f"s{i}"] for i in range(6)]
        return L.dino_loss(student, [x["t0"], x["t1"]], center, student_temp=0.1, teacher_temp=0.04)
    return inputs, call


def _dino_center_update(g):
    center = 0.1 * _randn(g, 1, 4096)
    return {"t": _cosines(g, 128, 4096)}, lambda t: L.dino_center_update(center, t, momentum=0.9)


def _data2vec_targets(g):
    layers = {f"l{i}": _randn(g, 8, 196, 384) for i in range(12)}  # ViT-S blocks, patch tokens
    return layers, lambda **x: L.data2vec_targets(list(x.values()), top_k=8)


def _ibot_patch_loss(g):
    mask = torch.rand(32, 196, generator=g) < 0.3
    mask[16:] = False  # half the global crops masked, as DINOv2
    m, k = int(mask.sum()), 4096
    teacher = torch.softmax(_cosines(g, m, k) / 0.04, dim=-1)
    return {"s": _cosines(g, m, k)}, lambda s: L.ibot_patch_loss(s, teacher, mask, student_temp=0.1)


def _ijepa_loss(g):
    target = [F.layer_norm(_randn(g, 32, 20, 384), (384,)) for _ in range(4)]  # 4 target blocks
    inputs = {f"p{i}": t + 0.5 * _randn(g, *t.shape) for i, t in enumerate(target)}
    inputs.update({f"h{i}": t for i, t in enumerate(target)})
    def call(**x):
        return L.ijepa_loss([x[f"p{i}"] for i in range(4)], [x[f"h{i}"] for i in range(4)])
    return inputs, call


def _jepa_l1_loss(g):
    target = F.layer_norm(_randn(g, 7 * 64, 29, 128), (128,))  # TS-JEPA: 70% of 42 patches, 7 channels x 64
    return {"p": target + 0.5 * _randn(g, *target.shape), "h": target}, lambda p, h: L.jepa_l1_loss(p, h)


def _beit_loss(g):
    mask = torch.rand(4, 196, generator=g) < 0.4  # BEiT's 40% of 14 x 14 patches, 8192 visual tokens
    ids = torch.randint(0, 8192, (4, 196), generator=g)
    logits = 3.0 * _randn(g, int(mask.sum()), 8192)  # the masked patches' logits, as lm_head(x[mask])
    return {"logits": logits}, lambda logits: L.beit_loss(logits, ids[mask])


def _classification_loss(g):
    labels = torch.randint(0, 100, (512,), generator=g)  # jigsaw's 100 permutations, a batch of puzzles
    return {"logits": 3.0 * _randn(g, 512, 100)}, lambda logits: L.classification_loss(logits, labels)


def _mae(fn, **kw):
    def build(g):
        target = _randn(g, 16, 196, 768)  # ViT-B/16 patches of normalized 224-px crops
        mask = torch.rand(16, 196, generator=g) < 0.75
        pred = target + 0.5 * _randn(g, *target.shape)
        return {"pred": pred, "target": target}, lambda pred, target: fn(pred, target, mask, **kw)
    return build


def _barlow_twins_terms(g):
    c = L.cross_correlation(*_pair(g, 256, 1024))
    return {"c": c}, lambda c: L.barlow_twins_terms(c)


def _data2vec_loss(g):
    y = F.layer_norm(_randn(g, 1000, 768), (768,))  # the masked tokens' targets
    return {"p": y + 0.5 * _randn(g, *y.shape), "y": y}, lambda p, y: L.data2vec_loss(p, y)


def _token_cross_entropy(g):
    """Next-token scores over a 2,048-token vocabulary, a tenth of the positions without a target."""
    targets = torch.randint(0, 2048, (8, 64), generator=g)
    targets[torch.rand(8, 64, generator=g) < 0.1] = -100
    return {"logits": 3.0 * _randn(g, 8, 64, 2048)}, lambda logits: L.token_cross_entropy(logits, targets)


CASES: dict[str, Callable[[torch.Generator], Case]] = {
    "nt_xent": _two_view(L.nt_xent, temperature=0.1),
    "moco_info_nce": _moco_info_nce,
    "moco_v3_ctr": _two_view(L.moco_v3_ctr, temperature=0.1),
    "moco_v3_loss": _four_view(L.moco_v3_loss, d=128, temperature=0.1),
    "sinkhorn_knopp": _sinkhorn(L.sinkhorn_knopp, epsilon=0.05),
    "sinkhorn_knopp_teacher": _sinkhorn(L.sinkhorn_knopp_teacher, teacher_temp=0.04),
    "swav_loss": _swav_loss,
    "dino_loss": _dino_loss,
    "dino_center_update": _dino_center_update,
    "ibot_patch_loss": _ibot_patch_loss,
    "koleo_loss": _one(L.koleo_loss, 256, 384),
    "data2vec_targets": _data2vec_targets,
    "data2vec_loss": _data2vec_loss,
    "token_cross_entropy": _token_cross_entropy,
    "ijepa_loss": _ijepa_loss,
    "jepa_l1_loss": _jepa_l1_loss,
    "beit_loss": _beit_loss,
    "classification_loss": _classification_loss,
    "mae_loss": _mae(L.mae_loss),
    "patch_stats": _one(importlib.import_module("selfsup.losses.reconstruction").patch_stats, 16, 196, 768),
    "cross_correlation": _two_view(L.cross_correlation, d=1024),
    "barlow_twins_terms": _barlow_twins_terms,
    "barlow_twins_loss": _two_view(L.barlow_twins_loss, d=1024, lambd=0.0051),
    "invariance_loss": _two_view(L.invariance_loss, d=1024),
    "variance_loss": _one(L.variance_loss, 256, 1024, scale=0.8),  # std near γ = 1: the hinge is live
    "covariance_loss": _one(L.covariance_loss, 256, 1024),
    "vicreg_terms": _two_view(L.vicreg_terms, d=1024),
    "vicreg_loss": _two_view(L.vicreg_loss, d=1024),
    "normalized_mse": _two_view(L.normalized_mse, d=256),
    "negative_cosine": _two_view(L.negative_cosine, d=256),
    "byol_loss": _four_view(L.byol_loss),
    "simsiam_loss": _four_view(L.simsiam_loss),
    # TS2Vec: two views' timestamp representations (B, T, D) of the same overlap, scaled so the raw dot
    # products (no temperature) stay in a trained model's range
    **{name: _timesteps(getattr(L, name)) for name in
       ("hierarchical_contrastive_loss", "instance_contrastive_loss", "temporal_contrastive_loss")},
}


def _public_loss_functions() -> set[str]:
    """Every public function defined in a public module of ``selfsup.losses``."""
    names = set(L.__all__)
    for info in pkgutil.iter_modules(L.__path__):
        if info.name.startswith("_"):  # _precision: the float32 machinery itself
            continue
        mod = importlib.import_module(f"{L.__name__}.{info.name}")
        names |= {n for n, obj in vars(mod).items()
                  if not n.startswith("_") and inspect.isfunction(obj) and obj.__module__ == mod.__name__}
    return names


def _outputs(out: object) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _objective(outs: list[torch.Tensor]) -> torch.Tensor:
    """A scalar of the outputs: each scalar as is, each matrix against fixed random weights."""
    g = torch.Generator().manual_seed(7)
    return sum((o * torch.randn(o.shape, generator=g)).sum() if o.ndim else o for o in outs)


@functools.cache
def _case(name: str) -> Case:
    """Built once per module run: the closures are pure and ``_run`` never writes to the inputs."""
    return CASES[name](torch.Generator().manual_seed(0))


def _run(name: str, autocast: bool, prep: Callable[[torch.Tensor], torch.Tensor] = lambda v: v,
         grad: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The outputs of case ``name`` on its inputs passed through ``prep``, called under CPU bf16
    autocast or not, and (``grad``) the gradients of the inputs (None where unused)."""
    inputs, call = _case(name)
    grad = grad and name not in NO_GRAD
    leaves = [prep(v).detach().requires_grad_(grad) for v in inputs.values()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outs = _outputs(call(**dict(zip(inputs, leaves))))
    grads = list(torch.autograd.grad(_objective(outs), leaves, allow_unused=True)) if grad else []
    return [o.detach() for o in outs], grads


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over a list of tensors taken together, in float64."""
    diff = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b, strict=True))
    ref = sum(float(y.double().pow(2).sum()) for y in b)
    return (diff / ref) ** 0.5


def test_every_loss_has_a_case():
    assert _public_loss_functions() == set(CASES)
    assert NO_GRAD <= set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_autocast_matches_fp32(name):
    out32, g32 = _run(name, autocast=False)
    out16, g16 = _run(name, autocast=True)
    assert all(o.dtype == torch.float32 for o in out16), [o.dtype for o in out16]
    value_err = rel_err(out16, out32)
    if name in NO_GRAD:
        assert value_err < VALUE_TOL
        return
    used = [i for i, g in enumerate(g32) if g is not None]
    assert used, f"{name}: no input gets a gradient"
    grad_err = rel_err([g16[i] for i in used], [g32[i] for i in used])
    assert grad_err < GRAD_TOL and value_err < VALUE_TOL, f"gradient {grad_err:.2e}, value {value_err:.2e}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_inputs_lose_only_their_rounding(name):
    reference, _ = _run(name, autocast=False, prep=lambda v: v.bfloat16().float(), grad=False)
    out, _ = _run(name, autocast=True, prep=lambda v: v.bfloat16(), grad=False)
    assert all(o.dtype == torch.float32 for o in out), [o.dtype for o in out]
    assert rel_err(out, reference) < BF16_INPUT_TOL



def test_fp32_loss_casts_floating_tensors_only_and_turns_autocast_off():
    from selfsup.losses._precision import fp32_loss

    def dtypes(a):
        return [dtypes(t) for t in a] if isinstance(a, list) else (a.dtype if torch.is_tensor(a) else a)

    @fp32_loss
    def seen(*args, **kwargs):
        return [dtypes(a) for a in (*args, *kwargs.values())], torch.is_autocast_enabled("cpu")

    x16, ids, mask = torch.ones(2, dtype=torch.bfloat16), torch.arange(2), torch.ones(2, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, autocast_on = seen(x16, (x16, ids), ids, 0.5, mask=mask)
    assert got == [torch.float32, [torch.float32, torch.int64], torch.int64, 0.5, torch.bool]
    assert not autocast_on
    x32 = torch.ones(2, requires_grad=True)
    assert fp32_loss(lambda t: t)(x32) is x32  # float32 passes as is: no copy, exact gradient
    # a device without autocast (meta) only gets the casts
    assert seen(torch.empty(2, device="meta", dtype=torch.float16))[0] == [torch.float32]
