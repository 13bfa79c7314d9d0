"""I-JEPA: the smooth-L1 loss against hand computation, layer-normed targets, the predictor's shapes
and per-block independence, the linear EMA schedule, recipes and masks on the CIFAR grid, CLI
training and exact resume."""

from pathlib import Path

import pytest
import torch
from conftest import TINY, resume_matches_straight, train_recipe_two_steps

from selfsup.config import load_config
from selfsup.core.build import build_method
from selfsup.core.method import Progress
from selfsup.errors import ConfigError
from selfsup.losses import ijepa_loss
from selfsup.nn.positions import sincos_2d_pos_embed
from selfsup.nn.predictors import JEPAPredictor
from selfsup.nn.teacher import linear_momentum
from selfsup.pretext.masking import multiblock_masking

CONFIGS = Path(__file__).parents[1] / "configs"
# a 1-block, 32-wide ViT with 4-px patches on 32-px crops (8x8 grid, as the CIFAR recipe), a
# 1-block 16-wide predictor
VIEW = "augment.views=[{size: 32, crop_scale: [0.3, 1.0], hflip_p: 0.0, jitter_p: 0.0, grayscale_p: 0.0}]"
NET = ["backbone.name=vit_tiny", "backbone.patch_size=4", "backbone.depth=1", "backbone.embed_dim=32",
       "backbone.num_heads=2", "backbone.pool=mean", "method.pred_dim=16", "method.pred_depth=1"]
IJEPA_TINY = [*(o for o in TINY if not o.startswith(("method.", "augment.views", "optim."))), VIEW, *NET,
              "method.name=ijepa", "optim.name=adamw", "optim.lr=1e-3", "optim.lr_scaling=none",
              "optim.warmup_epochs=0", "trainer.channels_last=false"]


def _images(n=8, side=32):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def _method(*extra):
    return build_method(load_config(None, [*IJEPA_TINY, *extra]))


# ---------------------------------------------------------------------------------------------
# loss


def test_ijepa_loss_matches_hand_computation():
    # differences u = p - h: 0.5, 3.0, -2.0, -0.8; smooth-L1 (beta 1): 0.5 u^2 if |u| < 1 else |u| - 0.5
    #   0.125 + 2.5 + 1.5 + 0.32 = 4.445, mean over the 4 elements = 1.11125
    p = torch.tensor([[[0.5, 3.0]], [[-2.0, 0.2]]])  # (blocks x batch = 2, tokens 1, features 2)
    h = torch.tensor([[[0.0, 0.0]], [[0.0, 1.0]]])
    assert ijepa_loss(p, h).item() == pytest.approx(1.11125, rel=1e-6)
    # beta 2: 0.5 u^2 / 2 if |u| < 2 else |u| - 1: 0.0625 + 2.0 + 1.0 + 0.16 = 3.2225 -> 0.805625
    assert ijepa_loss(p, h, beta=2.0).item() == pytest.approx(0.805625, rel=1e-6)
    # one tensor per block gives the same value (concatenated along the batch, as the official code)
    assert ijepa_loss(list(p.split(1)), list(h.split(1))).item() == pytest.approx(1.11125, rel=1e-6)
    # equal-size blocks: the mean over elements is the mean of the per-block losses
    # block 0: (0.125 + 2.5) / 2 = 1.3125, block 1: (1.5 + 0.32) / 2 = 0.91
    assert ijepa_loss(p[:1], h[:1]).item() == pytest.approx(1.3125)
    assert ijepa_loss(p[1:], h[1:]).item() == pytest.approx(0.91)


def test_ijepa_loss_gradient_reaches_predictions_only():
    p = torch.tensor([[[0.5, 3.0, -0.2]]], requires_grad=True)
    h = torch.tensor([[[0.0, 0.0, 0.0]]], requires_grad=True)
    ijepa_loss(p, h).backward()
    # d/du: u inside (-1, 1), sign(u) outside; divided by the 3 elements
    assert torch.allclose(p.grad, torch.tensor([[[0.5, 1.0, -0.2]]]) / 3)
    assert h.grad is None
    with pytest.raises(ValueError, match="differ"):
        ijepa_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))


# ---------------------------------------------------------------------------------------------
# targets, context, predictor


