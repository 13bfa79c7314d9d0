"""RotNet and jigsaw: rotation labels, the Hamming permutation set against an explicit Algorithm 1,
exact tiling, label consistency, recipes, CLI training and exact resume."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, resume_matches_straight, train_recipe_two_steps

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.core.build import build_method
from selfsup.errors import ConfigError
from selfsup.losses import classification_loss
from selfsup.methods.rotation import rotate_batch
from selfsup.pretext.permutations import (
    assemble_tiles,
    extract_tiles,
    hamming_permutations,
    normalize_tiles,
    pairwise_hamming,
    shuffle_tiles,
    tile_positions,
    unshuffle_tiles,
)

CONFIGS = Path(__file__).parents[1] / "configs"
# one 16-px view (the recipes have one), a 16-channel ResNet-18: every step is a few ms
BASE = [*(o for o in TINY if not o.startswith(("method.", "augment.views.1"))), "backbone.width=16"]
ROT_TINY = [*BASE, "method.name=rotation"]
JIG_TINY = [*BASE, "method.name=jigsaw", "method.n_permutations=100", "method.tile_dim=16",
            "method.hidden_dim=32", "method.perm_pool=10000"]


def _images(n=8, side=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)


# ---------------------------------------------------------------------------------------------
# rotation


def test_rotation_labels_match_hand_rotated_images():
    x = torch.arange(9.0).view(1, 1, 3, 3)  # [[0 1 2] [3 4 5] [6 7 8]]: no rotational symmetry
    x = torch.cat([x, x + 10])  # N = 2
    out, labels = rotate_batch(x)
    assert out.shape == (8, 1, 3, 3) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    by_hand = {  # counter-clockwise, as the official rotate_img (90: flipud(transpose))
        0: [[0, 1, 2], [3, 4, 5], [6, 7, 8]],
        1: [[2, 5, 8], [1, 4, 7], [0, 3, 6]],
        2: [[8, 7, 6], [5, 4, 3], [2, 1, 0]],
        3: [[6, 3, 0], [7, 4, 1], [8, 5, 2]],
    }
    for row in range(8):
        y, i = int(labels[row]), row % 2
        assert out[row, 0].tolist() == (torch.tensor(by_hand[y], dtype=torch.float) + 10 * i).tolist()
        if y == 1:  # the official code's 90-degree rotation of an (H, W) array
            assert np.array_equal(out[row, 0].numpy(), np.flipud(np.transpose(x[i, 0].numpy())))
        # undoing the rotation: 4 - y more quarter turns give the upright image back
        assert torch.equal(torch.rot90(out[row], 4 - y, dims=(-2, -1)), x[i])


def test_one_random_rotation_per_image_is_consistent():
    x = torch.randn(64, 3, 5, 5)
    out, labels = rotate_batch(x, all_rotations=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and len(labels.unique()) == 4
    for i in range(64):
        assert torch.equal(out[i], torch.rot90(x[i], int(labels[i]), dims=(-2, -1)))


def test_classification_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    loss, acc = classification_loss(logits, torch.tensor([0, 2]))
    e = math.e
    expect = (-math.log(e**2 / (e**2 + 3)) - math.log(1 / (e + 3))) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-6) and acc.item() == 0.5


def test_rotation_step_encodes_4n_images_and_logs_accuracy():
    method = build_method(load_config(None, [*ROT_TINY, "trainer.channels_last=false"]))
    seen = []
    method.backbone.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    with torch.no_grad():
        method.head.bias[1] += 100.0  # every image is then called "rotated by 90 degrees" ...
    out = method({"images": _images(8)})
    assert seen == [(32, 3, 16, 16)]  # all 4 rotations of the 8 images in one pass
    # ... which 8 of the 32 rotated images are
    assert float(out.metrics["rot_acc"]) == pytest.approx(8 / 32) and out.embeddings.shape == (8, 128)
    assert math.isfinite(out.loss.item()) and method.head.out_features == 4
    out.loss.backward()
    assert method.backbone.model.conv1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# the permutation set


def _algorithm1(pool, n, first, criterion):
    """Noroozi & Favaro's Algorithm 1 (and the max-min variant) by explicit Python loops."""
    chosen = [first]
    while len(chosen) < n:
        best, best_key = None, None
        for k, cand in enumerate(pool):
            if k in chosen:
                continue
            dists = [sum(a != b for a, b in zip(cand, pool[c])) for c in chosen]
            key = sum(dists) if criterion == "mean" else (min(dists), sum(dists))
            if best_key is None or key > best_key:  # strict: ties keep the first candidate
                best, best_key = k, key
        chosen.append(best)
    return [pool[c] for c in chosen]


