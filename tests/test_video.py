"""The video modality: the tubelet ViT (3-D sin-cos positions and V-JEPA 2's RoPE against hand-computed values,
token dropping, divided attention), the training view, VideoMAE's and V-JEPA's losses against their definitions,
and the CLI path (pretrain, resume, kNN / attentive probes, export) on the embedded moving-CIFAR clips."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from selfsup.config import load_config
from selfsup.errors import ConfigError
from test_skipped_step import VIDEO_TINY

MAE_TINY = ["method.name=videomae", "method.decoder_dim=16", "method.decoder_depth=1", "method.decoder_heads=2",
            *VIDEO_TINY]
JEPA_TINY = ["method.name=vjepa", "method.pred_dim=16", "method.pred_depth=1", *VIDEO_TINY]
AC_TINY = ["method.name=vjepa2_ac", "method.action_dim=2", "method.state_dim=2", "method.pred_dim=24",
           "method.pred_depth=1", "method.pred_heads=2", *VIDEO_TINY, "backbone.pos_embed=rope"]
JEPA2_TINY = ["method.name=vjepa2", "method.pred_dim=16", "method.pred_depth=1", "method.pred_heads=2", *VIDEO_TINY,
              "backbone.pos_embed=rope", "backbone.embed_dim=36"]


def _clips(n=4, frames=4, side=32, seed=3):
    return torch.randint(0, 256, (n, frames, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _model(overrides, *extra):
    import selfsup

    torch.manual_seed(0)
    return selfsup.create(load_config(None, [*overrides, *extra, "trainer.precision=32"]))


# --------------------------------------------------------------------------------------
# the encoder


def test_3d_sincos_positions_match_a_hand_computed_token():
    from selfsup.nn.positions import sincos_3d_pos_embed

    table = sincos_3d_pos_embed(12, 2, 1, 3)  # uniform power: 2 * ceil(12 / 6) = 4 channels per axis
    assert table.shape == (1, 6, 12)
    t, h, w = 1, 0, 2  # index (t * 1 + h) * 3 + w = 5; per axis omega = (1, 1/100)
    want = [math.sin(t), math.sin(t / 100), math.cos(t), math.cos(t / 100),
            math.sin(h), math.sin(h / 100), math.cos(h), math.cos(h / 100),
            math.sin(w), math.sin(w / 100), math.cos(w), math.cos(w / 100)]
    assert torch.allclose(table[0, 5], torch.tensor(want), atol=1e-6)
    half = sincos_3d_pos_embed(8, 2, 2, 2, uniform_power=False)  # time dim/2, rows and columns dim/4
    assert torch.allclose(half[0, 4, :4], torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]))


def test_rope_rotates_pairs_with_the_official_tiled_angles():
    from selfsup.backbones.video import rope_3d

    x = torch.arange(1.0, 13.0).view(1, 1, 1, 12)  # head_dim 12: 4 channels per axis, omega = (1, 1/100)
    coords = torch.tensor([[[2.0, 3.0, 5.0]]])  # (t, h, w)
    out = rope_3d(x, coords)[0, 0, 0]
    want = []
    for axis, p in enumerate((2.0, 3.0, 5.0)):
        x0, x1, x2, x3 = x[0, 0, 0, 4 * axis: 4 * axis + 4].tolist()
        a = (p, p / 100, p, p / 100)  # channel j turns by frequency j mod 2 (vjepa2 modules.py, sines tiled)
        want += [x0 * math.cos(a[0]) - x1 * math.sin(a[0]), x1 * math.cos(a[1]) + x0 * math.sin(a[1]),
                 x2 * math.cos(a[2]) - x3 * math.sin(a[2]), x3 * math.cos(a[3]) + x2 * math.sin(a[3])]
    assert torch.allclose(out, torch.tensor(want), atol=1e-5)
    assert torch.equal(rope_3d(x, torch.zeros(1, 1, 3)), x)  # position 0 turns nothing


@pytest.mark.parametrize("pos", ["sincos", "learned", "rope"])
def test_token_dropping_keeps_each_token_its_position(pos):
    from selfsup.backbones.video import VideoViT

    torch.manual_seed(0)
    vit = VideoViT(img_size=16, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=24, depth=2, num_heads=2,
                   pos_embed=pos).eval()
    x = torch.randn(2, 3, 4, 16, 16)
    order = torch.randperm(8).expand(2, -1)
    with torch.no_grad():
        full = vit.tokens(x)
        permuted = vit.tokens(x, keep=order)  # the same tokens in another order: the same outputs, reordered
        assert torch.allclose(permuted, full[:, order[0]], atol=1e-5)
        assert vit(x).shape == (2, 24)


def test_patchify_lays_tubelets_out_frame_row_column_channel():
    from selfsup.backbones.video import VideoViT

    vit = VideoViT(img_size=8, num_frames=4, patch_size=4, tubelet_size=2, embed_dim=12, depth=1, num_heads=2)
    x = torch.randn(1, 3, 4, 8, 8)
    p = vit.patchify(x)
    assert p.shape == (1, 2 * 2 * 2, 2 * 4 * 4 * 3)
    # token 5 = (t 1, h 0, w 1): frames 2-3, rows 0-3, columns 4-7
    assert torch.equal(p[0, 5], x[0, :, 2:4, 0:4, 4:8].permute(1, 2, 3, 0).reshape(-1))
    assert torch.equal(vit.unpatchify(p), x)


def test_divided_attention_runs_whole_clips_and_refuses_dropped_tokens():
    from selfsup.backbones.video import VideoViT

    vit = VideoViT(img_size=16, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=24, depth=2, num_heads=2,
                   attention="divided")
    x = torch.randn(2, 3, 4, 16, 16)
    assert vit(x).shape == (2, 24) and "temporal_attn" in dict(vit.model.blocks[0].named_children())
    with pytest.raises(ConfigError, match="divided needs whole clips"):
        vit.tokens(x, keep=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="videomae drops the hidden tubelets"):
        _model(MAE_TINY, "backbone.attention=divided")


def test_the_training_view_crops_every_frame_alike_and_the_full_box_is_the_clip():
    from selfsup.modalities.video import crop_clips

    x = torch.rand(2, 3, 4, 8, 8)
    whole = torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 2)
    assert torch.allclose(crop_clips(x, whole, 8), x, atol=1e-5)
    assert torch.allclose(crop_clips(x, whole, 8, flip=torch.tensor([True, False]))[0], x[0].flip(-1), atol=1e-5)
    same = x[:, :, :1].expand(-1, -1, 4, -1, -1)  # a still clip stays still under any box
    out = crop_clips(same, torch.tensor([[0.4, 0.6, 0.5, 0.7]] * 2), 8)
    assert torch.allclose(out, out[:, :, :1].expand_as(out))


# --------------------------------------------------------------------------------------
# the methods


def test_videomae_targets_are_each_tubelet_channel_standardized():
    from selfsup.methods.videomae import videomae_targets

    patch = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 4.0, 8.0]]])  # 3 pixels x 2 channels, channel last
    out = videomae_targets(patch, channels=2)
    c0, c1 = torch.tensor([0.0, 2.0, 4.0]), torch.tensor([1.0, 3.0, 8.0])
    want = torch.stack([(c0 - 2.0) / (2.0 + 1e-6), (c1 - 4.0) / (math.sqrt(13.0) + 1e-6)], dim=1).reshape(-1)
    assert torch.allclose(out[0, 0], want, atol=1e-6)


def test_videomae_loss_is_the_mse_over_the_hidden_tubes():
    model = _model(MAE_TINY)
    crops = torch.rand(2, 3, 4, 32, 32)
    torch.manual_seed(5)
    pred, target, masks, latent = model.masked_forward(crops)
    assert masks.keep.shape == (2, 2 * 2) and masks.masked.shape == (2, 2 * 14)  # 90% of 16 per slice: 14
    hidden = masks.mask.view(2, 2, 16)
    assert torch.equal(hidden[:, 0], hidden[:, 1])  # tubes: the same positions in every slice
    from selfsup.methods.videomae import videomae_targets

    pixels = videomae_targets(model.backbone.patchify(crops))
    assert torch.allclose(target, torch.stack([pixels[b, masks.masked[b]] for b in range(2)]))
    assert pred.shape == target.shape and latent.shape == (2, 4, 32)


def test_vjepa_loss_is_the_mean_l1_to_the_layer_normed_targets_of_each_config():
    model = _model(JEPA_TINY)
    x = torch.randn(2, 3, 4, 32, 32)
    torch.manual_seed(7)
    masks = model.masks(2, model.backbone.grid_of(x), x.device)
    assert len(masks) == 2
    for m in masks:
        for b in range(2):
            assert not set(m.context[b].tolist()) & set(m.target[b].tolist())
    with torch.no_grad():
        h = model.target_backbone.tokens(x)
        h = F.layer_norm(h, (h.shape[-1],))
        losses = []
        for i, m in enumerate(masks):
            pred, _ = model.predict(x, m.context, m.target, i)
            want = torch.stack([h[b, m.target[b]] for b in range(2)])
            losses.append((pred - want).abs().mean())
    assert len(losses) == 2 and all(torch.isfinite(v) for v in losses)
    assert model.predictor.mask_token.shape == (2, 1, 16)  # one zero-initialized mask token per config
    future = _model(JEPA_TINY, "method.max_temporal_keep=0.5").masks(2, (2, 4, 4), x.device)
    for m in future:  # the second time slice (tokens 16-31) is never context, always hidden (before the official
        assert int(m.context.max()) < 16 and bool(m.hidden[:, 16:].all())  # truncation to the batch's shortest)
    assert torch.equal(model.predictor.mask_token, torch.zeros(2, 1, 16))


def test_vjepa2_rotates_encoder_and_predictor_and_keeps_a_constant_ema():
    from selfsup.core.method import Progress
    from selfsup.methods.vjepa import RoPEPredictor

    with pytest.raises(ConfigError, match="set backbone.pos_embed=rope"):
        _model(["method.name=vjepa2", "method.pred_dim=16", "method.pred_depth=1", "method.pred_heads=2", *VIDEO_TINY])
    model = _model(JEPA2_TINY)
    assert isinstance(model.predictor, RoPEPredictor) and model.backbone.pos_embed_for((2, 4, 4)) is None
    assert model.cfg.ema == (0.99925, 0.99925)
    assert model.momentum(Progress(step=1, total_steps=10, epoch=0, epochs=1, steps_per_epoch=10)) == 0.99925
    assert model.momentum(Progress(step=9, total_steps=10, epoch=0, epochs=1, steps_per_epoch=10)) == 0.99925
    x = torch.randn(2, 3, 4, 32, 32)
    m = model.masks(2, (2, 4, 4), x.device)[0]
    with torch.no_grad():
        pred, _ = model.predict(x, m.context, m.target, 0)
        assert pred.shape == (2, m.target.shape[1], 36)
        # the prediction at a target token depends on where it is: moving every token moves the output (once the
        # mask token is not zero: a zero query attends uniformly wherever it sits, as the official init has it)
        assert torch.allclose(pred[:, :1].expand_as(pred), pred, atol=1e-6)
        model.predictor.mask_token.normal_()
        pred, _ = model.predict(x, m.context, m.target, 0)
        shifted, _ = model.predict(x, m.context, (m.target + 1) % 32, 0)
        assert not torch.allclose(pred, shifted)
    loss, metrics = model({"video": _clips()})
    assert torch.isfinite(loss) and "vjepa2/target_token_std" in metrics


def test_wsd_schedule_warms_up_holds_and_cools_down():
    from selfsup.nn.schedules import wsd_schedule

    values = [wsd_schedule(s, 100, 1.0, 0.0, warmup_steps=10, warmup_start=0.2, cooldown_steps=20) for s in range(101)]
    assert values[0] == 0.2 and values[5] == pytest.approx(0.6) and values[10] == 1.0 and values[79] == 1.0
    assert values[80] == 1.0 and values[90] == pytest.approx(0.5) and values[100] == 0.0
    assert wsd_schedule(50, 100, 1.0, 0.0, warmup_steps=10) == 1.0  # no cooldown: constant after the warmup
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(None, ["optim.schedule=step"])


def test_the_attentive_probe_finds_the_one_token_that_carries_the_class():
    from selfsup.eval.attentive import attentive_probe

    g = torch.Generator().manual_seed(0)

    def tokens(n):  # 8 noise tokens; one, at a random place, holds a marker and its class's direction
        x = torch.randn(n, 8, 16, generator=g)
        y = torch.randint(0, 4, (n,), generator=g)
        where = torch.randint(0, 8, (n,), generator=g)
        x[torch.arange(n), where] = 0.0
        x[torch.arange(n), where, 0] = 4.0
        x[torch.arange(n), where, 1 + y] = 4.0
        return x, y

    train, test = tokens(512), tokens(256)
    result = attentive_probe(*train, *test, epochs=15, lrs=(3e-3,), batch_size=32, num_heads=4)
    assert result["top1"] > 90 and result["heads"] == 4 and result["lr"] == 3e-3
    again = attentive_probe(*train, *test, epochs=15, lrs=(3e-3,), batch_size=32, num_heads=4)
    assert again["top1"] == result["top1"]  # deterministic for a seed
    chosen = attentive_probe(*train, *test, epochs=3, lrs=(1e-6, 3e-3), batch_size=32, num_heads=4)
    assert chosen["lr"] == 3e-3 and set(chosen["validation_top1_by_lr"]) == {"1e-06", "0.003"}


def test_the_world_model_is_block_causal_and_its_loss_is_teacher_forcing_plus_rollout():
    from selfsup.data.video import make_moving_clips
    from selfsup.methods.vjepa2_ac import block_causal_mask

    assert block_causal_mask(3, 2).int().tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                                                      [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    model = _model(AC_TINY).eval()
    assert not any(p.requires_grad for p in model.backbone.parameters())  # the frame encoder is frozen
    torch.manual_seed(1)
    tokens, actions, states = torch.randn(2, 3, 16, 32), torch.randn(2, 3, 2), torch.randn(2, 3, 2)
    with torch.no_grad():
        out = model.predictor(tokens, actions, states)
        later = tokens.clone()
        later[:, 2] += 1.0
        moved = actions.clone()
        moved[:, 1] += 1.0
        # frame 2's tokens change nothing before it; frame 1's action changes frames 1 and 2, not frame 0
        assert torch.allclose(model.predictor(later, actions, states)[:, :2], out[:, :2], atol=1e-5)
        other = model.predictor(tokens, moved, states)
        assert torch.allclose(other[:, 0], out[:, 0], atol=1e-5) and not torch.allclose(other[:, 1], out[:, 1])
    batch = make_moving_clips("test", frames=4, size=32).gather(torch.arange(3))
    a, s = model.actions_states(batch)
    assert torch.equal(a, batch["motion"]) and torch.equal(s[:, 0], torch.zeros(3, 2))
    assert torch.equal(s[:, 3], batch["motion"].sum(1))  # the state is the displacement since frame 0
    with torch.no_grad():
        loss, metrics = model(batch)
        h = model.frame_tokens(model.preprocess(batch))
        z_tf = model.predict_next(h[:, :-1], a, s[:, :-1])
        ro = model.rollout(h[:, 0], a[:, :2], s[:, :2])  # frames 1 and 2 from frame 0's tokens alone
    assert torch.allclose(metrics["vjepa2_ac/teacher_forcing"], (z_tf - h[:, 1:]).abs().mean(), atol=1e-6)
    assert torch.allclose(ro[:, 0], z_tf[:, 0], atol=1e-5)  # step 1 of the rollout is teacher forcing's frame 1
    assert torch.allclose(metrics["vjepa2_ac/rollout"], (ro - h[:, 1:3]).abs().mean(), atol=1e-5)
    assert torch.allclose(loss, metrics["vjepa2_ac/teacher_forcing"] + metrics["vjepa2_ac/rollout"])
    with pytest.raises(ConfigError, match="trains on clips with actions"):
        model({"video": batch["video"]})


def test_the_cross_entropy_method_finds_the_action_that_reaches_the_goal():
    from types import SimpleNamespace

    from selfsup.eval.planning import cem_plan, direction_of

    class Shift:  # a known world: every action moves all tokens by (dy, dx) in their first two features
        cfg = SimpleNamespace(action_dim=2)

        def rollout(self, first, actions, states):
            steps = actions.cumsum(1)  # (B, k, 2)
            out = first.unsqueeze(1).repeat(1, actions.shape[1], 1, 1)
            out[..., :2] += steps[:, :, None, :]
            return out

    first = torch.zeros(3, 4, 8)
    want = torch.tensor([[1.0, -2.0], [-1.5, 0.5], [2.0, 2.0]])  # per step, over 2 steps
    goal = first.clone()
    goal[..., :2] += 2 * want[:, None, :]
    plan = cem_plan(Shift(), first, torch.zeros(3, 2), goal, horizon=2, samples=200, iterations=8, top_k=20,
                    max_norm=2.5, generator=torch.Generator().manual_seed(0))
    assert plan.shape == (3, 2, 2) and torch.allclose(plan.sum(1), 2 * want, atol=0.3)
    assert direction_of(torch.tensor([[0.0, 1.0], [-1.0, 1.0], [-1.0, 0.0], [1.0, -1.0]])).tolist() == [0, 1, 2, 5]


def test_video_methods_refuse_other_encoders_data_and_clip_lengths():
    with pytest.raises(ConfigError, match="image encoder"):
        load_config(None, [*MAE_TINY, "backbone.name=vit_tiny"])
    with pytest.raises(ConfigError, match="video"):
        load_config(None, ["method.name=simclr", "data.source=embedded-video"])
    model = _model(MAE_TINY)
    with pytest.raises(ConfigError, match="clips of 6 frames, but the encoder was built for 4"):
        model({"video": _clips(frames=6)})
    with pytest.raises(ConfigError, match=r"\(B, T, 3, H, W\)"):
        model({"video": torch.zeros(2, 4, 32, 32)})


# --------------------------------------------------------------------------------------
# the CLI path


@pytest.mark.parametrize("name", ["videomae", "vjepa", "vjepa2", "vjepa2_ac"])
def test_video_methods_resume_exactly(tmp_path, name):
    from tests.conftest import resume_matches_straight

    overrides = {"videomae": MAE_TINY, "vjepa": JEPA_TINY, "vjepa2": JEPA2_TINY, "vjepa2_ac": AC_TINY}[name]
    cfg = load_config(None, [*overrides, "data.limit=32", "trainer.max_steps=6", f"trainer.out_dir={tmp_path}"])
    resume_matches_straight(cfg, tmp_path, until_step=3)


def test_pretrain_probe_direction_attentively_and_export_from_the_cli(tmp_path, capsys):
    from selfsup.cli import main
    from selfsup.evaluate import load_method
    from selfsup.export import load_encoder

    over = [*JEPA_TINY, f"trainer.out_dir={tmp_path}", "trainer.max_steps=3", "trainer.run_name=r",
            "eval.final_knn=true", "eval.random_init_seeds=1", "eval.knn_k=[5]", "trainer.progress=false"]
    assert main(["pretrain", *over]) == 0
    out = capsys.readouterr()
    assert "2,000 clips of 4 frames at 32x32" in out.out + out.err
    run = tmp_path / "r"
    knn = json.loads((run / "summary.json").read_text())["knn"]
    assert (knn["bank_samples"], knn["test_samples"]) == (2000, 512)
    assert main(["eval", "attentive", "--checkpoint", str(run), "--device", "cpu", "--epochs", "2"]) == 0
    att = json.loads((run / "eval_attentive.json").read_text())
    assert att["tokens_per_sample"] == 2 * 4 * 4 and att["test_samples"] == 512 and 0 <= att["top1"] <= 100
    assert main(["eval", "attentive", "--checkpoint", str(run), "--epochs", "0"]) != 0
    assert "--epochs must be at least 1, got 0" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "enc.safetensors")]) == 0
    assert "tubelets" in capsys.readouterr().out
    enc = load_encoder(tmp_path / "enc.safetensors").eval()
    method, _, _ = load_method(run)
    clips = _clips()
    with torch.no_grad():
        assert torch.allclose(enc(method.preprocess({"video": clips})), method.embed({"video": clips}), atol=1e-5)


def test_the_report_draws_videomae_reconstructions_as_frame_grids(tmp_path):
    from selfsup.cli import main

    over = [*MAE_TINY, f"trainer.out_dir={tmp_path}", "trainer.max_steps=2", "trainer.run_name=r", "trainer.progress=false"]
    assert main(["pretrain", *over]) == 0
    run = tmp_path / "r"
    assert main(["report", str(run), "--max-points", "200"]) == 0
    assert (run / "report" / "reconstruction.png").stat().st_size > 20_000
    from selfsup.evaluate import load_method

    method, _, _ = load_method(run)
    x = method.preprocess({"video": _clips(2)})
    masked, recon = method.reconstruct(x)
    hidden = torch.isnan(masked)
    assert hidden.any() and not torch.isnan(recon).any()
    visible = ~hidden  # the visible tubelets are the clip itself in both
    from selfsup.pretext.augment import IMAGENET_MEAN, IMAGENET_STD

    rgb = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    assert torch.allclose(recon[visible], rgb.clamp(0, 1)[visible], atol=1e-5)


def test_a_vjepa2_encoder_exports_to_transformers_vjepa2model(tmp_path, capsys):
    from selfsup.cli import main
    from selfsup.errors import ExportError
    from selfsup.evaluate import load_method
    from selfsup.export import export_encoder

    transformers = pytest.importorskip("transformers")
    run = tmp_path / "r"
    assert main(["pretrain", *JEPA2_TINY, f"trainer.out_dir={tmp_path}", "trainer.max_steps=2", "trainer.run_name=r",
                 "trainer.progress=false"]) == 0
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert "transformers names" in capsys.readouterr().out
    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "VJEPA2Model"
    method, _, _ = load_method(run)
    clips = _clips()
    with torch.no_grad():
        x = method.preprocess({"video": clips})
        tokens = hf(pixel_values_videos=x.permute(0, 2, 1, 3, 4), skip_predictor=True).last_hidden_state
        assert torch.allclose(tokens.mean(1), method.embed({"video": clips}), atol=1e-5)
    plain = tmp_path / "p"
    assert main(["pretrain", *JEPA_TINY, f"trainer.out_dir={tmp_path}", "trainer.max_steps=1", "trainer.run_name=p",
                 "trainer.progress=false"]) == 0
    with pytest.raises(ExportError, match="this one has sincos positions"):
        export_encoder(plain, tmp_path / "hf_sincos")
    assert not (tmp_path / "hf_sincos").exists()


FRANKA = Path(__file__).resolve().parents[2] / "shared" / "data" / "video" / "vjepa2_franka_example_traj.npz"


@pytest.mark.skipif(not FRANKA.exists(), reason="../shared/data/video/vjepa2_franka_example_traj.npz is not beside the repo")
def test_the_world_model_fits_and_plans_on_the_official_franka_trajectory():
    """V-JEPA 2-AC's own example (2 frames of a Franka arm at 256 px, 7-D end-effector states): the world model fits
    the step from frame 0 to frame 1 under its action (the state difference), and the planner returns a bounded
    7-D action toward the goal frame."""
    import numpy as np

    from selfsup.eval.planning import cem_plan

    data = np.load(FRANKA)
    video = torch.from_numpy(data["observations"]).permute(0, 1, 4, 2, 3).contiguous()  # (1, 2, 3, 256, 256)
    states = torch.from_numpy(data["states"]).float()  # (1, 2, 7)
    batch = {"video": video, "states": states, "actions": states[:, 1:] - states[:, :1]}
    model = _model(["method.name=vjepa2_ac", "method.action_dim=7", "method.state_dim=7", "method.pred_dim=24",
                    "method.pred_depth=1", "method.pred_heads=2", "method.rollout_steps=1", "data.frames=2",
                    "data.frame_size=32", "backbone.name=video_vit_tiny", "backbone.patch_size=8", "backbone.embed_dim=32",
                    "backbone.depth=1", "backbone.num_heads=2", "backbone.pos_embed=rope", "data.source=embedded-video"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        tokens = model.frame_tokens(model.preprocess(batch))
    plan = cem_plan(model, tokens[:, 0], states[:, 0], tokens[:, 1], horizon=1, samples=50, iterations=3, top_k=5,
                    max_norm=0.075, generator=torch.Generator().manual_seed(0))
    assert plan.shape == (1, 1, 7) and bool((plan.abs() <= 0.075).all())
