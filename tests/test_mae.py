"""MAE: the loss against hand-computed patches, masked-only properties, the decoder's unshuffle,
the encoder seeing only visible patches, reconstructions for the report, recipes, CLI training,
exact resume and the report's reconstruction picture."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import resume_matches_straight

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.core.build import build_method
from selfsup.errors import ConfigError
from selfsup.losses import mae_loss
from selfsup.methods.mae import MAEDecoder
from selfsup.pretext.masking import random_masking

CONFIGS = Path(__file__).parents[1] / "configs"
RECIPE = CONFIGS / "mae" / "cifar10.yaml"
# 16-px crops, 4-px patches (4x4 grid, 4 visible), a 1-block 32-wide encoder and decoder
TINY = ["data.source=embedded", "data.limit=32", "data.batch_size=8", "data.eval_batch_size=256",
        "augment.views.0.size=16", "backbone.img_size=16", "backbone.depth=1", "backbone.embed_dim=32",
        "backbone.num_heads=2",
        "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2",
        "trainer.progress=false", "trainer.precision=32", "trainer.device=cpu", "optim.warmup_epochs=0",
        "optim.lr=1e-3", "eval.final_knn=false"]


def _method(*extra):
    return build_method(load_config(RECIPE, [*TINY, *extra]))


def _images(n=4, side=16, seed=1):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# the loss


def test_mae_loss_hand_computed_two_patches():
    # patch 0 = [1, 2, 3, 4]: mean 2.5, unbiased var ((1.5² + 0.5²) * 2) / 3 = 5/3, so its
    # normalized target is [-1.5, -0.5, 0.5, 1.5] / sqrt(5/3 + 1e-6); predicting 0 costs
    # (2.25 + 0.25 + 0.25 + 2.25) / 4 / (5/3 + 1e-6) = 1.25 / 1.666667667 = 0.74999955.
    # patch 1 = [2, 2, 2, 2]: var 0, normalized target 0; predicting 1 costs 1.
    # raw pixels: patch 0 costs (1 + 4 + 9 + 16) / 4 = 7.5, patch 1 costs (1 - 2)² = 1.
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]]])
    pred = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])
    both = torch.tensor([[True, True]])
    first = torch.tensor([[True, False]])
    assert mae_loss(pred, target, both).item() == pytest.approx((0.74999955 + 1.0) / 2, abs=1e-6)
    assert mae_loss(pred, target, first).item() == pytest.approx(0.74999955, abs=1e-6)
    assert mae_loss(pred, target, both, norm_pix_loss=False).item() == pytest.approx((7.5 + 1.0) / 2)
    assert mae_loss(pred, target, first, norm_pix_loss=False).item() == pytest.approx(7.5)
    # a perfect normalized prediction costs nothing
    perfect = torch.tensor([[[-1.5, -0.5, 0.5, 1.5], [0.0] * 4]]) / math.sqrt(5 / 3 + 1e-6)
    assert mae_loss(perfect, target, both).item() == pytest.approx(0.0, abs=1e-10)


def test_mae_loss_averages_over_masked_patches_of_the_whole_batch():
    # image 0: one masked patch costing 1; image 1: two masked patches costing 4 each.
    # official: sum / number of masked patches = (1 + 4 + 4) / 3 = 3 (not the mean of image means, 2.5)
    target = torch.zeros(2, 3, 2)
    pred = torch.tensor([[[1.0, 1.0], [9.0, 9.0], [9.0, 9.0]], [[2.0, 2.0], [2.0, 2.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, False, False], [True, True, False]])
    assert mae_loss(pred, target, mask, norm_pix_loss=False).item() == pytest.approx(3.0)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_ignores_visible_patches(norm_pix):
    g = torch.Generator().manual_seed(0)
    target, pred = torch.randn(3, 8, 12, generator=g), torch.randn(3, 8, 12, generator=g)
    mask = random_masking(3, 8, 0.5, generator=g).mask
    base = mae_loss(pred, target, mask, norm_pix_loss=norm_pix)
    changed = torch.where(mask.unsqueeze(-1), pred, pred + 10 * torch.randn(3, 8, 12, generator=g))
    assert torch.equal(mae_loss(changed, target, mask, norm_pix_loss=norm_pix), base)
    p = pred.clone().requires_grad_()
    mae_loss(p, target, mask, norm_pix_loss=norm_pix).backward()
    assert (p.grad[~mask] == 0).all() and (p.grad[mask].abs().sum(-1) > 0).all()
    with pytest.raises(ValueError, match="must be"):
        mae_loss(pred, target[:, :4], mask)


# ---------------------------------------------------------------------------------------------
# decoder and encoder


def test_decoder_unshuffle_puts_tokens_back_in_image_order():
    torch.manual_seed(0)
    grid, n, dim = (2, 3), 6, 8
    dec = MAEDecoder(in_dim=5, patch_dim=4, grid=grid, dim=dim, depth=1, num_heads=2)
    seen = {}
    dec.blocks[0].register_forward_hook(lambda m, args, out: seen.__setitem__("x", args[0]))
    masks = random_masking(2, n, 0.5, generator=torch.Generator().manual_seed(3))
    latent = torch.randn(2, 1 + masks.keep.shape[1], 5)
    dec(latent, masks.ids_restore, grid)
    # explicit construction, sample by sample: visible token j goes to patch keep[b, j]
    emb = dec.embed(latent)
    pos = dec.pos_embed[0]
    for b in range(2):
        expect = torch.empty(1 + n, dim)
        expect[0] = emb[b, 0] + pos[0]
        for i in range(n):
            expect[1 + i] = dec.mask_token[0, 0] + pos[1 + i]
        for j, i in enumerate(masks.keep[b].tolist()):
            expect[1 + i] = emb[b, 1 + j] + pos[1 + i]
        assert torch.allclose(seen["x"][b], expect, atol=1e-6)


def test_no_masking_decodes_like_the_unshuffled_encoding():
    # mask ratio 0: every patch visible but shuffled; the unshuffle must give the same decoding
    # as encoding the patches in image order with the identity restore
    method = _method().eval()
    x = method.preprocess({"images": _images()})
    masks = random_masking(4, 16, 0.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(masks.keep, torch.arange(16).expand(4, 16))
    with torch.no_grad():
        shuffled = method.decoder(method.backbone.tokens(x, keep=masks.keep), masks.ids_restore)
        ordered = method.decoder(method.backbone.tokens(x), torch.arange(16).expand(4, 16))
    assert torch.allclose(shuffled, ordered, atol=1e-5)


def test_encoder_sees_only_the_visible_patches():
    method = _method()
    shapes = []
    method.backbone.model.blocks[0].register_forward_hook(lambda m, args, out: shapes.append(args[0].shape))
    x = method.preprocess({"images": _images()})
    torch.manual_seed(5)
    pred, target, masks, latent = method.masked_forward(x)
    assert shapes == [(4, 1 + 4, 32)]  # CLS + int(16 * 0.25) patches
    assert pred.shape == target.shape == (4, 16, 4 * 4 * 3) and masks.mask.sum(1).tolist() == [12] * 4
    # changing the pixels of hidden patches changes neither the encoding nor the prediction
    hidden = method.backbone.unpatchify(masks.mask.unsqueeze(-1).float().expand_as(target)).bool()
    other = torch.where(hidden, torch.randn_like(x), x)
    torch.manual_seed(5)
    pred2, _, masks2, latent2 = method.masked_forward(other)
    assert torch.equal(masks2.mask, masks.mask)
    assert torch.allclose(latent2, latent, atol=1e-6) and torch.allclose(pred2, pred, atol=1e-6)


def test_forward_trains_every_parameter_and_monitors_the_cls():
    method = _method()
    out = method({"images": _images()})
    assert torch.isfinite(out.loss) and out.embeddings.shape == (4, 32) and not out.embeddings.requires_grad
    out.loss.backward()
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert "backbone.mask_token" not in trainable and "backbone.model.pos_embed" not in trainable
    assert "decoder.pos_embed" not in method.state_dict()  # fixed table: rebuilt, not stored
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing  # DDP needs a gradient for every trainable parameter


def test_rejects_backbones_that_cannot_drop_tokens_and_bad_values():
    with pytest.raises(ConfigError, match="token-dropping ViT"):
        _method("backbone.name=resnet18")
    with pytest.raises(ConfigError, match="mask_ratio"):
        load_config(RECIPE, [*TINY, "method.mask_ratio=1.0"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config(RECIPE, [*TINY, "method.decoder_dim=30", "method.decoder_heads=4"])


# ---------------------------------------------------------------------------------------------
# reconstructions for the report


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruct_pastes_visible_patches_and_hides_the_rest(norm_pix):
    method = _method(f"method.norm_pix_loss={str(norm_pix).lower()}").eval()
    x = method.preprocess({"images": _images()})
    torch.manual_seed(7)
    masked, recon = method.reconstruct(x)
    assert masked.shape == recon.shape == x.shape
    torch.manual_seed(7)
    pred, target, masks, _ = method.masked_forward(x)
    hidden = method.backbone.unpatchify(masks.mask.unsqueeze(-1).float().expand_as(target)).bool()
    assert torch.equal(recon[~hidden], x[~hidden]) and torch.equal(masked[~hidden], x[~hidden])
    assert (masked[hidden] == 0).all()
    if not norm_pix:  # raw-pixel model: the hidden patches are the decoder's output as is
        assert torch.allclose(recon[hidden], method.backbone.unpatchify(pred)[hidden], atol=1e-6)
    # no leak: the hidden patches' own pixels never reach the picture
    other = torch.where(hidden, 5 * torch.randn_like(x), x)
    torch.manual_seed(7)
    _, recon2 = method.reconstruct(other)
    assert torch.allclose(recon2[hidden], recon[hidden], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# recipes, CLI, resume, report


def test_recipes_carry_the_papers_numbers():
    c = load_config(CONFIGS / "mae" / "imagenet.yaml")
    o, m, v = c.optim, c.method, c.augment.views
    assert (o.name, o.betas, o.weight_decay, o.weight_decay_end, o.warmup_epochs, o.min_lr, o.grad_clip) == (
        "adamw", (0.9, 0.95), 0.05, None, 40, 0.0, None)
    assert o.scaled_lr(c.data.batch_size) == pytest.approx(1.5e-4 * 4096 / 256) and c.data.batch_size == 4096
    assert (m.name, m.mask_ratio, m.decoder_dim, m.decoder_depth, m.decoder_heads, m.norm_pix_loss) == (
        "mae", 0.75, 512, 8, 16, True)
    assert (c.backbone.name, c.backbone.patch_size, c.backbone.pos_embed, c.trainer.epochs) == (
        "vit_base", 16, "sincos", 800)
    assert len(v) == 1 and (v[0].size, v[0].crop_scale, v[0].hflip_p) == (224, (0.2, 1.0), 0.5)
    assert v[0].jitter_p == v[0].grayscale_p == v[0].blur_p == v[0].solarize_p == 0.0  # no colour
    cifar = load_config(RECIPE)
    assert (cifar.backbone.name, cifar.backbone.patch_size, cifar.method.mask_ratio) == ("vit_tiny", 4, 0.75)
    assert cifar.augment.views[0].jitter_p == 0.0 and cifar.optim.betas == (0.9, 0.95)


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    rc = main(["pretrain", "--config", str(RECIPE), *TINY, f"trainer.out_dir={out}", "trainer.run_name=r",
               "trainer.epochs=1", "trainer.log_every=1"])
    assert rc == 0
    return out / "r"


def test_cli_trains_from_the_recipe(mae_run):
    summary = json.loads((mae_run / "summary.json").read_text())
    assert summary["finished"] and summary["method"] == "mae" and summary["position"]["step"] == 4
    assert math.isfinite(summary["final_loss"])


def test_resume_equals_uninterrupted(tmp_path):
    cfg = load_config(RECIPE, [*TINY, "data.limit=16", "trainer.epochs=3"])  # 2 steps per epoch
    mid, final = resume_matches_straight(cfg, tmp_path, until_step=3)
    assert any(k.startswith("decoder.blocks.0.") for k in final) and "decoder.mask_token" in final


def test_report_draws_the_reconstruction_grid(mae_run):
    from PIL import Image

    from selfsup.report import write_report

    path = write_report(mae_run, max_points=60, projection="pca")
    png = mae_run / "report" / "reconstruction.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    text = path.read_text()
    assert 'id="reconstruction"' in text and "Reconstructions: " not in text  # drawn, not skipped


def test_exported_encoder_loads_into_timm(mae_run, tmp_path):
    import timm
    from safetensors.torch import load_file

    from selfsup.evaluate import load_method
    from selfsup.export import export_encoder

    export_encoder(mae_run, tmp_path / "enc.safetensors")
    state = load_file(str(tmp_path / "enc.safetensors"))
    assert not any("mask_token" in k or k.startswith("decoder") for k in state)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                            num_classes=0)
    vit.load_state_dict(state)  # strict: timm's names, nothing missing or extra
    method, _, _ = load_method(mae_run)
    x = method.preprocess({"images": _images()})
    with torch.no_grad():
        assert torch.allclose(vit.eval()(x), method.encode(x), atol=1e-5)
