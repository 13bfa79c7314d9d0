"""DINOv2: KoLeo and iBOT against hand-computed values, Sinkhorn-Knopp against the official
algorithm, the iBOT mask spread, the method's pieces (mask token, teacher, centers, schedules,
uniform drop path, layer decay), recipes, CLI training, export and exact resume."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import resume_matches_straight

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.core.build import build_method
from selfsup.core.method import Progress
from selfsup.errors import ConfigError
from selfsup.losses import (
    dino_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp_teacher,
    swav_loss,
)
from selfsup.methods.dinov2 import ibot_masks
from selfsup.train.optim import param_groups

CONFIGS = Path(__file__).parents[1] / "configs"
# ViT 32 wide, 2 blocks, patch 4: 16-px global crops (4x4 = 16 patches), 8-px local crops
TINY = [
    "data.limit=32", "data.batch_size=8", "data.eval_batch_size=256", "trainer.progress=false",
    "trainer.precision=32", "trainer.device=cpu", "trainer.channels_last=false",
    "optim.name=adamw", "optim.lr=1e-3", "optim.warmup_epochs=0", "eval.final_knn=false",
    "backbone.name=vit_tiny", "backbone.patch_size=4", "backbone.depth=2", "backbone.embed_dim=32",
    "backbone.num_heads=2", "backbone.drop_path=0.1", "backbone.img_size=16",
    "augment.views.0.size=16", "augment.views.1.size=16", "augment.n_local=2", "augment.local.size=8",
    "method.name=dinov2", "method.out_dim=32", "method.hidden_dim=32", "method.bottleneck_dim=16",
    "method.ibot_out_dim=24", "method.ibot_hidden_dim=32", "method.ibot_bottleneck_dim=16",
]


def _images(n=8, side=20):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def _build(*extra):
    return build_method(load_config(None, [*TINY, *extra]))


def _progress(step, steps_per_epoch=4, total=100):
    return Progress(step=step, total_steps=total, epoch=(step - 1) // steps_per_epoch, epochs=25,
                    steps_per_epoch=steps_per_epoch)


# ---------------------------------------------------------------------------------------------
# KoLeo


def test_koleo_matches_hand_computation():
    # unit vectors after normalization: a = (1, 0), b = (0, 1), c = (0.6, 0.8)
    # cosines: ab 0, ac 0.6, bc 0.8 -> nearest neighbours a->c, b->c, c->b
    # distances |a-c| = sqrt(0.8), |b-c| = |c-b| = sqrt(0.4)
    # L = -(log sqrt(0.8) + 2 log sqrt(0.4)) / 3 = -(0.5 ln 0.8 + ln 0.4) / 3 = 0.3426208358
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [3.0, 4.0]], requires_grad=True)
    loss = koleo_loss(x)
    assert loss.item() == pytest.approx(0.3426208358, abs=1e-6)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_koleo_prefers_spread_points():
    angles = torch.linspace(0, 2 * math.pi, 9)[:-1]
    spread = torch.stack([angles.cos(), angles.sin()], 1)  # 8 points evenly on the circle
    clustered = torch.stack([(angles / 8).cos(), (angles / 8).sin()], 1)  # the same squeezed in 45 degrees
    assert koleo_loss(spread) < koleo_loss(clustered)
    # evenly spaced: every nearest distance is 2 sin(pi / 8)
    assert koleo_loss(spread).item() == pytest.approx(-math.log(2 * math.sin(math.pi / 8)), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# iBOT patch loss


def test_ibot_patch_loss_matches_hand_computation():
    # B = 4 global-crop samples of N = 4 patches; sample 0 masks patches 0, 1; sample 2 patch 3
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = mask[0, 1] = mask[2, 3] = True
    tau = 0.5
    student = torch.tensor([[0.0, 0.0],  # softmax(s / tau) = (1/2, 1/2)
                            [tau * math.log(3), 0.0],  # (3/4, 1/4)
                            [0.0, tau * math.log(4)]])  # (1/5, 4/5)
    teacher = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    # cross-entropies: ln 2 = 0.6931472, -ln(3/4) = 0.2876821, -(0.25 ln 0.2 + 0.75 ln 0.8) = 0.5697171
    # per image mean over its masked patches, summed, divided by all B = 4 samples:
    # ((0.6931472 + 0.2876821) / 2 + 0.5697171) / 4 = 0.2650329
    assert ibot_patch_loss(student, teacher, mask, student_temp=tau).item() == pytest.approx(0.2650329, abs=1e-6)


def test_ibot_patch_loss_weights_each_image_once():
    g = torch.Generator().manual_seed(0)
    s1, t1 = torch.randn(1, 6, generator=g), torch.softmax(torch.randn(1, 6, generator=g), -1)
    s2, t2 = torch.randn(1, 6, generator=g), torch.softmax(torch.randn(1, 6, generator=g), -1)
    one = torch.zeros(2, 8, dtype=torch.bool)
    one[0, 0] = one[1, 5] = True
    base = ibot_patch_loss(torch.cat([s1, s2]), torch.cat([t1, t2]), one)
    # image 0 now masks 5 identical patches: its weight stays 1, the loss does not move
    many = one.clone()
    many[0, :5] = True
    rep = ibot_patch_loss(torch.cat([s1.repeat(5, 1), s2]), torch.cat([t1.repeat(5, 1), t2]), many)
    assert rep.item() == pytest.approx(base.item(), rel=1e-6)
    # no gradient to the teacher targets
    s = torch.cat([s1, s2]).requires_grad_()
    t = torch.cat([t1, t2]).requires_grad_()
    ibot_patch_loss(s, t, one).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="masked patches"):
        ibot_patch_loss(torch.cat([s1, s2, s2]), torch.cat([t1, t2, t2]), one)


# ---------------------------------------------------------------------------------------------
# Sinkhorn-Knopp teacher


def _official_sinkhorn(out, temp, iters, b):
    """dinov2 ``sinkhorn_knopp_teacher`` in numpy float64 (no max shift; B passed in, as the
    iBOT variant passes the all-reduced masked-patch count)."""
    q = np.exp(out.astype(np.float64) / temp).T
    k = q.shape[0]
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def test_sinkhorn_teacher_is_the_official_algorithm_and_balances_prototypes():
    g = torch.Generator().manual_seed(0)
    out = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)  # cosine-like head outputs
    q = sinkhorn_knopp_teacher(out, teacher_temp=0.07, iterations=3)
    assert q.dtype == torch.float32 and (q >= 0).all()
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)  # each sample's target sums to 1
    for b in (64, 17, 1000):  # B only scales between normalizations: any count gives the same targets
        assert np.allclose(q.numpy(), _official_sinkhorn(out.numpy(), 0.07, 3, b), atol=1e-5)
    # prototype marginals: uniform (B/K each) to 1e-3 once iterated to convergence
    q_conv = sinkhorn_knopp_teacher(out, teacher_temp=0.07, iterations=100)
    assert torch.allclose(q_conv.sum(0) / 64, torch.full((16,), 1 / 16), atol=1e-3)
    # a collapsed teacher (every sample prefers prototype 0) still gets balanced targets
    collapsed = torch.tensor([[1.0, 0.2, 0.1, 0.0]]).repeat(32, 1) + 0.01 * torch.randn(32, 4, generator=g)
    qc = sinkhorn_knopp_teacher(collapsed, teacher_temp=0.07, iterations=100)
    assert torch.allclose(qc.sum(0) / 32, torch.full((4,), 0.25), atol=1e-3)


def test_swav_loss_with_softmax_targets_is_dino_loss():
    # DINO with Sinkhorn targets goes through swav_loss: the same (teacher crop, other crop) average
    g = torch.Generator().manual_seed(1)
    student = [torch.randn(3, 6, generator=g) for _ in range(4)]
    teacher = [torch.randn(3, 6, generator=g) for _ in range(2)]
    center = 0.1 * torch.randn(1, 6, generator=g)
    probs = [torch.softmax((t - center) / 0.05, -1) for t in teacher]
    assert swav_loss(student, probs, 0.1).item() == pytest.approx(dino_loss(student, teacher, center, 0.1, 0.05).item(),
                                                                  rel=1e-6)


# ---------------------------------------------------------------------------------------------
# iBOT masks


def test_ibot_masks_spread_ratios_over_half_the_samples():
    torch.manual_seed(0)
    batch, grid, n = 16, (8, 8), 64
    masked_rows = set()
    for _ in range(5):
        mask = ibot_masks(batch, grid, (0.1, 0.5), 0.5)
        counts = mask.sum(1)
        assert mask.shape == (16, 64) and mask.dtype == torch.bool
        assert int((counts > 0).sum()) == 8  # exactly half the global-crop samples
        c = counts[counts > 0].sort().values
        assert int(c.min()) >= int(0.1 * n) and int(c.max()) <= int(0.5 * n)
        # one count per linspace bin: the i-th smallest lies in [int(N e_i), int(N e_{i+1})]
        edges = torch.linspace(0.1, 0.5, 9)
        assert all(int(n * edges[i]) <= int(c[i]) <= int(n * edges[i + 1]) for i in range(8))
        masked_rows.add(tuple(torch.nonzero(counts).flatten().tolist()))
    assert len(masked_rows) > 1  # which samples are masked is random
    assert not ibot_masks(1, grid, (0.1, 0.5), 0.5).any()  # int(1 * 0.5) = 0 samples


# ---------------------------------------------------------------------------------------------
# the method


def test_forward_uses_mask_tokens_teacher_and_all_losses():
    method = _build("method.centering=centering")
    shapes = []
    method.backbone.register_forward_hook(lambda *a: shapes.append("forward"))  # tokens() is used, not forward
    out = method({"images": _images()})
    m = out.metrics
    assert {"dinov2/dino", "dinov2/ibot", "dinov2/koleo", "dinov2/teacher_temp"} <= set(m)
    assert 0.0 < float(m["monitor/uniformity"]) < 1.0
    expect = m["dinov2/dino"] + 0.1 * 2 * m["dinov2/koleo"] + m["dinov2/ibot"]  # koleo summed over 2 crops
    assert out.loss.item() == pytest.approx(float(expect), rel=1e-5)
    assert out.embeddings.shape == (8, 32) and not shapes
    assert method.center.abs().sum() == 0 and method.ibot_center.abs().sum() == 0  # not in forward ...
    out.loss.backward()
    method.on_step_end(_progress(1))
    assert method.center.abs().sum() > 0 and method.ibot_center.abs().sum() > 0  # ... after the kept step
    assert method.backbone.mask_token.grad.abs().sum() > 0  # the student saw mask tokens
    teacher = [*method.teacher_backbone.parameters(), *method.teacher_head.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    sk = _build()  # default: Sinkhorn-Knopp, no centers
    sk({"images": _images()})
    assert sk.center.abs().sum() == 0 and sk.ibot_center.abs().sum() == 0


def test_separate_ibot_head_and_switches():
    method = _build("method.ibot_separate_head=true")
    assert method.ibot_head.last_layer.weight.shape == (24, 16)
    out = method({"images": _images()})
    out.loss.backward()
    assert method.ibot_head.mlp[0].weight.grad.abs().sum() > 0
    assert method.teacher_ibot_head is not None
    only_dino = _build("method.ibot_loss_weight=0", "method.koleo_loss_weight=0")
    m = only_dino({"images": _images()}).metrics
    assert "dinov2/ibot" not in m and "dinov2/koleo" not in m
    with pytest.raises(ConfigError, match="centering"):
        load_config(None, [*TINY, "method.centering=mean"])
    with pytest.raises(ConfigError, match="ViT"):
        _build("backbone.name=resnet18")


def test_teacher_temperature_and_momentum_schedules():
    method = _build("method.warmup_teacher_temp_epochs=2")
    assert method.teacher_temp() == pytest.approx(0.04)  # iteration 0, before any step
    temps = []
    for step in range(1, 10):  # 4 steps per epoch: warm-up over 8 iterations, linspace(0.04, 0.07, 8)
        method.clock.tick(_progress(step))
        temps.append(method.teacher_temp())
    assert temps == pytest.approx([0.04 + 0.03 * i / 7 for i in range(1, 8)] + [0.07, 0.07])
    assert method.momentum(_progress(1, total=10)) == pytest.approx(0.992)
    assert method.momentum(_progress(6, total=10)) == pytest.approx(0.996)


def test_uniform_drop_path_student_only_and_layer_decay():
    method = _build("backbone.depth=3")
    rates = [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in method.backbone.model.blocks]
    assert rates == [pytest.approx((0.1, 0.1))] * 3  # timm alone would give 0, 0.05, 0.1
    assert all(m.drop_prob == 0 for m in method.teacher_backbone.modules() if hasattr(m, "drop_prob"))
    groups = param_groups(method, exclude_bias_norm=True, layer_decay=0.9)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(method.backbone.model.blocks[0].attn.qkv.weight)] == pytest.approx(0.9 ** 3)
    assert scale[id(method.backbone.mask_token)] == pytest.approx(0.9 ** 4)
    for p in method.backbone.model.patch_embed.parameters():  # official patch_embed_lr_mult on top
        assert scale[id(p)] == pytest.approx(0.2 * 0.9 ** 4)
    assert scale[id(method.head.mlp[0].weight)] == 1.0
    assert all(id(p) not in scale for p in method.teacher_backbone.parameters())


def test_last_layer_frozen_in_first_epoch():
    method = _build()
    last = list(method.head.last_layer.parameters())
    before = [p.detach().clone() for p in last]
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    method({"images": _images()}).loss.backward()
    opt.step()
    method.on_step_end(_progress(1, steps_per_epoch=2))
    assert all(torch.equal(a, b) for a, b in zip(before, last))


def test_encoder_exports_to_timm():
    import timm

    method = _build()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                              embed_dim=32, depth=2, num_heads=2)
    model.load_state_dict(method.backbone.export_state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    method.eval()
    model.eval()
    assert torch.allclose(model(x), method.backbone(x), atol=1e-5)


def test_recipes_carry_the_official_numbers():
    c = load_config(CONFIGS / "dinov2" / "imagenet.yaml")
    m, o, a = c.method, c.optim, c.augment
    assert (c.backbone.name, c.backbone.patch_size, c.backbone.drop_path, c.data.batch_size) == (
        "vit_large", 16, 0.3, 2048)
    assert (m.out_dim, m.bottleneck_dim, m.ibot_separate_head, m.koleo_loss_weight, m.mask_probability,
            tuple(m.mask_ratio_min_max), m.momentum_teacher, m.warmup_teacher_temp, m.teacher_temp) == (
        65536, 256, False, 0.1, 0.5, (0.1, 0.5), 0.992, 0.04, 0.07)
    assert o.scaled_lr(2048) == pytest.approx(4e-3 * math.sqrt(2)) and o.layer_decay == 0.9
    assert (o.weight_decay, o.weight_decay_end, o.grad_clip, o.min_lr) == (0.04, 0.4, 3.0, 1e-6)
    assert (a.views[0].size, a.views[0].crop_scale, a.local.size, a.local.crop_scale, a.n_local) == (
        224, (0.32, 1.0), 96, (0.05, 0.32), 8)
    assert a.views[0].blur_kernel_size == a.local.blur_kernel_size == 9
    cifar = load_config(CONFIGS / "dinov2" / "cifar10.yaml")
    assert (cifar.backbone.name, cifar.backbone.patch_size, cifar.augment.views[0].size, cifar.augment.n_local,
            cifar.augment.local.size) == ("vit_tiny", 4, 32, 4, 16)


# ---------------------------------------------------------------------------------------------
# training end to end


def test_cli_trains_a_few_steps_from_the_recipe(tmp_path):
    overrides = [o for o in TINY if not o.startswith(("optim.", "backbone.drop_path"))]
    rc = main(["pretrain", "--config", str(CONFIGS / "dinov2" / "cifar10.yaml"), *overrides, "data.source=embedded",
               f"trainer.out_dir={tmp_path}", "trainer.run_name=r", "trainer.max_steps=2", "trainer.log_every=1"])
    assert rc == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["finished"] and summary["position"]["step"] == 2 and summary["method"] == "dinov2"
    assert math.isfinite(summary["final_loss"])
    log = (tmp_path / "r" / "metrics.csv").read_text()
    assert "dinov2/ibot" in log and "dinov2/koleo" in log


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_resume_equals_uninterrupted(tmp_path, centering):
    # 1 step per epoch, 3 steps, stop at 2: the teacher, both centers and the clock (teacher
    # temperature warm-up, last-layer freezing) must come back from the checkpoint
    cfg = load_config(None, [*TINY, "data.limit=8", "trainer.epochs=3", "method.warmup_teacher_temp_epochs=2",
                             f"method.centering={centering}"])
    ck, a = resume_matches_straight(cfg, tmp_path, until_step=2)
    assert ck["model"]["clock.state"].tolist() == [2, 1]
    assert "teacher_backbone.mask_token" in a and "ibot_center" in a
    assert (a["center"].abs().sum() > 0) == (centering == "centering")
    assert not torch.equal(a["teacher_head.mlp.0.weight"], a["head.mlp.0.weight"])  # the teacher lags


def test_methods_lists_dinov2(capsys):
    assert main(["methods"]) == 0
    assert "dinov2" in capsys.readouterr().out
