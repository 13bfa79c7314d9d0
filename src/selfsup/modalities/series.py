"""The time-series modality: batches of float ``series`` (B, C, T), standardized per channel with
the training split's statistics (``selfsup.data.series``), encoded by ``selfsup.backbones.series``.

A series run fixes the encoder's shape before it is built (``configure``): ``backbone.max_len`` is
``data.seq_len`` for a long series cut into windows, the series' length for a set of series, and
``backbone.in_chans`` the data's channel count (encoders that mix channels need it).

:class:`SeriesMethod` is the base class of every time-series method: a batch (or a bare tensor
(B, C, T)) in, the pooled encoder feature out for the probes, and the token features
(B, C, N, D) with each window's instance statistics that ``selfsup eval forecast`` trains its
forecasting head on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from selfsup.core.method import Method
from selfsup.errors import ConfigError
from selfsup.registry import Modality, float_batch, register_modality

BATCH_KEY = "series"
SERIES_DIMS, SERIES_LAYOUT = (3,), "series batches are float (B, C, T)"


class SeriesMethod(Method):
    """A Method on multivariate series (B, C, T)."""

    modalities: ClassVar[tuple[str, ...]] = ("series",)
    unit: ClassVar[str] = "series"

    def __init__(self, cfg: Any, backbone: nn.Module, augment: Any = None) -> None:
        super().__init__(cfg, backbone, augment)
        from selfsup.backbones.series import PatchTST, TSEncoder

        if not isinstance(backbone, (PatchTST, TSEncoder)):
            raise ConfigError(f"{self.name} needs a time-series encoder (patchtst, ts2vec), got {type(backbone).__name__}")

    def require_patch_encoder(self) -> None:
        """Refuse (ConfigError) a backbone other than the PatchTST patch encoder, for methods built on its
        patches (masks, token dropping, per-patch heads)."""
        from selfsup.backbones.series import PatchTST

        if not isinstance(self.backbone, PatchTST):
            raise ConfigError(f"{self.name} trains a patch encoder (backbone.name=patchtst), got "
                              f"{type(self.backbone).__name__}")

    def check(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(batch, torch.Tensor):
            batch = {BATCH_KEY: batch}
        float_batch(self.name, self.modalities, BATCH_KEY, batch, SERIES_DIMS, SERIES_LAYOUT)
        return batch

    def preprocess(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.check(batch)[BATCH_KEY]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C * D): each channel's tokens averaged over its patches, channels side by side."""
        return self.encoder(x)

    def export_note(self) -> str:
        return ("input: float series (B, C, T), each channel standardized with the training split's mean and std; "
                "the encoder normalizes each window itself (RevIN) and returns (B, C * D), each channel's patch "
                "tokens averaged; load with selfsup.export.load_encoder")

    def forecast_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, mean (B, C, 1), std (B, C, 1)) a forecasting head reads: per channel (B, C, F)
        (PatchTST's flattened patch tokens) or for all channels at once (B, F) (TS2Vec's last
        timestamp), and the statistics that undo the encoder's input normalization."""
        return self.encoder.forecast_features(x)


def _claims(source: str) -> bool:
    from selfsup.data.series import is_series_source

    return is_series_source(source)


def _configure(cfg: Any) -> Any:
    """Fix ``backbone.max_len`` (the encoder's positions, in time steps) and ``backbone.in_chans`` from
    the data; a config that has them (a resumed or loaded run) is kept as it is."""
    if cfg.backbone.max_len is not None and cfg.backbone.in_chans is not None:
        return cfg
    from selfsup.data.series import series_channels, series_length

    src = cfg.data.source
    return replace(cfg, backbone=replace(cfg.backbone, max_len=cfg.backbone.max_len or series_length(src, cfg.data.seq_len),
                                         in_chans=cfg.backbone.in_chans or series_channels(src)))


def _open(cfg: Any, split: str, evaluation: bool = False) -> Any:
    from selfsup.data.modes import OpenedData
    from selfsup.data.series import describe, open_series

    data = open_series(cfg.data.source, split, cfg.data.seq_len)
    return OpenedData(data, "memory", describe(data))


SERIES = register_modality(Modality("series", (BATCH_KEY,), _claims, _open,
                                    "float series (B, C, T); long-series CSV/Parquet, .npy/.npz/.ts sets, ucr:<Name>, "
                                    "embedded-series", configure=_configure))

__all__ = ["SERIES", "SeriesMethod"]
