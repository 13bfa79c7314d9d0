"""BEiT: the masked-token cross-entropy against a hand-computed case, the k-means tokenizer
(clusters, determinism, files), the training step, the recipes, CLI training with a pre-fitted
tokenizer, export, and exact resume without refitting the tokenizer."""

import math
from pathlib import Path

import pytest
import torch
from conftest import resume_matches_straight

from selfsup.checkpoint import load_checkpoint
from selfsup.cli import main
from selfsup.config import load_config
from selfsup.core.build import build_method
from selfsup.errors import ConfigError, TrainingError
from selfsup.losses import beit_loss
from selfsup.methods.beit import BEiT
from selfsup.pretext.masking import block_masking
from selfsup.pretext.tokenizer import (
    PatchKMeansTokenizer,
    load_tokenizer_file,
    nearest_code,
    patch_features,
)

CONFIGS = Path(__file__).parents[1] / "configs"
RECIPE = str(CONFIGS / "beit" / "cifar10.yaml")
# the CIFAR recipe shrunk: 16-px crops, 4-px patches (4x4 grid, 6 masked), a 1-block 32-wide ViT,
# 16 codes fitted on 1024 patches in 20 k-means steps
TINY = [
    "data.source=embedded", "data.limit=64", "data.batch_size=16", "data.eval_batch_size=256",
    "backbone.depth=1", "backbone.embed_dim=32", "backbone.num_heads=2", "backbone.img_size=16",
    "augment.views.0.size=16", "method.vocab_size=16", "method.min_block_patches=2",
    "method.tokenizer_patches=1024", "method.tokenizer_iters=20", "method.tokenizer_batch=256",
    "trainer.epochs=2", "trainer.progress=false", "trainer.precision=32", "trainer.device=cpu",
    "optim.warmup_epochs=0", "eval.final_knn=false",
]


def _images(n=8, side=16, seed=1):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _method(*extra):
    return build_method(load_config(RECIPE, [*TINY, *extra]))


# ---------------------------------------------------------------------------------------------
# loss


def test_beit_loss_hand_computed():
    # 3 patches, vocabulary 2; patches 0 and 2 are masked.
    # patch 0: logits [ln 3, 0], target 0 -> p = 3/4 -> -ln(3/4) = 0.2876821
    # patch 2: logits [0, 0],    target 1 -> p = 1/2 -> ln 2     = 0.6931472
    # patch 1 is unmasked: its (terrible) prediction must not count. mean = 0.4904146
    logits = torch.tensor([[[math.log(3.0), 0.0], [100.0, -100.0], [0.0, 0.0]]])
    targets = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[True, False, True]])
    assert beit_loss(logits, targets, mask).item() == pytest.approx(0.4904146, abs=1e-6)
    # the official form: logits of the masked patches only
    assert beit_loss(logits[mask], targets[mask]).item() == pytest.approx(0.4904146, abs=1e-6)
    assert beit_loss(logits.bfloat16(), targets, mask).dtype == torch.float32


def test_beit_loss_only_masked_positions_count():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[True, False, False, True, False], [False, True, False, False, False]])
    loss = beit_loss(logits, targets, mask)
    loss.backward()
    assert (logits.grad[~mask] == 0).all() and (logits.grad[mask].abs().sum(-1) > 0).all()
    other = logits.detach().clone()
    other[~mask] = torch.randn(int((~mask).sum()), 7, generator=g) * 10
    assert beit_loss(other, targets, mask).item() == pytest.approx(loss.item(), abs=1e-6)
    with pytest.raises(ValueError):
        beit_loss(logits, targets[:, :4], mask)


# ---------------------------------------------------------------------------------------------
# tokenizer