@pytest.mark.parametrize("criterion", ["mean", "maxmin"])
def test_permutation_set_matches_explicit_algorithm1(criterion):
    pool = list(itertools.permutations(range(4)))  # all 24: the exact algorithm, no sampling
    first = int(np.random.default_rng(3).integers(len(pool)))  # the seed's first draw
    got = hamming_permutations(12, n_items=4, pool_size=0, seed=3, criterion=criterion)
    assert got.tolist() == [list(p) for p in _algorithm1(pool, 12, first, criterion)]


def test_pairwise_hamming_by_hand():
    d = pairwise_hamming(torch.tensor([[0, 1, 2], [1, 0, 2], [2, 0, 1]]))
    assert d.tolist() == [[0, 2, 3], [2, 0, 2], [3, 2, 0]]


def test_permutation_sets_are_distinct_and_far_apart():
    def stats(perms):
        d = pairwise_hamming(perms)
        off = d[~torch.eye(len(perms), dtype=torch.bool)]
        return int(off.min()), float(off.float().mean())

    paper = hamming_permutations(1000, pool_size=10_000, seed=0)
    assert paper.shape == (1000, 9) and len({tuple(p) for p in paper.tolist()}) == 1000
    assert all(sorted(p) == list(range(9)) for p in paper.tolist())
    low, mean = stats(paper)
    # the paper's table 3: average 8.00, minimum 2 for 1000 permutations; random pairs average 8
    assert low >= 2 and mean == pytest.approx(8.008, abs=1e-3)
    low, mean = stats(hamming_permutations(1000, pool_size=10_000, seed=0, criterion="maxmin"))
    assert low >= 4 and mean == pytest.approx(8.008, abs=1e-3)  # same average, larger minimum
    assert stats(hamming_permutations(100, pool_size=10_000, seed=0, criterion="maxmin"))[0] >= 6
    # deterministic in the seed, different across seeds
    assert torch.equal(hamming_permutations(100, pool_size=10_000, seed=0), paper[:100])
    assert not torch.equal(hamming_permutations(100, pool_size=10_000, seed=1), paper[:100])


# ---------------------------------------------------------------------------------------------
# tiles


def test_tiles_without_gap_reassemble_exactly_after_unshuffling():
    x = torch.randn(5, 3, 12, 12)
    top, left = tile_positions(5, 12, grid=3, tile=4)  # cell = tile: no gap, no randomness
    tiles = extract_tiles(x, top, left, 4)
    assert tiles.shape == (5, 9, 3, 4, 4) and torch.equal(assemble_tiles(tiles, 3), x)
    perms = hamming_permutations(20, pool_size=1000)[torch.randint(0, 20, (5,))]
    shuffled = shuffle_tiles(tiles, perms)
    for b in range(5):
        for i in range(9):
            assert torch.equal(shuffled[b, i], tiles[b, perms[b, i]])
    assert torch.equal(assemble_tiles(unshuffle_tiles(shuffled, perms), 3), x)


