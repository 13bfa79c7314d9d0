"""The ViT backbone (backbones/vit.py): token dropping, mask tokens, all-layer outputs, sin-cos and
learned position embeddings at other sizes, patchify order, export into timm, MAE init, gradient
checkpointing, layer-wise lr decay groups, and a CLI training step with a ViT."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY

from selfsup.backbones import ViT, build_backbone, sincos_2d_pos_embed
from selfsup.cli import main
from selfsup.config import BackboneConfig, OptimConfig, load_config
from selfsup.errors import ConfigError
from selfsup.train.optim import build_optimizer, param_groups

CONFIGS = Path(__file__).parents[1] / "configs"


def tiny(**kw) -> ViT:
    torch.manual_seed(0)
    args = dict(name="vit_tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    return build_backbone(BackboneConfig(**{**args, **kw})).eval()


def _x(b=3, side=16, seed=1):
    return torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# tokens(): shapes, keep, mask, layers


def test_sizes_registered_and_overrides():
    b = build_backbone(BackboneConfig(name="vit_small", img_size=32, patch_size=8, depth=1))
    assert (b.embed_dim, b.depth, b.num_heads, b.out_dim, b.grid_size, b.num_patches) == (384, 1, 6, 384, (4, 4), 16)
    assert b.model.blocks[0].attn.num_heads == 6 and b.family == "timm"
    for name, dim in (("vit_tiny", 192), ("vit_base", 768), ("vit_large", 1024)):
        assert build_backbone(BackboneConfig(name=name, img_size=16, patch_size=8, depth=1)).out_dim == dim
    with pytest.raises(ConfigError, match="divisible"):
        build_backbone(BackboneConfig(name="vit_tiny", embed_dim=30, num_heads=4, depth=1))
    with pytest.raises(ConfigError, match="pos_embed"):
        load_config(None, ["backbone.pos_embed=rope"])
    with pytest.raises(ConfigError, match="multiple"):
        load_config(None, ["backbone.img_size=30", "backbone.patch_size=4"])
    with pytest.raises(ConfigError, match="layer_decay"):
        load_config(None, ["optim.layer_decay=1.5"])


def test_token_shapes_with_keep_mask_and_layers():
    vit, x = tiny(), _x()
    assert vit(x).shape == (3, 32) and vit.tokens(x).shape == (3, 17, 32)
    keep = torch.rand(3, 16, generator=torch.Generator().manual_seed(0)).argsort(1)[:, :5]
    assert vit.tokens(x, keep=keep).shape == (3, 6, 32)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, :7] = True
    out, layers = vit.tokens(x, mask=mask, keep=keep, return_layers=True)
    assert out.shape == (3, 6, 32) and len(layers) == 2 and all(t.shape == (3, 6, 32) for t in layers)
    # the last layer's output, final-normed, is the returned tokens
    assert torch.allclose(vit.model.norm(layers[-1]), out, atol=1e-6)
    # other sizes: 8x12 input -> a 2x3 grid
    assert vit.tokens(torch.randn(2, 3, 8, 12)).shape == (2, 7, 32)


def test_keep_all_equals_plain_forward_and_permutation_permutes():
    vit, x = tiny(), _x()
    full = vit.tokens(x)
    everything = torch.arange(16).expand(3, 16)
    assert torch.allclose(vit.tokens(x, keep=everything), full, atol=1e-6)
    # attention is permutation-equivariant once positions are attached: permuted keep = permuted tokens
    perm = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    out = vit.tokens(x, keep=perm)
    assert torch.allclose(out[:, 0], full[:, 0], atol=1e-5)
    assert torch.allclose(out[:, 1:], torch.gather(full[:, 1:], 1, perm[..., None].expand(-1, -1, 32)), atol=1e-5)


def test_dropped_tokens_equal_encoding_the_kept_patches_alone():
    """keep must gather AFTER the position embedding (MAE): encoding patches {0, 5} of a 4x4 grid
    must equal a hand-built sequence of [CLS + pos0, e_0 + pos_1, e_5 + pos_6] through the blocks."""
    vit, x = tiny(), _x(b=1)
    m = vit.model
    keep = torch.tensor([[0, 5]])
    emb = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    pos = m.pos_embed
    seq = torch.cat([m.cls_token + pos[:, :1], emb[:, [0]] + pos[:, [1]], emb[:, [5]] + pos[:, [6]]], dim=1)
    expected = m.norm(m.blocks(seq))
    assert torch.allclose(vit.tokens(x, keep=keep), expected, atol=1e-6)


def test_mask_replaces_patch_embedding_before_positions():
    vit, x = tiny(), _x(b=2)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 3] = True
    out = vit.tokens(x, mask=mask)
    m = vit.model
    emb = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    emb[0, 3] = vit.mask_token[0, 0]
    seq = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(2, -1, -1), emb + m.pos_embed[:, 1:]], dim=1)
    assert torch.allclose(out, m.norm(m.blocks(seq)), atol=1e-6)
    assert torch.allclose(out[1], vit.tokens(x)[1], atol=1e-6)  # unmasked sample unchanged
    # the image content under a masked patch no longer matters
    y = x.clone()
    y[0, :, 0:4, 12:16] = 5.0  # patch 3 = row 0, column 3
    assert torch.allclose(vit.tokens(y, mask=mask), out, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# position embeddings


def test_sincos_hand_computed():
    # dim 4, grid 1x2: omega = [1]; channels = [sin w, cos w, sin h, cos h]
    got = sincos_2d_pos_embed(4, 1, 2, cls_token=True)
    s1, c1 = 0.8414709848, 0.5403023059
    expected = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 1], [s1, c1, 0, 1]], dtype=torch.float32)
    assert got.shape == (1, 3, 4) and torch.allclose(got[0], expected, atol=1e-7)
    # dim 8, grid 2x1, patch (h=1, w=0): omega = [1, 10000**-0.5 = 0.01]
    got = sincos_2d_pos_embed(8, 2, 1)
    expected = torch.tensor([0, 0, 1, 1, s1, 0.0099998333, c1, 0.9999500004])
    assert got.shape == (1, 2, 8) and torch.allclose(got[0, 1], expected, atol=1e-7)


def test_sincos_table_is_frozen_and_recomputed_for_other_sizes():
    vit = tiny()
    pe = vit.model.pos_embed
    assert not pe.requires_grad and torch.equal(pe, sincos_2d_pos_embed(32, 4, 4, cls_token=True))
    assert torch.equal(pe[0, 0], torch.zeros(32))  # CLS position = 0, as MAE
    assert torch.equal(vit.pos_embed_for((2, 3)), sincos_2d_pos_embed(32, 2, 3, cls_token=True))
    learned = tiny(pos_embed="learned")
    assert learned.model.pos_embed.requires_grad
    assert 0.01 < float(learned.model.pos_embed.detach().std()) < 0.03


def test_learned_positions_resampled_like_timm_and_any_size_runs():
    vit = tiny(pos_embed="learned")
    x = _x(b=2, side=8)
    # timm's own forward with dynamic_img_size=True resamples bicubically (+ antialias) too
    assert torch.allclose(vit(x), vit.model(x), atol=1e-5)
    assert vit.pos_embed_for((2, 2)).shape == (1, 5, 32)
    from selfsup.pretext.multicrop import allow_any_input_size

    assert allow_any_input_size(vit)  # already dynamic: DINO / SwAV local crops run through it


# ---------------------------------------------------------------------------------------------
# patchify, init, export


def test_patchify_order_hand_checked_and_roundtrip():
    vit = build_backbone(BackboneConfig(name="vit_tiny", img_size=4, patch_size=2, depth=1, embed_dim=8, num_heads=2))
    c, i, j = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(4), indexing="ij")
    img = (100 * c + 10 * i + j).float()[None]  # pixel value encodes (channel, row, column)
    patches = vit.patchify(img)
    assert patches.shape == (1, 4, 12)
    # patch 1 = grid row 0, column 1 = rows 0-1, columns 2-3; inside: (row, column, channel)
    assert patches[0, 1].tolist() == [2, 102, 202, 3, 103, 203, 12, 112, 212, 13, 113, 213]
    assert patches[0, 2, :3].tolist() == [20, 120, 220]  # patch 2 = grid row 1, column 0
    assert torch.equal(vit.unpatchify(patches), img)
    x = torch.randn(2, 3, 8, 12)
    assert torch.equal(vit.unpatchify(vit.patchify(x), grid=(4, 6)), x)


def test_mae_initialization():
    vit = tiny(embed_dim=64, num_heads=4)
    m = vit.model
    qkv = m.blocks[0].attn.qkv
    bound = math.sqrt(6 / (64 + 192))  # xavier-uniform of the fused (3D, D) weight, as MAE
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(qkv.bias) == 0 and torch.count_nonzero(m.blocks[1].mlp.fc2.bias) == 0
    w = m.patch_embed.proj.weight  # (64, 3, 4, 4) -> xavier on (64, 48)
    assert w.abs().max() <= math.sqrt(6 / (64 + 48))
    for t in (m.cls_token, vit.mask_token):
        assert 0.01 < float(t.detach().std()) < 0.03


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_export_loads_strict_into_timm_with_same_output(pool):
    import timm

    vit = tiny(img_size=32, pool=pool, pos_embed="learned" if pool == "mean" else "sincos")
    state = vit.export_state_dict()
    assert "mask_token" not in state and not any(k.startswith("model.") for k in state)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=0,
                            depth=2, embed_dim=32, num_heads=2,
                            global_pool="token" if pool == "cls" else "avg", fc_norm=False).eval()
    ref.load_state_dict(state, strict=True)
    x = _x(side=32)
    with torch.no_grad():
        assert torch.allclose(ref(x), vit(x), atol=1e-5)


def test_layer_scale_starts_at_its_value_scales_the_branches_and_exports_to_timm():
    import timm

    vit = tiny(img_size=32, layer_scale=1e-5)
    gammas = [p for n, p in vit.named_parameters() if n.endswith(("ls1.gamma", "ls2.gamma"))]
    assert len(gammas) == 4 and all(torch.equal(g, torch.full((32,), 1e-5)) for g in gammas)  # 2 blocks x 2
    x = _x(side=32)
    with torch.no_grad():
        # the same seed gives the same weights; only the branch gains differ
        plain = tiny(img_size=32)
        assert not torch.allclose(vit(x), plain(x), atol=1e-3)  # same weights, different branches
        for g in gammas:
            g.fill_(1.0)  # LayerScale at 1 is the plain block
        assert torch.allclose(vit(x), plain(x), atol=1e-5)
        for g in gammas:
            g.fill_(1e-5)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=0,
                            depth=2, embed_dim=32, num_heads=2, init_values=1e-5, fc_norm=False).eval()
    ref.load_state_dict(vit.export_state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(ref(x), vit(x), atol=1e-5)
    with pytest.raises(ConfigError, match="backbone.layer_scale"):
        BackboneConfig(name="vit_tiny", layer_scale=0.0).validate()


# ---------------------------------------------------------------------------------------------
# gradient checkpointing, layer-wise lr decay


def test_gradient_checkpointing_gives_the_same_grads():
    x = _x(b=2)
    grads = []
    for ckpt in (False, True):
        vit = tiny(grad_checkpointing=ckpt, drop_path=0.2).train()
        assert vit.grad_checkpointing == ckpt
        calls = []
        vit.model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
        torch.manual_seed(3)  # same drop-path draws (checkpoint replays the RNG state)
        out, layers = vit.tokens(x, return_layers=True)
        (out.square().mean() + layers[0].mean()).backward()
        assert len(calls) == (2 if ckpt else 1)  # checkpointed blocks are recomputed in backward
        grads.append({n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    # the unused mask token gets an exactly-zero gradient (DDP needs one for every trainable parameter)
    assert torch.count_nonzero(grads[0]["mask_token"]) == 0
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


class _Toy(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.head = backbone, torch.nn.Linear(32, 4)


def test_layer_decay_and_bias_norm_lr_scales_hand_computed():
    model = _Toy(tiny(pos_embed="learned"))  # depth 2: embeddings 0, blocks 1-2, final norm 3
    groups = param_groups(model, True, layer_decay=0.5, bias_norm_lr_scale=0.1)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["wd_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    expected = {
        "backbone.mask_token": 0.125, "backbone.model.cls_token": 0.125, "backbone.model.pos_embed": 0.125,
        "backbone.model.patch_embed.proj.weight": 0.125,  # 0.5 ** (2 + 1 - 0)
        "backbone.model.patch_embed.proj.bias": 0.0125,  # x 0.1: no-decay group
        "backbone.model.blocks.0.attn.qkv.weight": 0.25,  # 0.5 ** (3 - 1)
        "backbone.model.blocks.0.norm1.bias": 0.025,
        "backbone.model.blocks.1.mlp.fc1.weight": 0.5,  # 0.5 ** (3 - 2)
        "backbone.model.norm.weight": 0.1,  # 1 x 0.1
        "head.weight": 1.0, "head.bias": 0.1,
    }
    for name, value in expected.items():
        assert scale[id(named[name])] == pytest.approx(value), name
    assert wd[id(named["backbone.model.cls_token"])] == 1.0 and wd[id(named["head.bias"])] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(named)  # every parameter exactly once
    assert len({(g["lr_scale"], g["wd_scale"]) for g in groups}) == len(groups)
    # the frozen sin-cos table is in no group; defaults keep the old two groups with lr_scale 1
    frozen = _Toy(tiny())
    plain = param_groups(frozen)
    assert [g["lr_scale"] for g in plain] == [1.0, 1.0] and [g["wd_scale"] for g in plain] == [1.0, 0.0]
    assert sum(len(g["params"]) for g in plain) == len(list(frozen.parameters())) - 1
    opt = build_optimizer(model, OptimConfig(name="adamw", layer_decay=0.5), lr=0.2)
    assert sorted({round(g["lr"], 6) for g in opt.param_groups}) == [0.025, 0.05, 0.1, 0.2]


# ---------------------------------------------------------------------------------------------
# end to end


VIT_TINY = [*(o for o in TINY if not o.startswith("method.")), "backbone.name=vit_tiny", "backbone.patch_size=4",
            "backbone.depth=1", "backbone.embed_dim=32", "backbone.num_heads=2", "trainer.max_steps=2",
            "eval.final_knn=false", "data.source=embedded", "optim.layer_decay=0.75",
            "backbone.grad_checkpointing=true"]


def test_cli_dino_trains_with_a_vit_and_exports_to_timm(tmp_path):
    import timm

    from selfsup.core.build import build_method
    from selfsup.export import load_encoder

    overrides = [*VIT_TINY, "method.name=dino", "method.hidden_dim=32", "method.bottleneck_dim=16",
                 "method.out_dim=32", "augment.n_local=2", "augment.local.size=8",
                 f"trainer.out_dir={tmp_path}", "trainer.run_name=r"]
    rc = main(["pretrain", "--config", str(CONFIGS / "dino" / "cifar10.yaml"), *overrides])
    assert rc == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["finished"] and summary["position"]["step"] == 2 and math.isfinite(summary["final_loss"])
    out = tmp_path / "enc.safetensors"
    assert main(["export", str(tmp_path / "r"), str(out)]) == 0
    model = load_encoder(out)  # img_size recorded from the built backbone (the 16-px crop)
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    assert model.patch_embed.img_size == (16, 16)
    method = build_method(load_config(CONFIGS / "dino" / "cifar10.yaml", overrides))
    assert isinstance(method.backbone, ViT) and method.backbone.img_size == 16


def test_report_attention_and_finetune_find_the_timm_model(tmp_path):
    from selfsup.core.build import build_method
    from selfsup.data import load_dataset
    from selfsup.data.loader import limit_dataset
    from selfsup.eval.finetune import finetune
    from selfsup.report import _vit, cls_attention

    method = build_method(load_config(None, [*VIT_TINY, "backbone.depth=2"])).eval()
    vit = _vit(method)
    assert vit is method.backbone.model
    x = _x(b=2)
    maps = cls_attention(vit, x)  # the hook sees the same last block our tokens() runs
    assert maps.shape == (2, 2, 4, 4)  # (B, heads, gh, gw)
    assert ((maps.sum((-1, -2)) > 0) & (maps.sum((-1, -2)) < 1)).all()  # the CLS row also attends to itself
    train, test = (limit_dataset(load_dataset("embedded", s), 16, seed=1) for s in ("train", "test"))
    res = finetune(method, train, test, epochs=1, batch_size=8, drop_path=0.1, progress=False)
    assert res["recipe"]["optimizer"] == "adamw"
    assert res["last_top1"] * 16 / 100 == pytest.approx(round(res["last_top1"] * 16 / 100))  # k of 16 test images


def test_simclr_step_with_a_vit(tmp_path):
    from selfsup.train.trainer import Trainer

    cfg = load_config(None, [*VIT_TINY, "backbone.pool=mean", "trainer.channels_last=true",
                             f"trainer.out_dir={tmp_path}"])
    trainer = Trainer(cfg, run_dir=tmp_path / "s")
    before = trainer.method.backbone.model.blocks[0].attn.qkv.weight.detach().clone()
    trainer.fit()
    after = trainer.method.backbone.model.blocks[0].attn.qkv.weight
    assert not torch.equal(before, after)
    scales = sorted({round(g["lr_scale"], 6) for g in trainer.optimizer.param_groups})
    assert scales == [0.75**2, 0.75, 1.0]  # embeddings, block 0, final norm + heads