def _clusters(seed=0, per=64, dim=12):
    """4 tight clusters (std 0.05) around centres 6 units apart on different axes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(4, dim)
    for k in range(4):
        centres[k, 3 * k] = 6.0
    x = centres.repeat_interleave(per, 0) + 0.05 * torch.randn(4 * per, dim, generator=g)
    return x, torch.arange(4).repeat_interleave(per)


def test_kmeans_gives_each_well_separated_cluster_one_code():
    x, labels = _clusters()
    tok = PatchKMeansTokenizer(vocab_size=4, patch_size=2, channels=3)  # D = 2*2*3 = 12
    assert not tok.is_fitted
    stats = tok.fit(x, iters=10, batch_size=64, seed=0)
    assert tok.is_fitted and stats["codes_used"] == 4 and stats["quantization_mse"] < 0.01
    ids = nearest_code(x, tok.codebook)
    codes = [set(ids[labels == k].tolist()) for k in range(4)]
    assert all(len(c) == 1 for c in codes)  # a cluster -> one code
    assert len(set.union(*codes)) == 4  # different clusters -> different codes


def test_kmeans_is_deterministic_with_a_seed():
    x = torch.randn(500, 12, generator=torch.Generator().manual_seed(3))
    a, b = (PatchKMeansTokenizer(8, 2) for _ in range(2))
    a.fit(x, iters=15, batch_size=100, seed=7)
    b.fit(x, iters=15, batch_size=100, seed=7)
    assert torch.equal(a.codebook, b.codebook)


def test_tokenizer_ids_follow_the_vit_patch_order():
    method = _method()
    x = torch.randn(2, 3, 16, 16)
    feats = patch_features(x, 4, eps=0.01)
    patches = method.backbone.patchify(x)  # (B, 16, 48) in the ViT's token order
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True, unbiased=False)
    assert torch.allclose(feats, (patches - mean) / (var + 0.01).sqrt(), atol=1e-5)
    assert feats.mean(-1).abs().max() < 1e-5
    tok = method.tokenizer
    tok.fit(feats.flatten(0, 1), iters=5, batch_size=16, seed=0)
    assert torch.equal(tok(x), nearest_code(feats.flatten(0, 1), tok.codebook).view(2, 16))


def test_tokenizer_files_roundtrip(tmp_path):
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(4))
    tok = PatchKMeansTokenizer(8, 2)
    tok.fit(x, iters=5, batch_size=64, seed=0)
    images = torch.randn(3, 3, 8, 8)
    for name in ("codes.safetensors", "codes.pt"):
        kind, codebook = load_tokenizer_file(tok.save(tmp_path / name))
        assert kind == "codebook" and torch.equal(codebook, tok.codebook)
        other = PatchKMeansTokenizer(8, 2)
        other.load_codebook(codebook)
        assert other.is_fitted and torch.equal(other(images), tok(images))
    with pytest.raises(ConfigError, match="vocab_size=8"):
        PatchKMeansTokenizer(16, 2).load_codebook(codebook)
    torch.save(torch.zeros(3), tmp_path / "bad.pt")
    with pytest.raises(ConfigError):
        load_tokenizer_file(tmp_path / "bad.pt")


# ---------------------------------------------------------------------------------------------
# the method


def test_step_matches_loss_on_masked_tokens_of_the_unmasked_crop():
    method = _method()
    images = _images()
    method.fit_tokenizer(images)
    torch.manual_seed(5)
    out = method({"images": images})
    assert torch.isfinite(out.loss) and out.embeddings.shape == (8, 32)
    # replay the step by hand: same view and masks from the same seed, logits at every position
    torch.manual_seed(5)
    x = method.views[0](images)
    ids = method.tokenizer(x)  # the unmasked crop's tokens
    mask = block_masking(8, (4, 4), 6, min_patches=2, min_aspect=0.3)
    assert (mask.sum(1) == 6).all()  # round(0.4 * 16) masked per image
    logits = method.head(method.backbone.tokens(x, mask=mask)[:, 1:])
    assert out.loss.item() == pytest.approx(beit_loss(logits, ids, mask).item(), abs=1e-5)
    # the accuracy: the masked positions whose top logit is the unmasked crop's token, of the 48 masked
    hits = [int(logits[b, p].argmax()) == int(ids[b, p]) for b in range(8) for p in range(16) if mask[b, p]]
    assert len(hits) == 48 and float(out.metrics["beit/mlm_acc"]) == pytest.approx(sum(hits) / 48)
    # masked patches are replaced by the mask token: their pixels cannot change any output
    noisy = x.clone()
    pix = mask.view(8, 1, 4, 1, 4, 1).expand(8, 3, 4, 4, 4, 4).reshape(8, 3, 16, 16)
    noisy[pix] = torch.randn(int(pix.sum()))
    method.eval()
    assert torch.allclose(method.backbone.tokens(noisy, mask=mask), method.backbone.tokens(x, mask=mask), atol=1e-5)


def test_unfitted_tokenizer_and_bad_backbone_are_reported():
    with pytest.raises(TrainingError, match="prepare"):
        _method()({"images": _images()})
    with pytest.raises(ConfigError, match="ViT"):
        build_method(load_config(RECIPE, [*TINY, "backbone.name=resnet18"]))


class _BrightnessTokens(torch.nn.Module):
    """An 'external tokenizer': 4-px patches -> id 0..3 by mean brightness quartile."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        m = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 4).view(b, h // 4, w // 4)
        return torch.bucketize(m, torch.tensor([-0.5, 0.0, 0.5]))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in favour of torch.export
def test_external_module_tokenizers(tmp_path):
    script, program = tmp_path / "tok.pt", tmp_path / "tok.pt2"
    torch.jit.script(_BrightnessTokens()).save(str(script))
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(_BrightnessTokens(), (torch.randn(2, 3, 16, 16),),
                                          dynamic_shapes=({0: batch},)), str(program))
    ids = []
    for path in (script, program):
        assert load_tokenizer_file(path)[0] == "script"
        method = _method(f"method.tokenizer_path={path}", "method.vocab_size=4")
        method.prepare(None)
        torch.manual_seed(0)
        out = method({"images": _images()})
        assert torch.isfinite(out.loss) and not method.tokenizer.is_fitted
        ids.append(method.tokenize(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))))
    assert torch.equal(ids[0], ids[1]) and ids[0].shape == (2, 16)
    bad = _method(f"method.tokenizer_path={path}", "method.vocab_size=2")
    with pytest.raises(ConfigError, match="vocab_size"):
        bad({"images": _images()})