def test_tiles_with_gap_and_channel_jitter_come_from_their_cell():
    x = torch.randn(6, 3, 32, 32)
    color = torch.tensor([True, False, True, False, True, True])
    g = torch.Generator().manual_seed(0)
    top, left = tile_positions(6, 32, grid=3, tile=7, channel_jitter=2, color=color, generator=g)
    tiles = extract_tiles(x, top, left, 7)
    cell, origin = 10, 1  # 30 of the 32 px, centred
    for b in range(6):
        for t in range(9):
            for c in range(3):
                r, q = int(top[b, t, c]), int(left[b, t, c])
                assert torch.equal(tiles[b, t, c], x[b, c, r:r + 7, q:q + 7])
                lo_r, lo_c = origin + (t // 3) * cell, origin + (t % 3) * cell
                assert lo_r - 2 <= r <= lo_r + cell - 7 + 2 and lo_c - 2 <= q <= lo_c + cell - 7 + 2
            if not color[b]:  # grayscale images: channels stay aligned
                assert len(set(top[b, t].tolist())) == 1 and len(set(left[b, t].tolist())) == 1
    assert (top[color] != top[color][..., :1]).any()  # colour channels do move
    assert len(set(top[:, 0, 0].tolist())) > 1  # each sample draws its own gap offsets


def test_normalize_tiles_zero_mean_unit_std_per_tile_and_channel():
    tiles = normalize_tiles(torch.rand(2, 9, 3, 5, 5) * 7 + 3)
    flat = tiles.flatten(-2)
    assert torch.allclose(flat.mean(-1), torch.zeros(2, 9, 3), atol=1e-5)
    assert torch.allclose(flat.std(-1, unbiased=False), torch.ones(2, 9, 3), atol=1e-3)


def _identity_jigsaw(extra=()):
    # the view is the whole 15-px image (no crop, flip or colour change), tiles = cells: the
    # puzzles are then a pure function of the image and the drawn labels
    view = ["augment.views.0.size=15", "augment.views.0.crop_scale=[1.0,1.0]", "augment.views.0.crop_ratio=[1.0,1.0]",
            "augment.views.0.hflip_p=0.0", "augment.views.0.jitter_p=0.0", "augment.views.0.grayscale_p=0.0"]
    cfg = load_config(None, [*JIG_TINY, *view, "method.tile_size=5", "method.channel_jitter=0",
                             "trainer.channels_last=false", *extra])
    return build_method(cfg)


def test_puzzle_labels_name_the_permutation_that_shuffled_the_tiles():
    method = _identity_jigsaw()
    images = _images(64, side=15)
    torch.manual_seed(0)
    puzzles, labels = method.make_puzzles(images)
    x = (images.float() / 255 - method.views[0].mean) / method.views[0].std
    top, left = tile_positions(64, 15, grid=3, tile=5)
    cells = normalize_tiles(extract_tiles(x, top, left, 5))
    perms = method.permutations[labels]
    for b in range(64):
        for i in range(9):
            assert torch.allclose(puzzles[b, i], cells[b, perms[b, i]], atol=1e-5)
    assert torch.allclose(unshuffle_tiles(puzzles, perms), cells, atol=1e-5)
    # every puzzle draws its own permutation: 64 draws from 100 classes hit many of them
    assert len(labels.unique()) > 30
    torch.manual_seed(1)
    assert not torch.equal(method.make_puzzles(images)[1], labels)


def test_jigsaw_step_encodes_9b_tiles_and_the_grid_tiles_downstream():
    method = _identity_jigsaw()
    seen = []
    hook = method.backbone.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    torch.manual_seed(2)
    labels = method.make_puzzles(_images(8, side=15))[1].tolist()  # the step's draws, replayed
    with torch.no_grad():
        method.classifier[-1].bias[labels[0]] += 100.0  # every puzzle is then called permutation labels[0]
    torch.manual_seed(2)
    out = method({"images": _images(8, side=15)})
    assert seen == [(72, 3, 5, 5)]  # 9 tiles x 8 puzzles, one backbone pass
    assert method.classifier[0].in_features == 9 * 16 and method.classifier[-1].out_features == 100
    assert float(out.metrics["jigsaw_acc"]) == pytest.approx(labels.count(labels[0]) / 8)
    assert math.isfinite(out.loss.item())
    seen.clear()
    feats = method.embed({"images": _images(4, side=15)})
    assert seen == [(36, 3, 5, 5)] and feats.shape == (4, 128)  # encode: the 9 tiles of each image
    hook.remove()
    resized = _identity_jigsaw(["method.tile_input_size=12", "method.tile_dim=0"])
    resized.backbone.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    resized({"images": _images(2, side=15)})
    assert seen[-1] == (18, 3, 12, 12) and resized.classifier[0].in_features == 9 * 128


def test_tile_features_average_the_central_tile_of_each_cell():
    # Kolesnikov et al. 2019's evaluation of patch models: 3x3 patches without jitter, each
    # standardized, features averaged. 16-px image: 5-px cells from pixel (16 - 15) // 2 = 0,
    # 3-px tiles at the cells' centres, offset (5 - 3) // 2 = 1: rows/cols 1, 6, 11
    method = _identity_jigsaw(["augment.views.0.size=16", "method.tile_size=3"]).eval()
    x = torch.randn(2, 3, 16, 16)
    tiles = torch.stack([x[:, :, r:r + 3, c:c + 3] for r in (1, 6, 11) for c in (1, 6, 11)], dim=1)
    flat = tiles.flatten(-2)
    normed = ((flat - flat.mean(-1, keepdim=True)) / (flat.std(-1, unbiased=False, keepdim=True) + 1e-5))
    with torch.no_grad():
        want = method.backbone(normed.view(18, 3, 3, 3)).view(2, 9, -1).mean(1)
        assert torch.allclose(method.encode(x), want, atol=1e-5)
        # raw tiles without tile_norm; the whole image with eval_input=image
        raw = _identity_jigsaw(["augment.views.0.size=16", "method.tile_size=3", "method.tile_norm=false"]).eval()
        want_raw = raw.backbone(tiles.flatten(0, 1)).view(2, 9, -1).mean(1)
        assert torch.allclose(raw.encode(x), want_raw, atol=1e-5)
        whole = _identity_jigsaw(["augment.views.0.size=16", "method.eval_input=image"]).eval()
        assert torch.allclose(whole.encode(x), whole.backbone(x))
    # JiGen's whole-image training evaluates whole images unless told otherwise
    assert _identity_jigsaw(["method.input=image", "method.tile_norm=false"]).encode(x).shape == (2, 128)
    with pytest.raises(ConfigError, match="eval_input=image"):
        method.encode(torch.randn(1, 3, 8, 8))  # 2-px cells cannot hold 3-px tiles


def test_image_input_feeds_the_reassembled_puzzle_to_one_backbone_pass():
    method = _identity_jigsaw(["method.input=image", "method.tile_norm=false"])
    seen = []
    method.backbone.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    images = _images(8, side=15)
    torch.manual_seed(0)
    out = method({"images": images})
    (x,) = seen
    assert x.shape == (8, 3, 15, 15)  # one 3x3 grid of 5-px tiles per image, not 72 tiles
    # the same draws again give the puzzle: cell i of the backbone's input holds tile perms[i], raw
    torch.manual_seed(0)
    puzzles, labels = method.make_puzzles(images)
    assert torch.equal(x, assemble_tiles(puzzles, 3))
    view = (images.float() / 255 - method.views[0].mean) / method.views[0].std
    cells = extract_tiles(view, *tile_positions(8, 15, grid=3, tile=5), 5)
    assert torch.allclose(unshuffle_tiles(puzzles, method.permutations[labels]), cells, atol=1e-5)
    assert not torch.allclose(puzzles, normalize_tiles(puzzles), atol=1e-2)  # tile_norm false: unnormalized
    assert method.classifier[0].in_features == 128 and method.classifier[-1].out_features == 100
    assert math.isfinite(out.loss.item()) and out.embeddings.shape == (8, 128)
    # the pretext gradient reaches the backbone
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())


