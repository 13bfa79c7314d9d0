"""Typed configs, YAML recipes with inheritance, and dotted command-line overrides.

A recipe is a YAML file whose optional ``base:`` key names another recipe (a path relative
to the file, or a list of them); the recipe's keys are deep-merged over its bases. Dotted
overrides from the command line (``optim.lr=0.5 augment.views.0.size=64``) are merged last.
The merged dict is then turned into typed dataclasses; an unknown key is an error that lists
the valid ones, and every section's ``validate()`` rejects out-of-range values before training.

The ``method`` section is typed by the chosen method's own ``Config`` dataclass (found in the
registry by ``method.name``), so each method declares and validates its hyperparameters.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from selfsup.errors import ConfigError
from selfsup.pretext.augment import AugmentConfig, simclr_view
from selfsup.pretext.series_augment import SERIES_STRONG, SERIES_WEAK, SeriesViewConfig

# --------------------------------------------------------------------------------------
# sections


@dataclass
class DataConfig:
    """Where the images come from. ``source`` is ``embedded``, ``cifar10``, ``cifar100``,
    ``stl10`` or a directory (ImageFolder with class subfolders, or a flat folder)."""

    source: str = "embedded"
    root: str | None = None  # download/cache root for torchvision datasets
    train_split: str = "train"  # split used for pretraining (and as the kNN bank)
    test_split: str = "test"  # split used for evaluation queries
    decode_size: int | None = None  # resize+center-crop decoded images to this side
    batch_size: int = 256  # global batch per optimizer step, across ranks and accumulation
    eval_batch_size: int = 512
    download: bool = True
    limit: int | None = None  # keep only the first N training samples (smoke runs)
    # memory: decode the set once into RAM; stream: decode each file in loader workers (folders);
    # auto: memory when the decoded set fits memory_budget_gib, else stream (data/modes.py)
    mode: str = "auto"
    memory_budget_gib: float | None = None  # auto's budget (default: min(8 GiB, a quarter of RAM))
    workers: int | None = None  # stream: DataLoader worker processes (default: one per core, at most 8)
    max_side: int | None = 512  # stream: shrink larger images to this long side, keeping aspect (null: none)
    # text (selfsup.modalities.text): the tokenizer (char | bpe | wordpiece, trained on the training
    # split and cached, or a tokenizer.json path; null: the method's default kind), its vocabulary
    # size when trained, the tokens per training sequence, and the columns of JSONL/TSV/CSV files
    tokenizer: str | None = None
    tokenizer_vocab: int = 8192
    seq_len: int = 128
    text_column: str | None = None  # default: "text"/"sentence", else the first column
    label_column: str | None = None  # default: "label", else the last column of a TSV/CSV
    # audio (selfsup.data.audio): every recording resampled to sample_rate Hz (null: the rate most files
    # have) and cut or zero-padded to clip_seconds (null: the shortest 0.25 s multiple holding 95% of them)
    sample_rate: int | None = None
    clip_seconds: float | None = None
    # video (selfsup.data.video): clips of `frames` frames taken every `frame_stride` frames (a random start in
    # training, the centred clip in evaluation), each frame resized on its shorter side and centre-cropped to
    # frame_size (null: backbone.img_size, else 224); decoded with PyAV (video_decoder: pyav | torchcodec)
    frames: int = 16
    frame_stride: int = 4
    frame_size: int | None = None
    video_decoder: str = "pyav"

    def validate(self) -> None:
        _check(self.mode in ("auto", "memory", "stream", "shards"), "data.mode", self.mode,
               "must be auto, memory, stream or shards")
        if self.memory_budget_gib is not None:
            _check(self.memory_budget_gib > 0, "data.memory_budget_gib", self.memory_budget_gib, "must be > 0")
        if self.workers is not None:
            _check(self.workers >= 0, "data.workers", self.workers, "must be >= 0 (0: decode in the main process)")
        if self.max_side is not None:
            _check(self.max_side >= 8, "data.max_side", self.max_side, "must be >= 8 (or null for no cap)")
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        _check(self.eval_batch_size >= 1, "data.eval_batch_size", self.eval_batch_size, "must be >= 1")
        if self.limit is not None:
            _check(self.limit >= 1, "data.limit", self.limit, "must be >= 1")
        if self.decode_size is not None:
            _check(self.decode_size >= 8, "data.decode_size", self.decode_size, "must be >= 8")
        _check(self.tokenizer_vocab >= 64, "data.tokenizer_vocab", self.tokenizer_vocab, "must be >= 64")
        _check(self.seq_len >= 2, "data.seq_len", self.seq_len, "must be >= 2")
        if self.sample_rate is not None:
            _check(self.sample_rate >= 1000, "data.sample_rate", self.sample_rate, "must be >= 1000 Hz (or null)")
        _check(self.frames >= 1, "data.frames", self.frames, "must be >= 1")
        _check(self.frame_stride >= 1, "data.frame_stride", self.frame_stride, "must be >= 1")
        if self.frame_size is not None:
            _check(self.frame_size >= 8, "data.frame_size", self.frame_size, "must be >= 8 (or null)")
        _check(self.video_decoder in ("pyav", "torchcodec"), "data.video_decoder", self.video_decoder,
               "must be pyav or torchcodec")
        if self.clip_seconds is not None:
            _check(self.clip_seconds > 0, "data.clip_seconds", self.clip_seconds, "must be > 0 (or null)")


@dataclass
class BackboneConfig:
    """The encoder. ``name`` is a registered backbone (``selfsup methods`` lists them) or
    ``timm:<model_name>`` for any timm model built without a classifier head."""

    name: str = "resnet18"
    cifar_stem: bool = False  # 3x3 stride-1 first conv and no max-pool (for 32-px images)
    width: int = 64  # ResNets: channels of the first stage (64 = torchvision's; stages double it)
    zero_init_residual: bool = False  # ResNets: zero the last BN scale of each block (SimSiam app. A)
    img_size: int | None = None  # ViTs: input side (default: the first view's crop size)
    patch_size: int | None = None  # ViTs: patch side (vit_*: default 16); patchtst: steps per patch (12)
    patch_stride: int | None = None  # patchtst: steps between patch starts (default: patch_size, no overlap)
    in_chans: int | None = None  # series encoders that mix channels (ts2vec): input channels, fixed from the data
    drop_path: float = 0.0
    # vit_tiny / vit_small / vit_base / vit_large (backbones/vit.py)
    pos_embed: str = "sincos"  # fixed 2-D sin-cos (MAE, I-JEPA, MoCo v3) or "learned"
    pool: str = "cls"  # pooled feature: final-normed CLS token, or "mean" of the patch tokens
    grad_checkpointing: bool = False  # recompute block activations in backward (less memory)
    layer_scale: float | None = None  # ViTs: LayerScale (CaiT) on each residual branch, this initial value
    # text encoders (text_tiny ... text_base, backbones/text.py)
    vocab_size: int | None = None  # filled in from the tokenizer
    max_len: int | None = None  # positions (default: data.seq_len)
    norm: str | None = None  # pre or post-norm blocks; null: the encoder's own (text: pre, GPT-2; patchtst: post)
    bias: bool = True  # Linear and LayerNorm biases (nanoGPT's shakespeare_char: false)
    dropout: float = 0.0
    tokenizer: str | None = None  # the tokenizer file the encoder embeds (filled in from data.tokenizer)
    # audio encoders (audio_vit_*, backbones/audio.py): a log-mel spectrogram of n_mels filters every 10 ms
    # (max_len: the clip's samples, fixed from the data like sample_rate), normalized as Audio-MAE with the
    # [mean, std] of the training recordings' log-mels (spec_norm, fixed from the data)
    n_mels: int = 128
    sample_rate: int | None = None
    spec_norm: list[float] | None = None
    # video encoders (video_vit_*, backbones/video.py): clips of num_frames frames (fixed from data.frames) cut
    # into tubelet_size x patch_size x patch_size tubelets; joint space-time or divided (TimeSformer) attention
    num_frames: int | None = None
    tubelet_size: int = 2
    attention: str = "joint"
    depth: int | None = None  # override the size's number of blocks
    embed_dim: int | None = None  # override the size's width
    num_heads: int | None = None  # override the size's attention heads
    # start from the encoder of another run: its directory, a .ckpt or an exported .safetensors
    # (`selfsup pretrain --init PATH`); keys are matched by name and the mismatches reported
    init: str | None = None

    def validate(self) -> None:
        _check(0.0 <= self.drop_path < 1.0, "backbone.drop_path", self.drop_path, "must be in [0, 1)")
        _check(self.width >= 4, "backbone.width", self.width, "must be >= 4")
        _check(self.pos_embed in ("sincos", "learned", "rotary", "rope"), "backbone.pos_embed", self.pos_embed,
               "must be sincos, learned, rotary (text encoders) or rope (video encoders)")
        _check(self.pos_embed != "rope" or self.name.startswith("video_vit"), "backbone.pos_embed", self.pos_embed,
               f"is V-JEPA 2's 3-D rotary embedding of the video encoders (video_vit_*), not of {self.name}")
        _check(self.attention in ("joint", "divided"), "backbone.attention", self.attention, "must be joint or divided")
        _check(self.tubelet_size >= 1, "backbone.tubelet_size", self.tubelet_size, "must be >= 1")
        _check(self.norm in (None, "pre", "post"), "backbone.norm", self.norm, "must be pre or post (or null)")
        _check(0.0 <= self.dropout < 1.0, "backbone.dropout", self.dropout, "must be in [0, 1)")
        _check(self.pool in ("cls", "mean"), "backbone.pool", self.pool, "must be cls or mean")
        if self.layer_scale is not None:
            _check(self.layer_scale > 0, "backbone.layer_scale", self.layer_scale,
                   "must be > 0 (BEiT 0.1, DINOv2 1e-5), or null for none")
        _check(self.n_mels >= 8, "backbone.n_mels", self.n_mels, "must be >= 8")
        if self.spec_norm is not None:
            _check(len(self.spec_norm) == 2 and self.spec_norm[1] > 0, "backbone.spec_norm", self.spec_norm,
                   "must be [mean, std] with std > 0 (or null: measured on the training data)")
        for key in ("img_size", "num_frames", "patch_size", "sample_rate", "patch_stride", "in_chans", "depth", "embed_dim", "num_heads", "vocab_size", "max_len"):
            value = getattr(self, key)
            if value is not None:
                _check(value >= 1, f"backbone.{key}", value, "must be >= 1 (or null for the default)")
        if self.embed_dim is not None and self.num_heads is not None:
            _check(self.embed_dim % self.num_heads == 0, "backbone.embed_dim", self.embed_dim,
                   f"must be divisible by backbone.num_heads={self.num_heads}")
        if self.img_size is not None and self.patch_size is not None:
            _check(self.img_size % self.patch_size == 0, "backbone.img_size", self.img_size,
                   f"must be a multiple of backbone.patch_size={self.patch_size}")


@dataclass
class AugmentSection:
    """The views a method trains on: ``views`` are the global crops (two for most methods),
    ``local`` is the multi-crop small-crop recipe, repeated ``n_local`` times."""

    views: list[AugmentConfig] = field(
        default_factory=lambda: [simclr_view(32, strength=0.5, blur=False)] * 2
    )
    local: AugmentConfig | None = None
    n_local: int = 0
    # the views of series for the joint-embedding methods on a series encoder (pretext/series_augment.py):
    # TS-TCC's weak (scaling) and strong (permutation, jitter) views by default
    series: list[SeriesViewConfig] = field(default_factory=lambda: [replace(SERIES_WEAK), replace(SERIES_STRONG)])

    def validate(self) -> None:
        _check(len(self.views) >= 1, "augment.views", len(self.views), "needs at least one view")
        for i, v in enumerate(self.views):
            _validate_nested(v, f"augment.views.{i}")
        for i, v in enumerate(self.series):
            _validate_nested(v, f"augment.series.{i}")
        _check(self.n_local >= 0, "augment.n_local", self.n_local, "must be >= 0")
        if self.n_local > 0:
            if self.local is None:
                raise ConfigError("augment.n_local > 0 needs an augment.local view recipe")
            _validate_nested(self.local, "augment.local")


@dataclass
class OptimConfig:
    """Optimizer and schedules. ``lr`` is the base rate at ``ref_batch``; the rate used is
    scaled by ``lr_scaling`` (``linear``: lr * batch / ref_batch, as in SimCLR/BYOL/MAE;
    ``sqrt``: lr * sqrt(batch / ref_batch); ``none``). LR: linear warmup from ``warmup_start_lr``
    (not scaled; I-JEPA's official schedule starts at 2e-4) then cosine to ``min_lr`` per step (``schedule: cosine``),
    or constant with a linear decay to ``min_lr`` over the last ``cooldown_epochs`` (``schedule: wsd``, V-JEPA 2).
    Weight decay: cosine from ``weight_decay`` to ``weight_decay_end``."""

    name: str = "lars"  # lars | sgd | adamw
    lr: float = 0.3
    lr_scaling: str = "linear"
    ref_batch: int = 256
    min_lr: float = 0.0
    warmup_epochs: float = 10.0
    warmup_steps: int | None = None  # warm-up in optimizer steps instead (language-model recipes count steps)
    warmup_start_lr: float = 0.0
    schedule: str = "cosine"  # cosine | wsd (warmup, constant, linear cooldown over the last cooldown_epochs)
    cooldown_epochs: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-6
    weight_decay_end: float | None = None
    exclude_bias_norm: bool = True  # no weight decay (and no LARS adaptation) on biases and norms
    lars_eta: float = 0.001
    lars_clip: bool = False  # LARC clip mode: a layer's rate is min(eta ||w||/||g||, lr) (solo-learn's CIFAR LARS)
    grad_clip: float | None = None
    # layer-wise lr decay (BEiT / MAE fine-tuning, DINOv2): a ViT backbone parameter of layer i
    # (0 = embeddings, depth + 1 = final norm) gets lr x layer_decay ** (depth + 1 - i); heads x 1
    layer_decay: float = 1.0
    bias_norm_lr_scale: float = 1.0  # lr multiplier of the no-decay group (Barlow Twins: 0.0048 / 0.2)

    def validate(self) -> None:
        _check(self.name in ("lars", "sgd", "adamw"), "optim.name", self.name, "must be lars, sgd or adamw")
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _check(self.lr_scaling in ("linear", "sqrt", "none"), "optim.lr_scaling", self.lr_scaling,
               "must be linear, sqrt or none")
        _check(self.ref_batch >= 1, "optim.ref_batch", self.ref_batch, "must be >= 1")
        _check(self.min_lr >= 0, "optim.min_lr", self.min_lr, "must be >= 0")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, "must be >= 0")
        if self.warmup_steps is not None:
            _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0 (or null: warmup_epochs)")
        _check(self.warmup_start_lr >= 0, "optim.warmup_start_lr", self.warmup_start_lr, "must be >= 0")
        _check(self.schedule in ("cosine", "wsd"), "optim.schedule", self.schedule, "must be cosine or wsd")
        _check(self.cooldown_epochs >= 0, "optim.cooldown_epochs", self.cooldown_epochs, "must be >= 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        if self.weight_decay_end is not None:
            _check(self.weight_decay_end >= 0, "optim.weight_decay_end", self.weight_decay_end, "must be >= 0")
        if self.grad_clip is not None:
            _check(self.grad_clip > 0, "optim.grad_clip", self.grad_clip, "must be > 0 (or null for none)")
        _check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "must be in [0, 1)")
        _check(0 < self.layer_decay <= 1, "optim.layer_decay", self.layer_decay, "must be in (0, 1] (1: off)")
        _check(self.bias_norm_lr_scale > 0, "optim.bias_norm_lr_scale", self.bias_norm_lr_scale, "must be > 0")

    def scaled_lr(self, batch_size: int) -> float:
        ratio = batch_size / self.ref_batch
        if self.lr_scaling == "linear":
            return self.lr * ratio
        if self.lr_scaling == "sqrt":
            return self.lr * ratio**0.5
        return self.lr


@dataclass
class TrainerConfig:
    """The loop: how long, on what, at which precision, and where the run directory goes."""

    epochs: int = 100
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | 32 | bf16-mixed | 16-mixed
    channels_last: bool = True
    accumulate: int = 1  # micro-batches per optimizer step
    seed: int = 0
    out_dir: str = "runs"
    run_name: str | None = None
    ckpt_every: int = 0  # also keep epoch_N.ckpt every N epochs (0: only last.ckpt)
    log_every: int = 10  # steps between CSV/TensorBoard rows
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    progress: bool = True
    threads: int | None = None  # torch intra-op threads on CPU (default: torch's choice)
    monitor_every: int = 50  # steps between collapse-monitor rank estimates
    sync_bn: bool = False  # multi-process: BatchNorm statistics over all ranks (SyncBatchNorm)

    def validate(self) -> None:
        _check(self.epochs >= 1, "trainer.epochs", self.epochs, "must be >= 1")
        if self.max_steps is not None:
            _check(self.max_steps >= 1, "trainer.max_steps", self.max_steps, "must be >= 1")
        _check(self.precision in ("auto", "32", "bf16-mixed", "16-mixed"), "trainer.precision",
               self.precision, "must be auto, 32, bf16-mixed or 16-mixed")
        _check(self.accumulate >= 1, "trainer.accumulate", self.accumulate, "must be >= 1")
        _check(self.ckpt_every >= 0, "trainer.ckpt_every", self.ckpt_every, "must be >= 0")
        _check(self.log_every >= 1, "trainer.log_every", self.log_every, "must be >= 1")
        _check(self.max_bad_steps >= 1, "trainer.max_bad_steps", self.max_bad_steps, "must be >= 1")
        _check(self.monitor_every >= 1, "trainer.monitor_every", self.monitor_every, "must be >= 1")


@dataclass
class EvalConfig:
    """Evaluation run at the end of pretraining (and by ``selfsup eval``)."""

    knn_k: list[int] = field(default_factory=lambda: [20, 200])
    knn_temperature: float = 0.07
    final_knn: bool = True  # kNN of the trained encoder when pretraining ends
    compare_random_init: bool = True  # and of the same encoder at random init, for contrast
    # random inits to average (seeds trainer.seed, +1, ...): one init's kNN varies by ~3 points
    random_init_seeds: int = 3
    online_every: int = 0  # kNN on the labeled test split every N epochs during pretraining (0: off)
    # a long time series (no labels): pretraining ends with forecasting at these horizons instead of
    # kNN, a linear head on the frozen encoder (selfsup eval forecast), trained this many epochs
    forecast_horizons: list[int] = field(default_factory=lambda: [96])
    forecast_epochs: int = 20

    def validate(self) -> None:
        _check(len(self.knn_k) >= 1 and all(k >= 1 for k in self.knn_k), "eval.knn_k", self.knn_k,
               "must be a non-empty list of positive integers")
        _check(self.knn_temperature > 0, "eval.knn_temperature", self.knn_temperature, "must be > 0")
        _check(len(self.forecast_horizons) >= 1 and all(h >= 1 for h in self.forecast_horizons),
               "eval.forecast_horizons", self.forecast_horizons, "must be a non-empty list of positive integers")
        _check(self.forecast_epochs >= 1, "eval.forecast_epochs", self.forecast_epochs, "must be >= 1")
        _check(self.online_every >= 0, "eval.online_every", self.online_every, "must be >= 0 (0 turns it off)")
        _check(self.random_init_seeds >= 1, "eval.random_init_seeds", self.random_init_seeds,
               "must be >= 1 (eval.compare_random_init=false turns the comparison off)")


@dataclass
class Config:
    method: Any  # the method's own Config dataclass (has a `name` field)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        self._check_modalities()
        self._check_local_crops()
        for f in dataclasses.fields(self):
            _validate_nested(getattr(self, f.name), f.name)
        check_batch = getattr(self.method, "min_batch_size", 1)
        _check(self.data.batch_size >= check_batch, "data.batch_size", self.data.batch_size,
               f"must be >= {check_batch} for {self.method.name} (it needs negatives or batch statistics)")

    def _check_modalities(self) -> None:
        """The method must accept the modality of its encoder and of its data (when the source's
        modality can be told without reading it): one line each (see selfsup.registry)."""
        from selfsup.registry import (
            backbone_modality,
            check_source,
            describe,
            get_method,
            modality_of_source,
        )

        method = get_method(self.method.name)
        encoder = backbone_modality(self.backbone.name)
        if encoder is not None and encoder not in method.modalities:
            raise ConfigError(f"backbone.name={self.backbone.name} is an {encoder} encoder; {method.name} trains on "
                              f"{describe(method.modalities)}")
        check_source(method.name, method.modalities, self.data.source)
        if encoder is not None and len(method.modalities) > 1:  # a method of several: encoder and data agree
            found = modality_of_source(self.data.source, (encoder,))
            if found is not None and found != encoder:
                raise ConfigError(f"backbone.name={self.backbone.name} is an {encoder} encoder and data.source="
                                  f"{self.data.source} is {found} data; {method.name} on {found} needs a {found} "
                                  f"encoder" + (" (backbone.name=ts2vec)" if found == "series" else ""))

    def _check_local_crops(self) -> None:
        """Local crops only for methods that declare ``uses_local_crops`` (SwAV, DINO, DINOv2); the
        others would take the extra views and fail in their first step, or silently ignore them."""
        from selfsup.registry import (
            get_method,  # registry -> methods -> config: import when used
        )

        if self.augment.n_local and not get_method(self.method.name).uses_local_crops:
            raise ConfigError(f"{self.method.name} does not use local crops; "
                              f"augment.n_local={self.augment.n_local} must be 0")

    def to_dict(self) -> dict:
        return _to_plain(self)


# --------------------------------------------------------------------------------------
# helpers


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def _validate_nested(obj: Any, prefix: str) -> None:
    validate = getattr(obj, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except ConfigError as err:
        msg = str(err)
        # sections name their own keys; nested augment views name fields without a prefix
        raise ConfigError(msg if msg.startswith(prefix) else f"{prefix}: {msg}") from None


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def deep_merge(base: dict, over: dict) -> dict:
    """Merge ``over`` into a copy of ``base``: dicts merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe and everything it inherits from (``base:`` is a path or a list of paths,
    relative to the recipe). Later bases override earlier ones; the recipe overrides all."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"recipe inheritance loops: {chain}")
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    bases = raw.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml(path.parent / base, (*_seen, path)))
    return deep_merge(merged, raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed value). Values are parsed as YAML, so
    ``0.5`` is a float, ``true`` a bool, ``[20,200]`` a list and ``null`` None."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, _, value = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_override(tree: dict, parts: list[str], value: Any) -> None:
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1])]
            continue
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, parts)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, where: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{'.'.join(where)}: index must be 0..{len(node) - 1}")
    return int(part)


