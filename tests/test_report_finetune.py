"""Run reports (selfsup.report) and the fine-tuning protocol (selfsup.eval.finetune)."""

import json
import re

import pytest
import torch
from conftest import TINY
from PIL import Image

from selfsup.backbones import build_backbone
from selfsup.cli import main
from selfsup.config import BackboneConfig, load_config
from selfsup.core.build import build_method
from selfsup.data import load_dataset
from selfsup.data.loader import limit_dataset
from selfsup.eval.finetune import (
    finetune,
    layer_decay_param_groups,
    mix_batch,
    vit_layer_id,
)
from selfsup.evaluate import load_method
from selfsup.report import cls_attention, project_2d, read_metrics, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VIT = ["backbone.name=timm:vit_tiny_patch16_224", "backbone.img_size=16", "backbone.patch_size=4"]


def tiny_vit():
    return build_backbone(BackboneConfig(name="timm:vit_tiny_patch16_224", img_size=16, patch_size=4))


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """A 4-step SimCLR run with a tiny ViT (64 images, 16 px), so the report has attention maps."""
    out = tmp_path_factory.mktemp("runs")
    rc = main(["pretrain", *TINY, *VIT, "trainer.epochs=1", "eval.final_knn=false", f"trainer.out_dir={out}",
               "trainer.run_name=vit", "trainer.log_every=1"])
    assert rc == 0
    return out / "vit"


def check_png(path):
    data = path.read_bytes()
    assert len(data) > len(PNG_SIGNATURE) and data[:8] == PNG_SIGNATURE, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 0 and im.size[1] > 0


def test_report_end_to_end(vit_run, capsys):
    # the final kNN is too slow for a unit test (5,000-image bank): give the summary one
    summary = json.loads((vit_run / "summary.json").read_text())
    summary["knn"] = {"trained": {"k20": {"top1": 31.5, "top5": 80.1}}, "random_init": {"k20": {"top1": 25.0}}}
    (vit_run / "summary.json").write_text(json.dumps(summary))

    path = write_report(vit_run, max_points=200, projection="pca")  # UMAP / t-SNE: slow imports
    assert path == vit_run / "report" / "report.html" and path.is_file()
    text = path.read_text()
    assert not re.search(r"https?://", text), "the report must not reference anything online"
    assert "<link" not in text and "<script" not in text
    pngs = sorted((vit_run / "report").glob("*.png"))
    assert {p.stem for p in pngs} >= {"loss", "schedules", "monitor", "knn", "embedding", "attention"}
    assert text.count('src="data:image/png;base64,') == len(pngs)
    for p in pngs:
        check_png(p)
    # header numbers and config; skipped figures say why
    assert "simclr" in text and "timm:vit_tiny_patch16_224" in text and "31.50%" in text and "+6.50" in text
    assert "<pre>" in text and "proj_hidden_dim: 32" in text
    assert "Prototype usage: the method has no prototypes" in text


