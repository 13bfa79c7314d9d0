"""The video modality: batches of uint8 clips ``video`` (B, T, 3, H, W) (``selfsup.data.video``: files decoded
with PyAV, folders of frames, or the embedded moving-object clips), cropped, flipped and normalized on the
training device (``clip_views``) and encoded by a ViT on space-time tubelets (``selfsup.backbones.video``).

A video run fixes before its encoder is built (``configure``): ``backbone.num_frames`` = ``data.frames`` (the
clip's frames) and ``backbone.img_size`` = ``data.frame_size`` (the side frames are decoded to), or
``data.frame_size`` from ``backbone.img_size`` when only that is given.

:class:`VideoMethod` is the base class of every video method: a batch (or a bare uint8 / float clip tensor
(B, T, 3, H, W)) in; ``views`` makes the training view (one random resized crop per clip, the same box in
every frame so motion is kept, a horizontal flip with probability 1/2 when ``method.flip``), ``preprocess``
the evaluation input (the whole frame, resized to the encoder's side); both normalized with ImageNet's mean
and std and laid out (B, 3, T, H, W), the encoder's input; ``encode`` the pooled feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.core.method import Method, MethodConfig
from selfsup.errors import ConfigError
from selfsup.pretext.augment import IMAGENET_MEAN, IMAGENET_STD
from selfsup.registry import Modality, check_batch, register_modality

BATCH_KEY = "video"


@dataclass
class VideoMethodConfig(MethodConfig):
    """The training view every video method shares: a random resized crop of area ``crop_scale`` (fraction of
    the frame) and aspect ``crop_aspect``, the same box through the clip, resized to the encoder's side, and a
    horizontal flip (V-JEPA's ``random_resize_scale`` (0.3, 1.0), ``random_resize_aspect_ratio`` (0.75, 1.35),
    ``random_horizontal_flip``)."""

    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_aspect: tuple[float, float] = (0.75, 1.35)
    flip: bool = True

    def validate(self) -> None:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"method.crop_scale={self.crop_scale}: needs 0 < low <= high <= 1")
        lo, hi = self.crop_aspect
        if not 0.0 < lo <= hi:
            raise ConfigError(f"method.crop_aspect={self.crop_aspect}: needs 0 < low <= high")


def _as_float(video: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) uint8 in [0, 255] or float in [0, 1] -> float32 (B, C, T, H, W) in [0, 1]."""
    x = video.float() / 255.0 if video.dtype == torch.uint8 else video.float()
    return x.permute(0, 2, 1, 3, 4)


def normalize_clips(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) RGB in [0, 1] normalized with ImageNet's mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1, 1)
    return (x - mean) / std