# --------------------------------------------------------------------------------------
# dict -> typed dataclasses


def from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a plain dict, converting nested sections, tuples and
    optionals by the type hints. Unknown keys raise ConfigError listing the valid ones."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown key {prefix}.{key}{hint}; valid keys of {prefix}: {', '.join(names)}"
            )
        kwargs[key] = _convert(hints[key], value, f"{prefix}.{key}")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be null")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}={value!r}: expected {len(args)} values")
            return tuple(_convert(a, v, f"{where}.{i}") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}.{i}") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}: expected a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML reads 1e-6 (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected a string")
        return str(value)
    return value


def build_config(tree: dict) -> Config:
    """Typed, validated Config from a merged dict."""
    from selfsup.registry import get_method  # the method section is typed by the method

    tree = copy.deepcopy(tree)
    sections = [f.name for f in dataclasses.fields(Config)]
    for key in tree:
        if key not in sections:
            close = difflib.get_close_matches(str(key), sections, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown section {key!r}{hint}; valid sections: {', '.join(sections)}")
    method_tree = tree.pop("method", None) or {}
    if not isinstance(method_tree, dict):
        raise ConfigError("method must be a mapping with at least `name:`")
    method_cls = get_method(method_tree.get("name", "simclr"))
    method_tree = {**method_tree, "name": method_cls.name}
    kwargs = {"method": from_dict(method_cls.Config, method_tree, "method")}
    hints = typing.get_type_hints(Config)
    for name in sections:
        if name != "method" and name in tree:
            kwargs[name] = _convert(hints[name], tree[name], name)
    cfg = Config(**kwargs)
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base_tree: dict | None = None) -> Config:
    """Recipe file (or ``base_tree``, e.g. a checkpoint's saved config) + overrides -> Config."""
    # start from the defaults, so an override can reach into a default list (augment.views.1.size)
    tree = {f.name: _to_plain(f.default_factory()) for f in dataclasses.fields(Config)
            if f.default_factory is not dataclasses.MISSING}
    if base_tree is not None:
        tree = deep_merge(tree, base_tree)
    if path is not None:
        tree = deep_merge(tree, load_yaml(path))
    parsed = [parse_override(text) for text in overrides or []]
    new_name = [v for p, v in parsed if p == ["method", "name"]]
    if new_name and str(new_name[-1]).lower() != str(tree.get("method", {}).get("name", "")).lower():
        # switching methods on the command line: the recipe's hyperparameters belonged to the old one
        tree["method"] = {}
    for parts, value in parsed:
        apply_override(tree, parts, value)
    return build_config(tree)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically: a full disk leaves the old file (or none), never an empty one."""
    from selfsup.checkpoint import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
