"""SwAV and DINO: Sinkhorn, the losses against explicit loops, the DINO center, the multi-crop
forward, frozen prototypes / last layer, the DINO head, recipes, CLI training and exact resume."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, resume_matches_straight, train_recipe_two_steps

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.core.build import build_method
from selfsup.core.method import Progress
from selfsup.errors import ConfigError
from selfsup.heads import DINOHead
from selfsup.losses import dino_center_update, dino_loss, sinkhorn_knopp, swav_loss
from selfsup.pretext.multicrop import forward_by_resolution

CONFIGS = Path(__file__).parents[1] / "configs"
# 16-channel ResNet-18, 2 global crops of 16 px and 2 local crops of 8 px, tiny heads
BASE = [*(o for o in TINY if not o.startswith("method.")), "backbone.width=16", "augment.n_local=2",
        "augment.local.size=8", "augment.local.crop_scale=[0.05,0.4]"]
SWAV_TINY = [*BASE, "method.name=swav", "method.proj_hidden_dim=32", "method.proj_dim=16", "method.n_prototypes=32"]
DINO_TINY = [*BASE, "method.name=dino", "method.hidden_dim=32", "method.bottleneck_dim=16", "method.out_dim=32"]


def _images(n=8, side=20):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def _progress(step, steps_per_epoch=4, total=100):
    return Progress(step=step, total_steps=total, epoch=(step - 1) // steps_per_epoch, epochs=25,
                    steps_per_epoch=steps_per_epoch)


# ---------------------------------------------------------------------------------------------
# Sinkhorn-Knopp


def _sinkhorn_reference(scores, eps, iters):
    """The official algorithm in numpy float64: Q = exp(S/eps)^T, normalize the total, then
    alternately rows (prototypes) to 1/K and columns (samples) to 1/B; columns rescaled to 1."""
    q = np.exp(scores.astype(np.float64) / eps).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q *= (1.0 / k) / q.sum(axis=1, keepdims=True)
        q *= (1.0 / b) / q.sum(axis=0, keepdims=True)
    return (q / q.sum(axis=0, keepdims=True)).T


def test_sinkhorn_codes_are_probabilities_with_uniform_marginals():
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)  # cosines
    q = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    assert q.shape == (64, 16) and q.dtype == torch.float32 and (q >= 0).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)  # each sample: a distribution
    ref = _sinkhorn_reference(scores.numpy(), 0.05, 3)
    assert np.allclose(q.numpy(), ref, atol=1e-5)
    # equipartition: with enough iterations every prototype gets B/K samples' worth of mass
    q_conv = sinkhorn_knopp(scores, epsilon=0.05, iterations=200)
    assert torch.allclose(q_conv.sum(dim=0) / 64, torch.full((16,), 1 / 16), atol=1e-3)
    assert torch.allclose(q_conv.sum(dim=1), torch.ones(64), atol=1e-5)
    # invariant to a constant shift; the max subtraction keeps exp(6 / 0.05) = e^120 from overflowing
    assert torch.allclose(sinkhorn_knopp(scores + 5.0, 0.05, 3), q, atol=1e-6)


def test_sinkhorn_spreads_a_collapsed_batch():
    # every sample prefers prototype 0: the argmax would collapse, the codes must not
    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0]] * 8) + 0.01 * noise
    q = sinkhorn_knopp(scores, epsilon=0.05, iterations=50)
    assert torch.allclose(q.sum(dim=0), torch.full((4,), 2.0), atol=1e-2)


# ---------------------------------------------------------------------------------------------
# losses against explicit computation


def _log_softmax(row, t):
    m = max(x / t for x in row)
    lse = m + math.log(sum(math.exp(x / t - m) for x in row))
    return [x / t - lse for x in row]


def _softmax(row, t):
    return [math.exp(v) for v in _log_softmax(row, t)]


def test_swav_loss_matches_hand_computation():
    s0, s1 = [0.5, -0.2, 0.1], [0.0, 0.3, -0.4]
    q0, q1 = [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]
    tau = 0.5
    # swapped: q0 predicted from crop 1, q1 from crop 0; mean of the two terms
    expect = 0.5 * (-sum(a * b for a, b in zip(q0, _log_softmax(s1, tau)))
                    - sum(a * b for a, b in zip(q1, _log_softmax(s0, tau))))
    got = swav_loss([torch.tensor([s0]), torch.tensor([s1])], [torch.tensor([q0]), torch.tensor([q1])], tau)
    assert got.item() == pytest.approx(expect, rel=1e-6)
    # equal scores give p = 1/3 everywhere: the loss is log 3 whatever the codes
    flat = torch.zeros(1, 3)
    assert swav_loss([flat, flat], [torch.tensor([q0]), torch.tensor([q1])], tau).item() == pytest.approx(math.log(3))


def test_swav_loss_multicrop_matches_loop():
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(3, 5, generator=g) for _ in range(4)]  # 2 global + 2 local crops
    codes = [torch.softmax(torch.randn(3, 5, generator=g), dim=1) for _ in range(2)]
    total = 0.0
    for i in range(2):
        sub = 0.0
        for v in range(4):
            if v == i:
                continue
            sub += sum(-sum(q * lp for q, lp in zip(codes[i][b].tolist(), _log_softmax(scores[v][b].tolist(), 0.1)))
                       for b in range(3)) / 3
        total += sub / 3
    assert swav_loss(scores, codes, 0.1).item() == pytest.approx(total / 2, rel=1e-5)


def test_dino_loss_matches_explicit_loop():
    g = torch.Generator().manual_seed(4)
    student = [torch.randn(3, 6, generator=g) for _ in range(4)]  # 2 global + 2 local crops
    teacher = [torch.randn(3, 6, generator=g) for _ in range(2)]
    center = torch.randn(6, generator=g) * 0.1
    ts, tt = 0.1, 0.04
    terms = []
    for t in range(2):
        for s in range(4):
            if s == t:
                continue
            per_sample = []
            for b in range(3):
                p_t = _softmax([x - c for x, c in zip(teacher[t][b].tolist(), center.tolist())], tt)
                log_p_s = _log_softmax(student[s][b].tolist(), ts)
                per_sample.append(-sum(p * lp for p, lp in zip(p_t, log_p_s)))
            terms.append(sum(per_sample) / 3)
    expect = sum(terms) / len(terms)  # 6 pairs
    assert len(terms) == 6
    assert dino_loss(student, teacher, center, ts, tt).item() == pytest.approx(expect, rel=1e-5)
    # no gradient reaches the teacher
    tg = [t.clone().requires_grad_() for t in teacher]
    sg = [s.clone().requires_grad_() for s in student]
    dino_loss(sg, tg, center).backward()
    assert all(t.grad is None for t in tg) and sg[3].grad.abs().sum() > 0


def test_dino_center_converges_to_teacher_mean():
    g = torch.Generator().manual_seed(5)
    teacher = [torch.randn(16, 8, generator=g) + 3.0, torch.randn(16, 8, generator=g)]
    center = torch.zeros(1, 8)
    first = dino_center_update(center, teacher, momentum=0.9)
    mean = torch.cat(teacher).mean(dim=0, keepdim=True)
    assert torch.allclose(first, 0.1 * mean, atol=1e-6)  # one EMA step from zero
    for _ in range(300):
        center = dino_center_update(center, teacher, momentum=0.9)
    assert torch.allclose(center, mean, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# multi-crop forward


def test_forward_by_resolution_calls_once_per_size_and_keeps_order():
    g = torch.Generator().manual_seed(6)
    sizes = [16, 8, 16, 8, 12]  # interleaved sizes: grouping must not need them consecutive
    views = [torch.randn(3, 3, s, s, generator=g) for s in sizes]
    calls = []

    def encoder(x):
        calls.append(tuple(x.shape))
        side = torch.full((x.shape[0],), float(x.shape[-1]))
        return torch.stack([x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)), side], 1)

    out = forward_by_resolution(encoder, views)
    assert calls == [(6, 3, 16, 16), (6, 3, 8, 8), (3, 3, 12, 12)]  # one call per resolution
    assert len(out) == 5
    for v, o in zip(views, out):  # view i's output is the encoder's output for view i alone
        assert torch.allclose(o, encoder(v), atol=1e-6)


def test_methods_run_the_backbone_once_per_resolution():
    for overrides in (SWAV_TINY, DINO_TINY):
        method = build_method(load_config(None, [*overrides, "trainer.channels_last=false"]))
        shapes = []
        method.backbone.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape[-2:])))
        method({"images": _images()})
        assert shapes == [(16, 16), (8, 8)], overrides[-1]  # the DINO teacher is a separate module


# ---------------------------------------------------------------------------------------------
# frozen prototypes / last layer


def _sgd_step(method):
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5, momentum=0.9, weight_decay=0.1)
    out = method({"images": _images()})
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    return out


def test_swav_prototypes_frozen_during_first_epoch_only():
    method = build_method(load_config(None, [*SWAV_TINY, "trainer.channels_last=false"]))
    proto = method.prototypes.weight
    proj_before = method.projector[0].weight.detach().clone()
    for step in (1, 2):  # steps 0 and 1 of a 2-step epoch: frozen
        method({"images": _images()})  # normalizes the prototypes before the step
        before = proto.detach().clone()
        _sgd_step(method)
        assert proto.grad is not None and proto.grad.abs().sum() == 0
        method.on_step_end(_progress(step, steps_per_epoch=2))
        assert torch.equal(proto, before), "prototypes moved in the first epoch"
    assert not torch.equal(method.projector[0].weight, proj_before)  # the rest trains
    before = proto.detach().clone()
    _sgd_step(method)  # step 2 = first step of epoch 1
    assert proto.grad.abs().sum() > 0 and not torch.equal(proto, before)


def test_swav_prototypes_are_unit_vectors_in_every_forward():
    method = build_method(load_config(None, [*SWAV_TINY, "trainer.channels_last=false",
                                             "method.freeze_prototypes_epochs=0"]))
    proto = method.prototypes.weight
    assert torch.allclose(proto.norm(dim=1), torch.ones(32), atol=1e-6)  # from construction on
    before = proto.detach().clone()
    out = method({"images": _images()})
    assert torch.equal(proto, before), "forward changed the prototypes"
    assert 0.0 < float(out.metrics["monitor/uniformity"]) < 1.0
    out.loss.backward()
    with torch.no_grad():
        proto.add_(proto.grad, alpha=-50.0)  # an update that leaves them far from unit norm
    assert not torch.allclose(proto.norm(dim=1), torch.ones(32), atol=1e-3)
    method.on_step_end(_progress(1, steps_per_epoch=2))  # a kept step re-normalizes them
    assert torch.allclose(proto.norm(dim=1), torch.ones(32), atol=1e-6)
    with torch.no_grad():  # a checkpoint of an older version, saved before re-normalization
        state = {k: (v * 3.0 if k == "prototypes.weight" else v) for k, v in method.state_dict().items()}
    method.load_state_dict(state)
    assert torch.allclose(proto.norm(dim=1), torch.ones(32), atol=1e-6)


def test_dino_last_layer_frozen_during_first_epoch_only():
    method = build_method(load_config(None, [*DINO_TINY, "trainer.channels_last=false",
                                             "method.norm_last_layer=false"]))
    last = list(method.head.last_layer.parameters())
    assert len(last) == 2  # g (trainable here) and v
    before = [p.detach().clone() for p in last]
    mlp_before = method.head.mlp[0].weight.detach().clone()
    _sgd_step(method)
    assert all(p.grad.abs().sum() == 0 for p in last)
    method.on_step_end(_progress(1, steps_per_epoch=1))
    assert all(torch.equal(a, b) for a, b in zip(before, last)), "last layer moved in the first epoch"
    assert not torch.equal(method.head.mlp[0].weight, mlp_before)
    _sgd_step(method)  # epoch 1
    assert all(p.grad.abs().sum() > 0 for p in last)
    assert not torch.equal(method.head.last_layer.parametrizations.weight.original1, before[1])


# ---------------------------------------------------------------------------------------------
# DINO head, teacher, schedules


def test_dino_head_weight_norm_and_state_dict_round_trip():
    torch.manual_seed(0)
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8)
    g = head.last_layer.parametrizations.weight.original0
    assert g.shape == (20, 1) and torch.all(g == 1) and not g.requires_grad  # norm_last_layer
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(20), atol=1e-6)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    x = torch.randn(5, 12)
    out = head(x)
    assert out.abs().max() <= 1 + 1e-5  # unit bottleneck times unit rows: cosines
    state = head.state_dict()
    prefix = "last_layer.parametrizations.weight."
    assert {prefix + "original0", prefix + "original1"} <= set(state)
    other = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8)
    other.load_state_dict(state)
    assert torch.equal(other(x), out)
    assert DINOHead(12, 20, 16, 8, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_dino_teacher_ema_temperature_and_metrics():
    method = build_method(load_config(None, [*DINO_TINY, "trainer.channels_last=false",
                                             "method.warmup_teacher_temp_epochs=3", "method.teacher_temp=0.07"]))
    teacher = [*method.teacher_backbone.parameters(), *method.teacher_head.parameters()]
    assert teacher and not any(p.requires_grad for p in teacher)
    torch.manual_seed(5)
    out = method({"images": _images()})
    assert out.metrics["monitor/student_teacher_cos"] == pytest.approx(1.0, abs=1e-5)  # identical at init
    assert 0.0 < float(out.metrics["monitor/uniformity"]) < 1.0
    assert out.embeddings.shape == (8, method.backbone.out_dim)  # backbone features, not head outputs
    assert method.center.abs().sum() == 0  # forward leaves it; the kept step moves it
    out.loss.backward()
    assert all(p.grad is None for p in teacher)
    with torch.no_grad():  # what eq. 4 gives: 0.9 * 0 + 0.1 * the teacher's batch mean
        torch.manual_seed(5)  # the same global crops as the forward above
        views = method.make_views(_images())[:2]
        t = method.teacher_head(torch.cat(forward_by_resolution(method.teacher_backbone, views)))
    method.on_step_end(_progress(1, steps_per_epoch=4))
    assert torch.allclose(method.center, 0.1 * t.mean(dim=0, keepdim=True), atol=1e-6)
    assert method.center.abs().sum() > 0
    # temperature: linspace(0.04, 0.07, 3)[epoch], then 0.07
    temps = [method.teacher_temp()]  # before any step: epoch 0
    for step in (4, 8, 12):  # first steps of epochs 1, 2, 3
        method.clock.tick(_progress(step, steps_per_epoch=4))
        temps.append(method.teacher_temp())
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07])
    # momentum: first update uses 0.996, rising to 1 (cosine over the run)
    assert method.momentum(_progress(1, total=10)) == pytest.approx(0.996)
    assert method.momentum(_progress(6, total=10)) == pytest.approx(0.998)


def test_dino_with_a_vit_and_local_crops():
    cfg = load_config(None, [*DINO_TINY, "backbone.name=timm:vit_tiny_patch16_224", "backbone.img_size=16",
                             "backbone.patch_size=8", "backbone.drop_path=0.1", "trainer.channels_last=false"])
    method = build_method(cfg)
    out = method({"images": _images()})  # 16-px global and 8-px local crops through one ViT
    assert torch.isfinite(out.loss) and out.embeddings.shape == (8, 192)
    assert all(m.drop_prob == 0 for m in method.teacher_backbone.modules() if hasattr(m, "drop_prob"))
    assert any(m.drop_prob > 0 for m in method.backbone.modules() if hasattr(m, "drop_prob"))


def test_swav_queue_fills_and_is_checkpointed():
    method = build_method(load_config(None, [*SWAV_TINY, "trainer.channels_last=false", "method.queue_length=16",
                                             "method.queue_start_epoch=1"]))
    assert method.queue.shape == (2, 16, 16) and "queue" in method.state_dict()
    method({"images": _images()})
    assert method.queue.abs().sum() == 0  # epoch 0 < queue_start_epoch
    method.clock.tick(_progress(4, steps_per_epoch=4))
    method({"images": _images()})
    assert method.queue.abs().sum() == 0  # forward only defers the push ...
    method.on_step_end(_progress(5, steps_per_epoch=4))  # ... to the kept step
    assert method.queue[:, :8].abs().sum() > 0 and method.queue[:, 8:].abs().sum() == 0
    assert torch.allclose(method.queue[0, :8].norm(dim=1), torch.ones(8), atol=1e-5)  # unit projections
    with pytest.raises(ConfigError, match="queue_length"):
        build_method(load_config(None, [*SWAV_TINY, "method.queue_length=4", "method.queue_start_epoch=0"]))(
            {"images": _images()})


def test_configs_reject_bad_values():
    with pytest.raises(ConfigError, match="epsilon"):
        load_config(None, [*SWAV_TINY, "method.epsilon=0"])
    with pytest.raises(ConfigError, match="center_momentum"):
        load_config(None, [*DINO_TINY, "method.center_momentum=1.5"])
    with pytest.raises(ConfigError, match="at least 2 crops"):
        build_method(load_config(None, [*SWAV_TINY, "augment.n_local=0", "augment.views=[{size: 16}]"]))


def test_recipes_carry_the_papers_numbers():
    swav = load_config(CONFIGS / "swav" / "imagenet.yaml")
    o = swav.optim
    assert (o.name, o.scaled_lr(swav.data.batch_size), o.min_lr, o.weight_decay, swav.trainer.epochs) == (
        "lars", 4.8, 0.0048, 1e-6, 800)
    m = swav.method
    assert (m.n_prototypes, m.epsilon, m.sinkhorn_iterations, m.temperature, m.proj_dim, m.queue_length) == (
        3000, 0.05, 3, 0.1, 128, 0)
    a = swav.augment
    assert [v.size for v in a.views] == [224, 224] and (a.local.size, a.n_local) == (96, 6)
    assert a.views[0].crop_scale == (0.14, 1.0) and a.local.crop_scale == (0.05, 0.14)
    assert a.local.blur_kernel_size == a.views[0].blur_kernel_size == 23
    dino = load_config(CONFIGS / "dino" / "imagenet.yaml")
    o, m, a = dino.optim, dino.method, dino.augment
    assert (o.name, o.scaled_lr(dino.data.batch_size), o.min_lr, o.weight_decay, o.weight_decay_end, o.grad_clip) == (
        "adamw", 2e-3, 1e-6, 0.04, 0.4, 3.0)
    assert (m.out_dim, m.bottleneck_dim, m.student_temp, m.warmup_teacher_temp, m.teacher_temp,
            m.warmup_teacher_temp_epochs, m.momentum_teacher) == (65536, 256, 0.1, 0.04, 0.07, 30, 0.996)
    assert (a.views[0].crop_scale, a.local.crop_scale, a.n_local, a.local.size) == ((0.4, 1.0), (0.05, 0.4), 8, 96)
    assert (dino.backbone.name, dino.backbone.drop_path, dino.data.batch_size) == (
        "timm:vit_small_patch16_224", 0.1, 1024)
    for name in ("swav", "dino"):
        c = load_config(CONFIGS / name / "cifar10.yaml")
        assert c.backbone.cifar_stem and c.augment.views[0].size == 32 and c.augment.n_local == 4


# ---------------------------------------------------------------------------------------------
# training end to end


@pytest.mark.parametrize("name", ["swav", "dino"])
def test_cli_trains_a_few_steps_from_the_recipe(tmp_path, name):
    tiny = SWAV_TINY if name == "swav" else DINO_TINY
    overrides = [o for o in tiny if not o.startswith("augment.local.crop_scale")]
    train_recipe_two_steps(name, tmp_path, overrides)
    if name == "dino":
        assert "monitor/student_teacher_cos" in (tmp_path / "r" / "metrics.csv").read_text()


def test_dino_resume_equals_uninterrupted(tmp_path):
    # 1 step per epoch, 3 steps: resuming at step 2 (epoch 2) must restore the teacher, the center
    # and the clock (epoch 2: teacher temperature 0.07 and the last layer no longer frozen)
    cfg = load_config(None, [*DINO_TINY, "data.limit=16", "trainer.epochs=3", "method.warmup_teacher_temp_epochs=2",
                             "method.teacher_temp=0.07"])
    ck, a = resume_matches_straight(cfg, tmp_path, until_step=2)
    assert ck["model"]["clock.state"].tolist() == [2, 1]
    assert any(k.startswith("teacher_head.") for k in ck["model"]) and "center" in ck["model"]
    assert a["center"].abs().sum() > 0
    assert not torch.equal(a["teacher_head.mlp.0.weight"], a["head.mlp.0.weight"])  # the teacher lags


def test_methods_lists_swav_and_dino(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "swav" in out and "Caron et al. 2020" in out
    assert "dino" in out and "Caron et al. 2021" in out
