"""A step dropped for a non-finite loss leaves no trace.

For every registered method: one trainer takes a good step on a batch; a second, built the same
way, first gets the same batch with NaN views (as an overflow under reduced precision would give),
which it must drop, then takes the good step. The dropped step must leave the method's parameters
and buffers (queues, centres, EMA teachers, BatchNorm statistics, clocks) and the optimizer
bit-identical, and the two trainers must end bit-identical: the next good step trains exactly as if
the bad batch had never come.
"""

import pytest
import torch
from conftest import TINY
from test_barlow_vicreg import BT_TINY, VIC_TINY
from test_beit import RECIPE as BEIT_RECIPE
from test_beit import TINY as BEIT_TINY
from test_byol_simsiam import BYOL_TINY, SIMSIAM_TINY
from test_data2vec2 import D2V_TINY
from test_dinov2 import TINY as DINOV2_TINY
from test_ijepa import IJEPA_TINY
from test_mae import RECIPE as MAE_RECIPE
from test_mae import TINY as MAE_TINY
from test_moco import V2, V3
from test_rotation_jigsaw import JIG_TINY, ROT_TINY
from test_swav_dino import DINO_TINY, SWAV_TINY

from selfsup.config import load_config
from selfsup.pretext.augment import Augment
from selfsup.registry import METHODS, get_method
from selfsup.train.trainer import Trainer

# a tiny text run on the embedded tiny-shakespeare
TEXT_TINY = ["data.source=embedded-text", "data.tokenizer=char", "data.seq_len=16", "data.batch_size=4",
             "backbone.name=text_tiny", "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2",
             "optim.name=adamw", "optim.lr=1e-3", "optim.lr_scaling=none", "eval.final_knn=false"]

# a tiny PatchTST run on the embedded ETTh1 (dropout on: its masks must replay too)
SERIES_TINY = ["data.source=embedded-series", "data.seq_len=32", "data.batch_size=4", "backbone.name=patchtst",
               "backbone.patch_size=8", "backbone.embed_dim=16", "backbone.depth=1", "backbone.num_heads=2",
               "backbone.dropout=0.1", "optim.name=adamw", "optim.lr=1e-3", "optim.lr_scaling=none",
               "eval.final_knn=false"]

# a tiny audio ViT on the embedded spoken digits (half-second clips, 8 x 8 patches of a 32-filter log-mel)
AUDIO_TINY = ["data.source=embedded-audio", "data.clip_seconds=0.5", "data.batch_size=4", "backbone.name=audio_vit_tiny",
              "backbone.patch_size=8", "backbone.n_mels=32", "backbone.embed_dim=32", "backbone.depth=2",
              "backbone.num_heads=2", "backbone.pool=mean", "optim.name=adamw", "optim.lr=1e-3", "optim.lr_scaling=none",
              "eval.final_knn=false"]

# a tiny video ViT on the embedded moving-CIFAR clips (4 frames of 32 x 32 in 2 x 8 x 8 tubelets: a 2 x 4 x 4 grid)
VIDEO_TINY = ["data.source=embedded-video", "data.frames=4", "data.frame_size=32", "data.batch_size=4",
              "backbone.name=video_vit_tiny", "backbone.patch_size=8", "backbone.embed_dim=32", "backbone.depth=2",
              "backbone.num_heads=2", "optim.name=adamw", "optim.lr=1e-3", "optim.lr_scaling=none",
              "eval.final_knn=false"]

# (recipe, overrides) per method, with every piece of state switched on: SwAV's queue from the first
# step, DINOv2's centres (its default Sinkhorn centering keeps none)
RECIPES = {
    "simclr": (None, TINY),
    "mocov2": (None, V2),
    "mocov3": (None, V3),
    "byol": (None, BYOL_TINY),
    "simsiam": (None, SIMSIAM_TINY),
    "swav": (None, [*SWAV_TINY, "method.queue_length=32", "method.queue_start_epoch=0",
                    "method.freeze_prototypes_epochs=0"]),
    "dino": (None, DINO_TINY),
    "dinov2": (None, [*DINOV2_TINY, "method.centering=centering"]),
    "barlow_twins": (None, BT_TINY),
    "vicreg": (None, VIC_TINY),
    "rotation": (None, ROT_TINY),
    "jigsaw": (None, JIG_TINY),
    "mae": (MAE_RECIPE, MAE_TINY),
    "beit": (BEIT_RECIPE, BEIT_TINY),
    "ijepa": (None, IJEPA_TINY),
    "data2vec2": (None, D2V_TINY),
    **{name: (None, [f"method.name={name}", *TEXT_TINY]) for name in ("clm", "mlm", "t5")},
    "data2vec_text": (None, ["method.name=data2vec_text", "method.top_k=2", *TEXT_TINY]),
    "patchtst": (None, ["method.name=patchtst", *SERIES_TINY]),
    "ts_jepa": (None, ["method.name=ts_jepa", "method.pred_dim=16", *SERIES_TINY]),
    "ts_crossvar": (None, ["method.name=ts_crossvar", "method.decoder_dim=16", "method.decoder_heads=2", *SERIES_TINY]),
    "ts_forecast": (None, ["method.name=ts_forecast", "method.target=latent", "method.pred_dim=16", *SERIES_TINY]),
    "ts2vec": (None, ["method.name=ts2vec", *SERIES_TINY, "backbone.name=ts2vec", "backbone.width=8",
                      "backbone.depth=2"]),
    "audio_mae": (None, ["method.name=audio_mae", "method.decoder_dim=32", "method.decoder_depth=2",
                         "method.decoder_heads=2", *AUDIO_TINY]),
    "data2vec_audio": (None, ["method.name=data2vec_audio", "method.top_k=2", *AUDIO_TINY]),
    "videomae": (None, ["method.name=videomae", "method.decoder_dim=16", "method.decoder_depth=1",
                        "method.decoder_heads=2", *VIDEO_TINY]),
    "vjepa": (None, ["method.name=vjepa", "method.pred_dim=16", "method.pred_depth=1", *VIDEO_TINY]),
    "vjepa2": (None, ["method.name=vjepa2", "method.pred_dim=16", "method.pred_depth=1", "method.pred_heads=2",
                      "method.ema=[0.99,0.99]", *VIDEO_TINY, "backbone.pos_embed=rope", "backbone.embed_dim=36"]),
    "vjepa2_ac": (None, ["method.name=vjepa2_ac", "method.action_dim=2", "method.state_dim=2", "method.pred_dim=24",
                         "method.pred_depth=1", "method.pred_heads=2", *VIDEO_TINY, "backbone.pos_embed=rope"]),
}