def test_jigsaw_config_errors():
    with pytest.raises(ConfigError, match="n_permutations"):
        load_config(None, [*JIG_TINY, "method.n_permutations=20000"])  # more than the 10k pool
    with pytest.raises(ConfigError, match="perm_criterion"):
        load_config(None, [*JIG_TINY, "method.perm_criterion=max"])
    with pytest.raises(ConfigError, match="tile_size"):
        build_method(load_config(None, [*JIG_TINY, "method.tile_size=9"]))  # 5-px cells of a 16-px view
    with pytest.raises(ConfigError, match="method.input"):
        load_config(None, [*JIG_TINY, "method.input=tile"])
    with pytest.raises(ConfigError, match="method.eval_input"):
        load_config(None, [*JIG_TINY, "method.eval_input=patches"])
    with pytest.raises(ConfigError, match="only applies to method.input=tiles"):
        load_config(None, [*JIG_TINY, "method.input=image", "method.tile_input_size=12"])
    with pytest.raises(ConfigError, match="head_hidden_dim"):
        load_config(None, [*ROT_TINY, "method.head_hidden_dim=-1"])


# ---------------------------------------------------------------------------------------------
# recipes, CLI, resume


def test_recipes_carry_the_papers_numbers():
    rot = load_config(CONFIGS / "rotation" / "cifar10.yaml")
    assert (rot.optim.name, rot.optim.lr, rot.optim.weight_decay, rot.data.batch_size, rot.trainer.epochs) == (
        "sgd", 0.1, 5e-4, 128, 100)
    (view,) = rot.augment.views
    assert (view.jitter_p, view.grayscale_p, view.hflip_p) == (0.0, 0.0, 0.5) and rot.method.all_rotations
    rot_in = load_config(CONFIGS / "rotation" / "imagenet.yaml")
    assert (rot_in.backbone.name, rot_in.optim.lr, rot_in.trainer.epochs, rot_in.augment.views[0].size) == (
        "resnet50", 0.1, 30, 224)
    jig = load_config(CONFIGS / "jigsaw" / "imagenet.yaml")
    assert (jig.method.n_permutations, jig.method.tile_size, jig.method.channel_jitter, jig.method.hidden_dim) == (
        1000, 64, 2, 4096)
    assert jig.augment.views[0].size == 225 and jig.data.batch_size == 256  # 75-px cells
    jig_c = load_config(CONFIGS / "jigsaw" / "cifar10.yaml")
    assert (jig_c.method.n_permutations, jig_c.optim.lr, jig_c.optim.momentum) == (100, 0.01, 0.9)  # paper's SGD