def test_targets_are_the_layer_normed_full_image_tokens_at_each_block():
    method = _method()
    x = method.preprocess({"images": _images()})
    context, blocks = multiblock_masking(8, (8, 8), generator=torch.Generator().manual_seed(0))
    h = method.targets(x, blocks)
    kt = blocks[0].shape[1]
    assert h.shape == (4 * 8, kt, 32) and not h.requires_grad
    # layer norm without affine: every token has mean 0 and (biased) variance 1 over its features
    assert torch.allclose(h.mean(-1), torch.zeros(32, kt), atol=1e-5)
    assert torch.allclose(h.var(-1, unbiased=False), torch.ones(32, kt), atol=1e-3)
    # by hand: the target encoder's patch tokens (CLS dropped), standardized, at block m of sample b
    with torch.no_grad():
        full = method.target_backbone.tokens(x)[:, 1:]
    for m, b, j in [(0, 0, 0), (2, 5, kt - 1), (3, 7, kt // 2)]:
        tok = full[b, blocks[m][b, j]]
        expect = (tok - tok.mean()) / torch.sqrt(tok.var(unbiased=False) + 1e-5)
        assert torch.allclose(h[m * 8 + b, j], expect, atol=1e-5)


def test_predictor_output_shapes_and_blocks_are_predicted_independently():
    torch.manual_seed(0)
    pred = JEPAPredictor(sincos_2d_pos_embed(16, 8, 8), enc_dim=32, pred_dim=16, depth=2, num_heads=2)
    assert not any(p is pred.pos_embed for p in pred.parameters())  # fixed sin-cos, not trained
    b, kc = 3, 20
    ctx = torch.randn(b, kc, 32)
    ctx_idx = torch.randperm(64)[:kc].sort().values.expand(b, kc)
    blocks = [torch.randint(0, 64, (b, 6)) for _ in range(4)]
    for m in (1, 2, 4):
        assert pred(ctx, ctx_idx, blocks[:m]).shape == (m * b, 6, 32)
    assert pred(ctx, ctx_idx, [t[:, :3] for t in blocks]).shape == (4 * b, 3, 32)
    # each block is its own sequence (the context repeated per block): block 0's prediction does
    # not depend on the other blocks, and it does depend on where block 0 is
    both = pred(ctx, ctx_idx, blocks[:2])
    assert torch.allclose(both[:b], pred(ctx, ctx_idx, blocks[:1]), atol=1e-6)
    assert not torch.allclose(both[b:], both[:b], atol=1e-4)


def test_forward_feeds_the_predictor_the_context_tokens_without_cls():
    method = _method()
    seen = {}
    method.predictor.register_forward_hook(lambda mod, args, out: seen.update(ctx=args[0], idx=args[1], out=out))
    out = method({"images": _images()})
    kc, kt = int(out.metrics["ijepa/context_patches"]), int(out.metrics["ijepa/target_patches"])
    assert seen["ctx"].shape == (8, kc, 32) and seen["idx"].shape == (8, kc)  # no CLS row
    assert seen["out"].shape == (4 * 8, kt, 32)
    assert kc > 10 and kt >= 1  # min_keep 10 on the 8x8 grid
    assert out.embeddings.shape == (8, 32)  # mean of the context tokens
    assert torch.allclose(out.embeddings, seen["ctx"].mean(1).detach(), atol=1e-6)
    out.loss.backward()
    assert all(p.grad is None for p in method.target_backbone.parameters())
    assert method.predictor.mask_token.grad.abs().sum() > 0 and method.backbone.model.cls_token.grad is not None


def test_encode_mean_pools_the_context_or_the_target_encoder():
    method = _method()
    x = method.preprocess({"images": _images(4)})
    with torch.no_grad():
        method.target_backbone.model.norm.bias.add_(1.0)  # make the two encoders differ
        assert torch.allclose(method.encode(x), method.backbone.tokens(x)[:, 1:].mean(1), atol=1e-6)
        method.cfg.eval_encoder = "target"
        assert torch.allclose(method.encode(x), method.target_backbone.tokens(x)[:, 1:].mean(1), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# EMA


def test_ema_momentum_is_linear_from_0996_to_1():
    assert linear_momentum(0, 100) == pytest.approx(0.996)
    assert linear_momentum(50, 100) == pytest.approx(0.998)
    assert linear_momentum(100, 100) == pytest.approx(1.0)
    assert linear_momentum(150, 100) == 1.0  # held at the end
    method = _method()

    def prog(step, total=100):
        return Progress(step=step, total_steps=total, epoch=0, epochs=1, steps_per_epoch=total)

    # the update after optimizer step k uses the official generator's value k - 1
    assert method.momentum(prog(1)) == pytest.approx(0.996)
    assert method.momentum(prog(51)) == pytest.approx(0.998)
    assert method.momentum(prog(100)) == pytest.approx(0.996 + 0.004 * 99 / 100)
    method.cfg.ipe_scale = 1.25  # schedule stretched over 125 steps
    assert method.momentum(prog(51)) == pytest.approx(0.996 + 0.004 * 50 / 125)
    method.cfg.ipe_scale = 1.0
    # the update itself: target <- m target + (1 - m) online
    with torch.no_grad():
        method.backbone.model.norm.weight.fill_(3.0)
    method.on_step_end(prog(51))
    assert torch.allclose(method.target_backbone.model.norm.weight, torch.full((32,), 0.998 + 0.002 * 3.0))


# ---------------------------------------------------------------------------------------------
# recipes and config


def test_recipes_carry_the_official_numbers():
    cfg = load_config(CONFIGS / "ijepa" / "imagenet.yaml")
    o, m, b, v = cfg.optim, cfg.method, cfg.backbone, cfg.augment.views
    assert (o.name, o.scaled_lr(cfg.data.batch_size), o.min_lr, o.weight_decay, o.weight_decay_end,
            o.warmup_epochs, o.grad_clip, cfg.data.batch_size, cfg.trainer.epochs) == (
        "adamw", 1e-3, 1e-6, 0.04, 0.4, 40, None, 2048, 300)
    assert (b.name, b.patch_size, b.img_size, b.pool, b.pos_embed) == ("vit_base", 16, 224, "mean", "sincos")
    assert (m.pred_dim, m.pred_depth, m.n_targets, m.target_scale, m.target_aspect, m.context_scale,
            m.context_aspect, m.min_keep, m.ema) == (384, 12, 4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0),
                                                     (1.0, 1.0), 10, (0.996, 1.0))
    assert len(v) == 1 and v[0].crop_scale == (0.3, 1.0) and v[0].size == 224
    assert v[0].hflip_p == v[0].jitter_p == v[0].grayscale_p == v[0].blur_p == v[0].solarize_p == 0.0
    c = load_config(CONFIGS / "ijepa" / "cifar10.yaml")
    assert (c.backbone.name, c.backbone.patch_size, c.backbone.pool, c.augment.views[0].size) == (
        "vit_tiny", 4, "mean", 32)
    assert c.augment.views[0].jitter_p == 0.0 and c.augment.views[0].crop_scale == (0.3, 1.0)


def test_cifar_masks_have_nonempty_targets_and_context_above_min_keep():
    m = load_config(CONFIGS / "ijepa" / "cifar10.yaml").method
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        context, targets = multiblock_masking(64, (8, 8), n_targets=m.n_targets, target_scale=m.target_scale,
                                              target_aspect=m.target_aspect, context_scale=m.context_scale,
                                              context_aspect=m.context_aspect, min_keep=m.min_keep, generator=g)
        assert len(targets) == 4 and all(t.shape == targets[0].shape for t in targets)
        assert targets[0].shape[1] in (9, 12)  # 3x3 or 4x3 on 8x8
        assert context.shape[1] > m.min_keep
        for t in targets:  # no context patch is a target patch
            assert not (context.unsqueeze(2) == t.unsqueeze(1)).any()


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="ema"):
        load_config(None, [*IJEPA_TINY, "method.ema=[0.999, 0.99]"])
    with pytest.raises(ConfigError, match="target_scale"):
        load_config(None, [*IJEPA_TINY, "method.target_scale=[0.0, 0.2]"])
    with pytest.raises(ConfigError, match="one view"):
        build_method(load_config(None, [*IJEPA_TINY, "augment.views=[{size: 32}, {size: 32}]"]))
    with pytest.raises(ConfigError, match="ViT"):
        build_method(load_config(None, [*IJEPA_TINY, "backbone.name=resnet18", "backbone.width=8"]))
    with pytest.raises(ConfigError, match="pred_dim"):
        _method("method.pred_dim=18")


# ---------------------------------------------------------------------------------------------
# training end to end


def test_cli_trains_a_few_steps_from_the_recipe(tmp_path):
    overrides = [o for o in IJEPA_TINY if not o.startswith(("method.name", "optim."))]
    train_recipe_two_steps("ijepa", tmp_path, overrides)
    assert "ijepa/target_patches" in (tmp_path / "r" / "metrics.csv").read_text()
    # the exported encoder loads strictly into timm's ViT and gives the method's mean-pooled feature
    import timm
    from safetensors.torch import load_file

    from selfsup.evaluate import load_method
    from selfsup.export import export_encoder

    export_encoder(tmp_path / "r", tmp_path / "enc.safetensors")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1, embed_dim=32,
                            num_heads=2, num_classes=0, global_pool="avg", fc_norm=False)
    vit.load_state_dict(load_file(tmp_path / "enc.safetensors"), strict=True)
    method = load_method(tmp_path / "r")[0].eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit.eval()(x), method.encode(x), atol=1e-5)


def test_export_writes_the_encoder_that_encode_reads():
    method = _method()
    assert method.export_backbone() is method.backbone and method.export_note() == ""
    target = _method("method.eval_encoder=target")
    with torch.no_grad():
        for p in target.target_backbone.parameters():
            p.add_(0.1)  # the EMA encoder now differs from the context encoder
    assert target.export_backbone() is target.target_backbone
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(target.eval().encode(x), target.target_backbone(x))
        assert not torch.allclose(target.encode(x), target.backbone(x))


def test_resume_equals_uninterrupted(tmp_path):
    cfg = load_config(None, [*IJEPA_TINY, "data.limit=16", "data.batch_size=8", "trainer.epochs=3"])
    ck, a = resume_matches_straight(cfg, tmp_path, until_step=3)
    assert any(k.startswith("target_backbone.") for k in ck["model"])  # the EMA encoder is saved
    assert not any("pos_embed" in k for k in ck["model"] if k.startswith("predictor."))  # fixed table not saved
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(a[f"target_backbone.model.{key}"], a[f"backbone.model.{key}"])  # the target lags