def test_every_registered_method_is_covered():
    get_method("simclr")  # registers every method
    assert set(METHODS) == set(RECIPES)


def _trainer(name: str, path) -> Trainer:
    recipe, overrides = RECIPES[name]
    cfg = load_config(recipe, [*overrides, "trainer.precision=32", "trainer.device=cpu", "trainer.progress=false",
                               f"trainer.out_dir={path}"])
    trainer = Trainer(cfg, run_dir=path)
    trainer.attach_data()  # the method prepares on the data (BEiT's tokenizer) before any poisoning
    return trainer


def _poison(method: torch.nn.Module, on: dict) -> None:
    """While ``on["nan"]``, every augmented view comes out NaN (the methods make their views with
    ``Augment`` modules) and so does every input of the backbone's ``forward`` (jigsaw cuts its
    tiles itself); text methods: every token embedding (token ids cannot be NaN); series methods:
    every patch or timestamp embedding (PatchTST's BatchNorm statistics after it must not move, nor
    TS2Vec's weight average); audio methods: every spectrogram patch embedding; video methods: every
    tubelet embedding."""
    def nan(x):
        return torch.full_like(x, float("nan")) if on["nan"] else x

    if method.modality == "text":
        method.backbone.model.tok_embed.register_forward_hook(lambda module, args, out: nan(out))
        return
    if method.modality == "audio":  # every spectrogram patch embedding (the EMA teacher's own is not hooked)
        method.backbone.model.patch_embed.proj.register_forward_hook(lambda module, args, out: nan(out))
        return
    if method.modality == "video":  # every tubelet embedding (the EMA teacher's own is not hooked)
        method.backbone.model.patch_embed.proj.register_forward_hook(lambda module, args, out: nan(out))
        return
    if method.modality == "series":
        first = getattr(method.backbone.model, "patch_embed", None) or method.backbone.model.input_fc
        first.register_forward_hook(lambda module, args, out: nan(out))
        return
    hooked = [m.register_forward_hook(lambda module, args, out: nan(out))
              for m in method.modules() if isinstance(m, Augment)]
    assert hooked
    method.backbone.register_forward_pre_hook(lambda module, args: (nan(args[0]), *args[1:]))


def _state(trainer: Trainer) -> dict:
    opt = trainer.optimizer.state_dict()
    optim_tensors = {f"optim.{i}.{k}": v for i, st in opt["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    model = {f"model.{k}": v.clone() for k, v in trainer.method.state_dict().items() if torch.is_tensor(v)}
    return {**model, **optim_tensors,
            "position": torch.tensor([trainer.step, trainer.epoch])}


def _assert_identical(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    changed = [k for k in a if not torch.equal(a[k], b[k])]  # NaN != NaN: a poisoned buffer shows here
    assert not changed, f"{what}: {changed[:5]}"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_dropped_step_leaves_no_trace(tmp_path, name):
    ref = _trainer(name, tmp_path / "ref")
    batch = next(iter(ref.loader))
    ref_loss = ref.train_step([batch])[0]
    assert ref_loss is not None

    run = _trainer(name, tmp_path / "run")
    on = {"nan": True}
    _poison(run.method, on)
    before = _state(run)
    loss, metrics, *_ = run.train_step([batch])
    assert loss is None and metrics == {}
    _assert_identical(before, _state(run), "state changed by the dropped step")

    on["nan"] = False
    assert run.train_step([batch])[0] == ref_loss  # the next step trains as if nothing had happened
    _assert_identical(_state(ref), _state(run), "a dropped step changed what the next one did")