def test_recipes_build_with_paper_settings():
    cfg = load_config(CONFIGS / "beit" / "imagenet.yaml", ["trainer.device=cpu"])
    m = cfg.method
    assert (m.vocab_size, m.num_masked, m.min_block_patches, m.min_aspect) == (8192, 75, 16, 0.3)
    assert cfg.optim.scaled_lr(cfg.data.batch_size) == pytest.approx(1.5e-3)
    assert (cfg.backbone.name, cfg.backbone.patch_size, cfg.backbone.drop_path) == ("vit_base", 16, 0.1)
    cifar = load_config(RECIPE, [])
    assert cifar.method.vocab_size == 512 and cifar.backbone.patch_size == 4
    assert BEiT.num_masked_for(type("M", (), {"cfg": cifar.method})(), 64) == 26


# ---------------------------------------------------------------------------------------------
# CLI and resume


def test_cli_tokenizer_fit_then_pretrain_and_export(tmp_path):
    import timm
    from safetensors.torch import load_file

    tok = tmp_path / "tok.safetensors"
    assert main(["tokenizer", "fit", "--config", RECIPE, "--out", str(tok), *TINY]) == 0
    runs = tmp_path / "runs"
    assert main(["pretrain", "--config", RECIPE, *TINY, "trainer.epochs=1", f"method.tokenizer_path={tok}",
                 f"trainer.out_dir={runs}", "trainer.run_name=r"]) == 0
    ckpt = load_checkpoint(runs / "r")
    assert torch.equal(ckpt["model"]["tokenizer.codebook"], load_file(str(tok))["codebook"])
    assert main(["export", str(runs / "r"), str(tmp_path / "enc.safetensors")]) == 0
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, num_classes=0, depth=1, embed_dim=32,
                            num_heads=2, global_pool="avg", fc_norm=False)
    vit.load_state_dict(load_file(str(tmp_path / "enc.safetensors")), strict=True)


def test_resume_matches_straight_and_keeps_the_codebook(tmp_path, monkeypatch):
    fits = []
    original = BEiT.fit_tokenizer
    monkeypatch.setattr(BEiT, "fit_tokenizer", lambda self, images: fits.append(1) or original(self, images))
    cfg = load_config(RECIPE, TINY)
    mid, final = resume_matches_straight(cfg, tmp_path, until_step=3)
    assert len(fits) == 2  # the straight run and the first half; the resumed half did not refit
    assert torch.equal(mid["model"]["tokenizer.codebook"], final["tokenizer.codebook"])
    assert int(final["tokenizer.fitted"]) == 1
    kind, saved = load_tokenizer_file(tmp_path / "split" / "tokenizer.safetensors")
    assert kind == "codebook" and torch.equal(saved, final["tokenizer.codebook"])
    # and from the command line: one more epoch on the finished run, still no refit
    assert main(["pretrain", "--resume", str(tmp_path / "split"), "trainer.epochs=3"]) == 0
    more = load_checkpoint(tmp_path / "split")
    assert len(fits) == 2 and more["position"]["step"] == 12
    assert torch.equal(more["model"]["tokenizer.codebook"], final["tokenizer.codebook"])


def test_the_tokenizer_fits_on_a_streamed_folder_of_varied_sizes(tmp_path):
    """Streamed images are read one by one as far as the patches need, each cropped inside its own size."""
    from test_streaming import SIZES, write_folder

    from selfsup.data.sources import open_folder_stream
    from selfsup.methods.beit import tokenizer_images
    from selfsup.pretext.tokenizer import sample_patch_features

    folder = write_folder(tmp_path / "data", SIZES * 8)  # 48 images of 6 sizes, 12 to 40 px
    stream = open_folder_stream(str(folder))
    method = _method()
    feats = sample_patch_features(tokenizer_images(stream), method.views[0], 4, 300, seed=3)
    again = sample_patch_features(stream, method.views[0], 4, 300, seed=3)
    assert feats.shape == (300, 4 * 4 * 3) and torch.equal(feats, again)  # deterministic from the seed
    assert main(["tokenizer", "fit", "--config", RECIPE, "--out", str(tmp_path / "tok.safetensors"), *TINY,
                 f"data.source={folder}", "data.mode=stream", "data.limit=null"]) == 0
    kind, codebook = load_tokenizer_file(tmp_path / "tok.safetensors")
    assert kind == "codebook" and codebook.shape == (16, 48) and torch.isfinite(codebook).all()