def test_report_skips_what_it_cannot_draw(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,epoch,loss,knn/top1\n1,0,2.0,\n2,0,1.5,\n2,1,,40.0\n")
    path = write_report(run)  # no checkpoint, no summary, no config: still a report
    text = path.read_text()
    assert (run / "report" / "loss.png").is_file() and (run / "report" / "knn.png").is_file()
    assert "Collapse monitor: metrics.csv has no monitor/* columns" in text
    assert "Embedding map: no last.ckpt in the run directory" in text
    metrics = read_metrics(run / "metrics.csv")
    assert metrics["loss"][2] != metrics["loss"][2]  # empty cell -> NaN
    with pytest.raises(Exception, match="does not exist"):
        write_report(tmp_path / "missing")


def test_project_2d_falls_back_to_pca_on_tiny_sets():
    feats = torch.randn(10, 8)
    coords, name = project_2d(feats, "auto")
    assert name == "PCA" and coords.shape == (10, 2)


def test_cls_attention_matches_explicit_attention():
    vit = tiny_vit().model.eval()
    x = torch.randn(2, 3, 16, 16)
    ours = cls_attention(vit, x)  # (B, H, 4, 4)
    # independent path: timm's unfused attention, reading the softmax output before dropout
    attn = vit.blocks[-1].attn
    attn.fused_attn = False
    seen = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    with torch.no_grad():
        vit(x)
    handle.remove()
    expected = seen["a"][:, :, 0, vit.num_prefix_tokens:].reshape(2, attn.num_heads, 4, 4)
    assert torch.allclose(ours, expected, atol=1e-5)
    # the patches' share plus the prefix tokens' (CLS attending to itself) is the whole softmax row
    prefix = seen["a"][:, :, 0, :vit.num_prefix_tokens].sum(-1)
    assert torch.allclose(ours.sum(dim=(-1, -2)) + prefix, torch.ones(2, attn.num_heads), atol=1e-5)
    assert (prefix > 0).all()


def test_layer_decay_groups_hand_checked():
    vit = tiny_vit().model  # 12 blocks
    head = torch.nn.Linear(vit.num_features, 10)
    groups = layer_decay_param_groups(vit, weight_decay=0.05, layer_decay=0.75, head=head)

    def group_of(name):
        (g,) = [g for g in groups if name in g["names"]]
        return g

    assert group_of("blocks.11.attn.qkv.weight")["lr_scale"] == pytest.approx(0.75)  # 0.75 ** (13 - 12)
    assert group_of("blocks.11.attn.qkv.weight")["weight_decay"] == 0.05
    assert group_of("blocks.0.mlp.fc1.weight")["lr_scale"] == pytest.approx(0.75**12)
    assert group_of("patch_embed.proj.weight")["lr_scale"] == pytest.approx(0.75**13)
    assert group_of("cls_token")["lr_scale"] == pytest.approx(0.75**13)
    assert group_of("cls_token")["weight_decay"] == 0.0 and group_of("pos_embed")["weight_decay"] == 0.0
    assert group_of("blocks.3.norm1.bias")["weight_decay"] == 0.0
    assert group_of("norm.weight")["lr_scale"] == 1.0 and group_of("head.weight")["lr_scale"] == 1.0
    assert group_of("head.weight")["weight_decay"] == 0.05 and group_of("head.bias")["weight_decay"] == 0.0
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(vit.parameters())) + 2  # every parameter exactly once
    assert vit_layer_id("blocks.7.attn.proj.bias", 12) == 8 and vit_layer_id("fc_norm.weight", 12) == 13


def test_mix_batch_properties():
    torch.manual_seed(0)
    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(6)])  # sample i is constant i
    targets = torch.nn.functional.one_hot(torch.arange(6), 6).float()
    same_x, same_t = mix_batch(x, targets)
    assert same_x is x and same_t is targets
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        out, soft = mix_batch(x, targets, mixup, cutmix)
        assert torch.allclose(soft.sum(1), torch.ones(6))
        # the share of sample i in its mixed image equals its target weight (both mixup and CutMix)
        for i in range(6):
            j = 5 - i
            share_i = (out[i] - j).mean() / (i - j)  # constant images: pixel = lam*i + (1-lam)*j
            assert share_i == pytest.approx(float(soft[i, i]), abs=1e-5)
            assert soft[i, i] + soft[i, j] == pytest.approx(1.0)


def labeled_subset(split, n):
    return limit_dataset(load_dataset("embedded", split), n, seed=1)


def test_finetune_vit_copies_backbone_and_leaves_method_alone(vit_run):
    method, _, _ = load_method(vit_run)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    res = finetune(method, labeled_subset("train", 32), labeled_subset("test", 32), epochs=1, batch_size=16,
                   mixup=0.8, cutmix=1.0, drop_path=0.1, progress=False, return_model=True)
    assert {"best_top1", "last_top1", "last_top5", "curve"} <= res.keys()
    assert len(res["curve"]) == 1 and res["curve"][0] * 32 / 100 == pytest.approx(round(res["curve"][0] * 32 / 100))
    assert res["best_top1"] == max(res["curve"]) and res["last_top1"] == res["curve"][-1]
    assert res["recipe"]["optimizer"] == "adamw" and res["recipe"]["layer_decay"] == 0.75
    after = method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the method's weights must not change"
    tuned = res["backbone"].state_dict()
    assert any(not torch.equal(tuned[k], before[f"backbone.{k}"]) for k in tuned), "the copy must train"


def test_finetune_resnet_uses_plain_sgd():
    method = build_method(load_config(None, list(TINY)))
    res = finetune(method, labeled_subset("train", 32), labeled_subset("test", 32), epochs=1, batch_size=16,
                   progress=False)
    assert res["recipe"]["optimizer"] == "sgd-nesterov" and res["recipe"]["layer_decay"] is None
    assert res["lr"] == pytest.approx(0.05 * 16 / 256) and res["last_top5"] is not None
    with pytest.raises(ValueError, match="ViT"):
        finetune(method, labeled_subset("train", 16), labeled_subset("test", 16), epochs=1, layer_decay=0.65)
