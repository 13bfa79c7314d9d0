"""data2vec 2.0: the loss and target construction against hand-computed cases, the clone batch
(targets repeated, masks differing), the conv decoder, the EMA schedule, recipes, CLI training
and exact resume."""

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, resume_matches_straight, train_recipe_two_steps

import selfsup.methods.data2vec2 as d2v_module
from selfsup.config import load_config
from selfsup.core.build import build_method
from selfsup.core.method import Progress
from selfsup.errors import ConfigError
from selfsup.losses import data2vec_loss, data2vec_targets
from selfsup.methods.data2vec2 import ConvDecoder2d
from selfsup.nn.teacher import annealed_decay

CONFIGS = Path(__file__).parents[1] / "configs"
# ViT 32 wide, 2 blocks, 4-px patches on 16-px crops (4x4 grid, 3 of 16 patches visible), 3 clones
D2V_TINY = [*(o for o in TINY if not o.startswith(("method.", "augment.views.1", "optim."))),
            "method.name=data2vec2", "backbone.name=vit_tiny", "backbone.img_size=16", "backbone.patch_size=4",
            "backbone.depth=2", "backbone.embed_dim=32", "backbone.num_heads=2", "method.clone_batch=3",
            "method.decoder_dim=32", "method.decoder_layers=2", "method.decoder_groups=4",
            "method.average_top_k_layers=2", "method.mask_length=2", "optim.name=adamw", "optim.lr=1e-3",
            "optim.warmup_epochs=0", "data.limit=16", "data.batch_size=8"]


def _method(*extra):
    return build_method(load_config(None, [*D2V_TINY, *extra]))


# ---------------------------------------------------------------------------------------------
# loss and targets against hand computation


def test_loss_is_mean_over_tokens_of_squared_norm_over_sqrt_dim():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.zeros(2, 2)
    # token 1: 1 + 4 = 5, token 2: 0; (5 + 0) / sqrt(2) / 2 tokens = 1.767767
    assert data2vec_loss(pred, target).item() == pytest.approx(1.767767, abs=1e-6)
    assert data2vec_loss(pred, target, scale=1.0).item() == pytest.approx(2.5, abs=1e-6)
    # smooth L1, beta 1: 0.5 * 1^2 + (2 - 0.5) = 2.0 -> 2 / sqrt(2) / 2 = 0.707107
    assert data2vec_loss(pred, target, beta=1.0).item() == pytest.approx(0.707107, abs=1e-6)
    # any leading shape: (..., D) rows are tokens; sqrt(D) x the element-wise MSE
    p, y = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    assert data2vec_loss(p, y).item() == pytest.approx(4.0 * torch.nn.functional.mse_loss(p, y).item(), rel=1e-5)
    p.requires_grad_(True)
    y.requires_grad_(True)
    data2vec_loss(p, y).backward()
    assert y.grad is None and p.grad is not None  # the target side is detached


def test_targets_instance_norm_each_layer_then_average_then_layer_norm():
    # 1 sample, 3 tokens, 2 channels, 2 layers. Instance norm: per channel over the 3 tokens,
    # biased variance (eps 1e-5 negligible at 1e-4):
    #   a1 ch0 (1,2,3):  mean 2, var 2/3 -> (-1.224745, 0, 1.224745)
    #   a1 ch1 (0,0,3):  mean 1, var 2   -> (-0.707107, -0.707107, 1.414214)
    #   a2 ch0 (0,0,6):  mean 2, var 8   -> (-0.707107, -0.707107, 1.414214)
    #   a2 ch1 (4,0,2):  mean 2, var 8/3 -> (1.224745, -1.224745, 0)
    # average of the two layers per token:
    #   t0 (-0.965926, 0.258819), t1 (-0.353553, -0.965926), t2 (1.319479, 0.707107)
    a1 = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [3.0, 3.0]]])
    a2 = torch.tensor([[[0.0, 4.0], [0.0, 0.0], [6.0, 2.0]]])
    avg = data2vec_targets([a1, a2], top_k=2, layer_norm_targets=False)
    expected = torch.tensor([[[-0.965926, 0.258819], [-0.353553, -0.965926], [1.319479, 0.707107]]])
    assert torch.allclose(avg, expected, atol=1e-4)
    # layer norm over 2 channels maps (a, b) to sign(a - b) * (1, -1)
    y = data2vec_targets([a1, a2], top_k=2)
    assert torch.allclose(y, torch.tensor([[[-1.0, 1.0], [1.0, -1.0], [1.0, -1.0]]]), atol=1e-3)
    # top_k=1: only the last layer (a2's instance norm); top_k beyond the depth: all layers
    last = data2vec_targets([a1, a2], top_k=1, layer_norm_targets=False)
    assert torch.allclose(last, torch.tensor([[[-0.707107, 1.224745], [-0.707107, -1.224745], [1.414214, 0.0]]]),
                          atol=1e-4)
    assert torch.allclose(data2vec_targets([a1, a2], top_k=5), y)
    # each sample is normalized on its own: scaling or shifting one sample changes nothing
    b = torch.cat([torch.cat([a1, a2]), 10 * torch.cat([a1, a2]) + 3], dim=0)  # (4, 3, 2): 2 layers x 2 samples
    yy = data2vec_targets([b[[0, 2]], b[[1, 3]]], top_k=2)
    assert torch.allclose(yy[0], yy[1], atol=1e-4) and yy.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# clone batch, decoder input, CLS target