def crop_boxes(batch: int, scale: tuple[float, float], aspect: tuple[float, float], *, device: torch.device,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 4) random resized crop boxes (cy, cx, h, w) in units of the frame's side, as torchvision's
    ``RandomResizedCrop``: area uniform in ``scale``, aspect log-uniform in ``aspect``, clipped to the frame,
    centre uniform over the positions where the box fits."""
    u = torch.rand(batch, 4, device=device, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cy = h / 2 + (1 - h) * u[:, 2]
    cx = w / 2 + (1 - w) * u[:, 3]
    return torch.stack([cy, cx, h, w], dim=1)


def crop_clips(x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop every frame of clip b (x: (B, C, T, H, W) float) to ``boxes[b]`` (cy, cx, h, w, frame units),
    resized bilinearly to ``size`` x ``size`` (one ``grid_sample`` for the batch), mirrored where ``flip``."""
    b, c, t, h, w = x.shape
    cy, cx, bh, bw = boxes.unbind(1)
    sx = bw if flip is None else bw * torch.where(flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = bh, 2 * cy - 1
    grid = F.affine_grid(theta, [b, c * t, size, size], align_corners=False)
    out = F.grid_sample(x.reshape(b, c * t, h, w), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(b, c, t, size, size)


class VideoMethod(Method):
    """A Method on clips (B, T, 3, H, W) read through a tubelet ViT."""

    modalities: ClassVar[tuple[str, ...]] = ("video",)
    unit: ClassVar[str] = "clips"

    def __init__(self, cfg: Any, backbone: nn.Module, augment: Any = None) -> None:
        super().__init__(cfg, backbone, augment)
        from selfsup.backbones.video import VideoViT

        if not isinstance(backbone, VideoViT):
            raise ConfigError(f"{self.name} needs a video encoder (video_vit_tiny, video_vit_small, video_vit_base, "
                              f"video_vit_large), got {type(backbone).__name__}")
        self.eval_size = backbone.img_size

    def check(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(batch, torch.Tensor):
            batch = {BATCH_KEY: batch}
        check_batch(self.name, self.modalities, batch)
        video = batch[BATCH_KEY]
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[2] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ConfigError(f"{self.name}: video batches are uint8 or float clips (B, T, 3, H, W), got {shape}")
        frames = self.backbone.num_frames
        if video.shape[1] != frames:
            raise ConfigError(f"{self.name}: clips of {video.shape[1]} frames, but the encoder was built for {frames} "
                              "(data.frames)")
        return batch

    def crops(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The training view before normalization: RGB in [0, 1], (B, 3, T, S, S), one random resized crop
        (and flip) per clip."""
        video = self.check(batch)[BATCH_KEY]
        x = _as_float(video)
        boxes = crop_boxes(x.shape[0], tuple(self.cfg.crop_scale), tuple(self.cfg.crop_aspect), device=x.device)
        flip = torch.rand(x.shape[0], device=x.device) < 0.5 if self.cfg.flip else None
        return crop_clips(x, boxes, self.backbone.img_size, flip)

    def views(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The training view: ``crops`` normalized with ImageNet's mean and std, (B, 3, T, S, S)."""
        return normalize_clips(self.crops(batch))

    def preprocess(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The evaluation input: normalized (B, 3, T, S, S), each whole frame resized to the encoder's side."""
        x = _as_float(self.check(batch)[BATCH_KEY])
        size = self.backbone.img_size
        if x.shape[-2:] != (size, size):
            b, c, t, h, w = x.shape
            x = F.interpolate(x.reshape(b, c * t, h, w), size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False).view(b, c, t, size, size)
        return normalize_clips(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features of clips as ``preprocess`` makes them."""
        return self.encoder(x)

    def embed_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, N, D) final-normed tokens of the encoder on the evaluation input (the attentive probe's input)."""
        return self.encoder.tokens(self.preprocess(batch)).float()

    def export_note(self) -> str:
        b = self.encoder
        return (f"input: float clips (B, 3, {b.num_frames}, {b.img_size}, {b.img_size}) (channels, frames, height, "
                f"width), RGB in [0, 1] normalized with ImageNet's mean {IMAGENET_MEAN} and std {IMAGENET_STD}; "
                f"{b.tubelet_size}x{b.patch_size}x{b.patch_size} tubelets, {b.pos_embed_type} positions; returns the "
                "mean of the final-normed tokens; load with selfsup.export.load_encoder")


def _claims(source: str) -> bool:
    from selfsup.data.video import is_video_source

    return is_video_source(source)


def _configure(cfg: Any) -> Any:
    """Fix the encoder's frames and side from the data (kept where already set)."""
    b, d = cfg.backbone, cfg.data
    size = d.frame_size or b.img_size or 224
    if b.num_frames == d.frames and b.img_size == size and d.frame_size == size:
        return cfg
    if b.num_frames is not None and b.num_frames != d.frames:
        raise ConfigError(f"backbone.num_frames={b.num_frames} but data.frames={d.frames}: the encoder reads the "
                          "data's clips; set data.frames only")
    return replace(cfg, data=replace(d, frame_size=size), backbone=replace(b, num_frames=d.frames, img_size=size))


def _open(cfg: Any, split: str, evaluation: bool = False) -> Any:
    from selfsup.data.modes import OpenedData
    from selfsup.data.video import VideoClips, describe, open_video

    d = cfg.data
    data = open_video(d.source, split, frames=d.frames, stride=d.frame_stride, size=d.frame_size or 224,
                      label_column=d.label_column, evaluation=evaluation, decoder=d.video_decoder)
    return OpenedData(data, "memory" if isinstance(data, VideoClips) else "stream", describe(data))


VIDEO = register_modality(Modality("video", (BATCH_KEY,), _claims, _open,
                                   "uint8 clips (B, T, 3, H, W); folders of mp4/webm/mkv/avi files or of frame "
                                   "folders, embedded-video (moving CIFAR-10 objects)", configure=_configure))

__all__ = ["VIDEO", "VideoMethod", "VideoMethodConfig", "crop_boxes", "crop_clips", "normalize_clips"]
