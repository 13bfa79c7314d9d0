"""BYOL and SimSiam: losses against hand computation, stop-gradient, the EMA target, recipes,
CLI training and exact resume."""

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, resume_matches_straight, train_recipe_two_steps

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.core.build import build_method
from selfsup.core.method import Progress
from selfsup.errors import ConfigError
from selfsup.losses import byol_loss, negative_cosine, normalized_mse, simsiam_loss

CONFIGS = Path(__file__).parents[1] / "configs"
# a 16-channel ResNet-18 keeps every step ~8x cheaper than the full width on a shared CPU
BASE = [*(o for o in TINY if not o.startswith("method.")), "backbone.width=16"]
BYOL_TINY = [*BASE, "method.name=byol", "method.proj_hidden_dim=32", "method.proj_dim=16",
             "method.pred_hidden_dim=32"]
SIMSIAM_TINY = [*BASE, "method.name=simsiam", "method.proj_hidden_dim=32", "method.proj_dim=16",
                "method.pred_hidden_dim=8"]


# ---------------------------------------------------------------------------------------------
# losses


def test_normalized_mse_known_vectors():
    e1, e2 = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.5]])
    assert normalized_mse(e1, e2).item() == pytest.approx(2.0)  # orthogonal: 2 - 2*0
    assert normalized_mse(e1, e1 * 7).item() == pytest.approx(0.0, abs=1e-7)  # identical direction
    assert normalized_mse(e1, -e1).item() == pytest.approx(4.0)  # opposite: 2 - 2*(-1)
    # 45 degrees: 2 - 2 cos(pi/4) = 2 - sqrt(2)
    assert normalized_mse(e1, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(2 - math.sqrt(2), rel=1e-6)


def test_negative_cosine_known_vectors():
    a = torch.tensor([[1.0, 2.0, 2.0]])  # norm 3
    assert negative_cosine(a, 2 * a).item() == pytest.approx(-1.0)
    assert negative_cosine(a, -a).item() == pytest.approx(1.0)
    assert negative_cosine(a, torch.tensor([[2.0, -1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-7)
    b = torch.tensor([[0.0, 0.0, 1.0]])
    assert negative_cosine(a, b).item() == pytest.approx(-2.0 / 3.0)  # -(2/3)


def _cos_loop(p, z):
    """Per-row cosine by an explicit loop over plain Python floats."""
    out = []
    for row_p, row_z in zip(p.tolist(), z.tolist()):
        dot = sum(x * y for x, y in zip(row_p, row_z))
        out.append(dot / (math.sqrt(sum(x * x for x in row_p)) * math.sqrt(sum(y * y for y in row_z))))
    return out


def test_symmetric_losses_match_explicit_formulas():
    g = torch.Generator().manual_seed(3)
    q1, q2, z1, z2 = (torch.randn(5, 7, generator=g) for _ in range(4))
    expect_byol = (sum(2 - 2 * c for c in _cos_loop(q1, z2)) + sum(2 - 2 * c for c in _cos_loop(q2, z1))) / 5
    assert byol_loss(q1, q2, z1, z2).item() == pytest.approx(expect_byol, rel=1e-5)
    expect_siam = sum(-0.5 * a - 0.5 * b for a, b in zip(_cos_loop(q1, z2), _cos_loop(q2, z1))) / 5
    assert simsiam_loss(q1, q2, z1, z2).item() == pytest.approx(expect_siam, rel=1e-5)
    # symmetry: swapping the two views leaves both losses unchanged
    assert byol_loss(q2, q1, z2, z1).item() == pytest.approx(byol_loss(q1, q2, z1, z2).item(), rel=1e-6)
    assert simsiam_loss(q2, q1, z2, z1).item() == pytest.approx(simsiam_loss(q1, q2, z1, z2).item(), rel=1e-6)
    # the two papers' objectives agree up to an affine map: BYOL = 4 + 4 * SimSiam
    assert byol_loss(q1, q2, z1, z2).item() == pytest.approx(4 + 4 * simsiam_loss(q1, q2, z1, z2).item(), rel=1e-5)
    # bounds: BYOL's sum of two directions is 0 at perfect agreement, SimSiam's minimum is -1
    assert byol_loss(z2, z1, z1, z2).item() == pytest.approx(0.0, abs=1e-6)
    assert simsiam_loss(z2, z1, z1, z2).item() == pytest.approx(-1.0, abs=1e-6)


def test_stop_gradient_blocks_the_target_side():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(4, 6, generator=g).requires_grad_() for _ in range(4))
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None  # stopgrad(z): no gradient reaches the targets
    assert p1.grad is not None and p1.grad.abs().sum() > 0
    byol_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    # the test is sensitive: without stop-gradient the targets do get a gradient
    simsiam_loss(p1, p2, z1, z2, stop_grad=False).backward()
    assert z1.grad is not None and z1.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# BYOL: target network


def _byol(overrides=()):
    cfg = load_config(None, [*BYOL_TINY, "trainer.channels_last=false", *overrides])
    return build_method(cfg)


def _images(n=8, side=20):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_byol_target_gets_no_gradient_and_moves_only_in_on_step_end():
    method = _byol()
    targets = [*method.target_backbone.parameters(), *method.target_projector.parameters()]
    assert targets and not any(p.requires_grad for p in targets)
    out = method({"images": _images()})
    assert "monitor/student_teacher_cos" in out.metrics
    assert out.metrics["monitor/student_teacher_cos"] == pytest.approx(1.0, abs=1e-5)  # identical at init
    out.loss.backward()
    assert all(p.grad is None for p in targets)
    assert method.predictor[0].weight.grad.abs().sum() > 0 and method.backbone.model.conv1.weight.grad.abs().sum() > 0

    before = [p.detach().clone() for p in targets]
    with torch.no_grad():  # an optimizer step on the online network only
        for p in method.parameters():
            if p.grad is not None:
                p.sub_(0.5 * p.grad)
    assert all(torch.equal(a, b) for a, b in zip(before, targets)), "target moved outside on_step_end"

    # hand check: after step 6 of K = 10 the update index is k = 5, so
    # tau = 1 - (1 - 0.996) * (cos(pi * 5/10) + 1) / 2 = 1 - 0.004 * 0.5 = 0.998
    progress = Progress(step=6, total_steps=10, epoch=0, epochs=1, steps_per_epoch=10)
    assert method.momentum(progress) == pytest.approx(0.998, abs=1e-12)
    online = [*method.backbone.parameters(), *method.projector.parameters()]
    method.on_step_end(progress)
    moved = False
    for t_old, t_new, s in zip(before, targets, online):
        assert torch.allclose(t_new, 0.998 * t_old + 0.002 * s.detach(), atol=1e-7)
        moved |= not torch.equal(t_new, t_old)
    assert moved


def test_byol_momentum_schedule_endpoints():
    method = _byol()

    def tau(step, total=100):
        return method.momentum(Progress(step=step, total_steps=total, epoch=0, epochs=1, steps_per_epoch=total))

    assert tau(1) == pytest.approx(0.996)  # first update uses tau_base (official global_step = 0)
    assert tau(101) == pytest.approx(1.0)  # k = K: cos(pi) = -1 -> tau = 1
    assert all(tau(s) <= tau(s + 1) for s in range(1, 100))  # rises monotonically


def test_configs_reject_bad_values():
    with pytest.raises(ConfigError, match="tau_base"):
        load_config(None, [*BYOL_TINY, "method.tau_base=1.5"])
    with pytest.raises(ConfigError, match="tau_final"):
        load_config(None, [*BYOL_TINY, "method.tau_base=0.99", "method.tau_final=0.9"])
    with pytest.raises(ConfigError, match="proj_layers"):
        load_config(None, [*SIMSIAM_TINY, "method.proj_layers=0"])


# ---------------------------------------------------------------------------------------------
# SimSiam: architecture


def test_simsiam_heads_follow_the_paper():
    cfg = load_config(None, [*SIMSIAM_TINY, "method.proj_layers=3"])
    method = build_method(cfg)
    proj = [type(m).__name__ for m in method.projector]
    assert proj == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert not method.projector[-1].affine  # output BN without affine (official code)
    assert [type(m).__name__ for m in method.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert method.predictor[0].out_features == 8 and method.predictor[-1].bias is not None
    assert not any("target" in n for n, _ in method.named_modules())  # no momentum encoder
    zs, ps = [], []
    method.projector.register_forward_hook(lambda m, i, o: zs.append(o.detach()))
    method.predictor.register_forward_hook(lambda m, i, o: ps.append(o.detach()))
    out = method({"images": _images()})
    assert out.embeddings.shape == (8, 16) and torch.equal(out.embeddings, zs[0])
    # eq. 4 by hand: L = D(p1, z2) / 2 + D(p2, z1) / 2, D(p, z) = -mean_i cos(p_i, z_i)

    def d(p, z):
        return -sum(sum(a * b for a, b in zip(pi, zi)) / math.sqrt(sum(a * a for a in pi) * sum(b * b for b in zi))
                    for pi, zi in zip(p.tolist(), z.tolist())) / len(p)

    assert out.loss.item() == pytest.approx(d(ps[0], zs[1]) / 2 + d(ps[1], zs[0]) / 2, abs=1e-5)


def test_recipes_carry_the_papers_numbers():
    byol = load_config(CONFIGS / "byol" / "imagenet.yaml")
    optim = byol.optim
    assert (optim.name, optim.lr, optim.weight_decay, byol.data.batch_size) == ("lars", 0.2, 1.5e-6, 4096)
    assert (byol.method.proj_hidden_dim, byol.method.proj_dim, byol.method.tau_base) == (4096, 256, 0.996)
    v1, v2 = byol.augment.views
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    siam = load_config(CONFIGS / "simsiam" / "imagenet.yaml")
    assert (siam.optim.name, siam.optim.lr, siam.optim.weight_decay, siam.data.batch_size) == ("sgd", 0.05, 1e-4, 512)
    assert siam.optim.exclude_bias_norm is False and siam.method.proj_layers == 3
    siam_c = load_config(CONFIGS / "simsiam" / "cifar10.yaml")
    assert (siam_c.optim.lr, siam_c.optim.weight_decay, siam_c.trainer.epochs, siam_c.method.proj_layers) == (
        0.03, 5e-4, 800, 2)
    assert load_config(CONFIGS / "byol" / "cifar10.yaml").backbone.cifar_stem


# ---------------------------------------------------------------------------------------------
# training end to end


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_cli_trains_a_few_steps_from_the_recipe(tmp_path, name):
    # the CIFAR recipe, shrunk: embedded data, 16-px crops, tiny heads, the ImageNet stem (fast)
    tiny = BYOL_TINY if name == "byol" else SIMSIAM_TINY
    overrides = [o for o in tiny if o.startswith(("method.proj", "method.pred")) or not o.startswith("method.")]
    train_recipe_two_steps(name, tmp_path, overrides)
    if name == "byol":
        assert "monitor/student_teacher_cos" in (tmp_path / "r" / "metrics.csv").read_text()


def test_byol_resume_equals_uninterrupted(tmp_path):
    cfg = load_config(None, [*BYOL_TINY, "trainer.max_steps=3"])
    ck, a = resume_matches_straight(cfg, tmp_path, until_step=2)
    assert any(k.startswith("target_backbone.") for k in ck["model"])  # the target is saved and restored
    # the EMA target lags the online network (it is not a copy)
    assert not torch.equal(a["target_projector.0.weight"], a["projector.0.weight"])


def test_methods_lists_byol_and_simsiam(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "byol" in out and "Grill et al. 2020" in out
    assert "simsiam" in out and "Chen & He 2021" in out