def test_clones_share_repeated_targets_and_get_different_masks(monkeypatch):
    m = _method()
    x = torch.randn(2, 3, 16, 16)
    monkeypatch.setattr(m, "make_views", lambda images: [x])
    seen = {}
    masks_fn = m.masks

    def record_masks(batch, grid, device):
        seen["mask"] = masks_fn(batch, grid, device)
        return seen["mask"]

    calls = []

    def record_loss(pred, target, **kw):
        calls.append((pred.detach(), target.detach()))
        return data2vec_loss(pred, target, **kw)

    monkeypatch.setattr(m, "masks", record_masks)
    monkeypatch.setattr(d2v_module, "data2vec_loss", record_loss)
    out = m({"images": torch.zeros(2, 3, 16, 16, dtype=torch.uint8)})
    assert math.isfinite(out.loss.item()) and out.embeddings.shape == (2, 32)
    mask = seen["mask"]
    assert mask.shape == (6, 16) and (mask.sum(1) == 13).all()  # 3 clones x 2 images, 13 of 16 masked
    for i in range(2):  # the clones of one image are masked differently
        rows = mask[3 * i: 3 * i + 3]
        assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[1], rows[2])
    y = m.targets(x)  # (2, 16, 32): one teacher pass per image
    (pred_m, y_m), (cls_pred, cls_t) = calls
    assert pred_m.shape == (6 * 13, 32)
    # masked targets of row r = clone (r % 3) of image r // 3 are that image's targets at its masked patches
    expected = torch.cat([y[r // 3][mask[r]] for r in range(6)])
    assert torch.allclose(y_m, expected)
    # the CLS target: each image's mean target over tokens, repeated for its clones
    assert torch.allclose(cls_t, y.mean(dim=1).repeat_interleave(3, dim=0))
    assert cls_pred.shape == (6, 32)


def test_targets_are_the_teachers_ffn_outputs():
    m = _method()
    x = torch.randn(2, 3, 16, 16)
    ffn = []
    hooks = [blk.mlp.register_forward_hook(lambda _m, _i, o: ffn.append(o)) for blk in m.teacher.model.blocks]
    m.teacher.tokens(x)
    for h in hooks:
        h.remove()
    expected = data2vec_targets([t[:, 1:] for t in ffn], 2)
    assert torch.allclose(m.targets(x), expected)
    # end_of_block_targets: the blocks' outputs (residual stream) instead
    m2 = _method("method.end_of_block_targets=true")
    _, layers = m2.teacher.tokens(x, return_layers=True)
    assert torch.allclose(m2.targets(x), data2vec_targets([t[:, 1:] for t in layers], 2))


def test_decoder_shape_locality_and_residual():
    torch.manual_seed(0)
    dec = ConvDecoder2d(in_dim=32, dim=48, layers=3, kernel=3, groups=4)
    x = torch.randn(2, 16, 32)
    assert dec(x, (4, 4)).shape == (2, 16, 32)
    assert ConvDecoder2d(32, 32, 2, kernel=4, groups=4)(x, (4, 4)).shape == (2, 16, 32)  # even kernel: same size
    assert ConvDecoder2d(32, 32, 2, kernel=3, groups=8)(torch.randn(3, 12, 32), (3, 4)).shape == (3, 12, 32)
    # one kernel-3 layer: changing the token at (0, 0) moves only its 3x3 neighbourhood
    one = ConvDecoder2d(32, 32, 1, kernel=3, groups=4)
    x2 = x.clone()
    x2[:, 0] += 1.0
    changed = (one(x2, (4, 4)) - one(x, (4, 4))).abs().amax(dim=(0, 2)).view(4, 4) > 1e-6
    assert changed[:2, :2].all() and changed.sum() == 4
    # residual: with equal widths each layer adds its input, so without it the output differs
    no_res = ConvDecoder2d(32, 32, 1, kernel=3, groups=4, residual=False)
    no_res.load_state_dict(one.state_dict())
    h = one.convs[0](x.transpose(1, 2).reshape(2, 32, 4, 4))
    h = torch.nn.functional.gelu(torch.nn.functional.layer_norm(h.permute(0, 2, 3, 1), (32,))).permute(0, 3, 1, 2)
    assert torch.allclose(no_res(x, (4, 4)), one.proj(h.flatten(2).transpose(1, 2)), atol=1e-6)
    assert torch.allclose(one(x, (4, 4)) - no_res(x, (4, 4)),
                          x @ one.proj.weight.T, atol=1e-5)  # proj(h + x) - proj(h) = W x


# ---------------------------------------------------------------------------------------------
# EMA


def test_ema_schedule_is_linear_to_the_end_step_then_constant():
    assert annealed_decay(0, 0.9998, 0.99999, 100) == pytest.approx(0.9998)
    assert annealed_decay(50, 0.9998, 0.99999, 100) == pytest.approx(0.999895)
    assert annealed_decay(100, 0.9998, 0.99999, 100) == pytest.approx(0.99999)
    assert annealed_decay(1000, 0.9998, 0.99999, 100) == pytest.approx(0.99999)
    assert annealed_decay(0, 0.9998, 0.99999, 0) == pytest.approx(0.99999)
    m = _method("method.ema_decay=0.9", "method.ema_end_decay=0.99", "method.ema_anneal_end_epochs=2")
    prog = Progress(step=5, total_steps=100, epoch=0, epochs=10, steps_per_epoch=10)  # end step 20
    assert m.momentum(prog) == pytest.approx(0.9 + 0.09 * 5 / 20)
    # the update after a step: teacher <- tau teacher + (1 - tau) student, CLS token included
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    t0 = m.teacher.model.cls_token.clone()
    s = m.backbone.model.cls_token.clone()
    m.on_step_end(prog)
    tau = 0.9 + 0.09 * 5 / 20
    assert torch.allclose(m.teacher.model.cls_token, tau * t0 + (1 - tau) * s, atol=1e-6)
    assert float(m.ema_decay_now) == pytest.approx(tau)
    assert not m.backbone.mask_token.requires_grad  # never used: kept out of the optimizer


def test_encoder_exports_to_timm_with_mean_pooling():
    import timm

    m = _method("backbone.pool=mean")
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2,
                              num_classes=0, global_pool="avg", fc_norm=False)
    state = m.backbone.export_state_dict()
    assert not any("mask_token" in k for k in state)
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(model.eval()(x), m.eval().encode(x), atol=1e-5)


def test_config_validation_and_backbone_check():
    with pytest.raises(ConfigError, match="clone_batch"):
        load_config(None, ["method.name=data2vec2", "method.clone_batch=0"])
    with pytest.raises(ConfigError, match="decoder_groups"):
        load_config(None, ["method.name=data2vec2", "method.decoder_dim=30", "method.decoder_groups=16"])
    with pytest.raises(ConfigError, match="ViT"):
        build_method(load_config(None, ["method.name=data2vec2", "backbone.name=resnet18"]))


# ---------------------------------------------------------------------------------------------
# recipes and training end to end


def test_recipes_follow_the_official_configs():
    net = load_config(CONFIGS / "data2vec2" / "imagenet.yaml")
    m, o = net.method, net.optim
    assert (m.clone_batch, m.mask_ratio, m.mask_length, m.mask_prob_adjust, m.average_top_k_layers) == (
        16, 0.8, 3, 0.07, 10)
    assert (m.decoder_dim, m.decoder_layers, m.decoder_kernel, m.decoder_groups, m.cls_loss) == (768, 6, 3, 16, 0.01)
    assert (m.ema_decay, m.ema_end_decay, m.ema_anneal_end_epochs) == (0.9998, 0.99999, 20)
    assert (o.name, o.scaled_lr(net.data.batch_size), o.betas, o.weight_decay, o.warmup_epochs, o.grad_clip) == (
        "adamw", 1e-3, (0.9, 0.95), 0.05, 10, 4.0)
    assert (net.backbone.name, net.backbone.patch_size, net.backbone.pool, net.trainer.epochs) == (
        "vit_base", 16, "mean", 75)
    cifar = load_config(CONFIGS / "data2vec2" / "cifar10.yaml")
    assert (cifar.backbone.name, cifar.backbone.patch_size, cifar.backbone.pool, cifar.method.clone_batch) == (
        "vit_tiny", 4, "mean", 8)


def test_cli_trains_a_few_steps_from_the_recipe(tmp_path):
    overrides = [o for o in D2V_TINY if not o.startswith(("method.name", "optim.", "augment."))]
    train_recipe_two_steps("data2vec2", tmp_path, [*overrides, "augment.views.0.size=16"])
    assert "data2vec2/target_var" in (tmp_path / "r" / "metrics.csv").read_text()


def test_resume_equals_uninterrupted(tmp_path):
    cfg = load_config(None, [*D2V_TINY, "trainer.epochs=2", "method.ema_decay=0.9", "method.ema_end_decay=0.99",
                             "method.ema_anneal_end_epochs=1"])
    ck, a = resume_matches_straight(cfg, tmp_path, until_step=3)
    assert any(k.startswith("teacher.") for k in ck["model"]) and "ema_decay_now" in ck["model"]
    assert not torch.equal(a["teacher.model.cls_token"], a["backbone.model.cls_token"])  # the teacher lags