@pytest.mark.parametrize("name", ["rotation", "jigsaw"])
def test_cli_trains_a_few_steps_from_the_recipe(tmp_path, name):
    tiny = [o for o in (ROT_TINY if name == "rotation" else JIG_TINY) if o != f"method.name={name}"]
    extra = ["method.tile_size=null"] if name == "jigsaw" else []  # the recipe's 9 px > 5-px cells
    train_recipe_two_steps(name, tmp_path, [*tiny, *extra])
    assert ("rot_acc" if name == "rotation" else "jigsaw_acc") in (tmp_path / "r" / "metrics.csv").read_text()


def test_jigsaw_export_says_how_its_features_are_read(tmp_path, capsys):
    from safetensors import safe_open

    tiny = [o for o in JIG_TINY if o != "method.name=jigsaw"]
    train_recipe_two_steps("jigsaw", tmp_path, [*tiny, "method.tile_size=null"])
    assert main(["export", str(tmp_path / "r"), str(tmp_path / "enc.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "note: jigsaw's evaluation feature is the mean of this backbone's features of the 3x3 grid's central 4-px " \
           "tiles, each normalized" in out
    with safe_open(str(tmp_path / "enc.safetensors"), framework="pt") as fh:
        assert "central 4-px tiles" in fh.metadata()["note"]
    # whole-image evaluation needs no note
    assert _identity_jigsaw(["method.eval_input=image"]).export_note() == ""


def test_jigsaw_resume_equals_uninterrupted(tmp_path):
    cfg = load_config(None, [*JIG_TINY, "trainer.max_steps=3"])
    ck, _ = resume_matches_straight(cfg, tmp_path, until_step=2)
    assert "permutations" in ck["model"]  # the set travels with the model


def test_methods_lists_rotation_and_jigsaw(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "rotation" in out and "Gidaris et al. 2018" in out
    assert "jigsaw" in out and "Noroozi & Favaro 2016" in out
