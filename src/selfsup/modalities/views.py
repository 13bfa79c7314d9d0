"""The joint-embedding methods' views on any modality that has them: :class:`ViewMethod` is the base
class of the two-view methods (SimCLR, MoCo v2/v3, BYOL, SimSiam, Barlow Twins, VICReg), which only
need two views of a batch and an encoder that maps each view to one vector.

On images (an image encoder) it is :class:`~selfsup.modalities.image.ImageMethod` unchanged: the crops
and colour distortions of ``augment.views``. On series (a series encoder) the views are
``augment.series`` (``pretext.series_augment``: permutation, scaling, jittering; TS-TCC's weak and
strong views by default), made on the batch's device, and evaluation encodes the series as they come.
The encoder must give one vector per series: ``backbone.name=ts2vec`` (its timestamps max-pooled); the
channel-independent PatchTST gives one per channel, and is refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from selfsup.core.method import Method
from selfsup.errors import ConfigError
from selfsup.modalities.image import ImageMethod
from selfsup.modalities.series import BATCH_KEY as SERIES_KEY
from selfsup.modalities.series import SERIES_DIMS, SERIES_LAYOUT
from selfsup.pretext.series_augment import SeriesAugment
from selfsup.registry import check_batch, float_batch


def _series_encoder(backbone: nn.Module) -> bool:
    from selfsup.backbones.series import PatchTST, TSEncoder

    if isinstance(backbone, PatchTST):
        raise ConfigError("the two-view methods need one feature vector per series; PatchTST gives one per channel: "
                          "use backbone.name=ts2vec (a channel-mixing encoder, max-pooled over time)")
    return isinstance(backbone, TSEncoder)


class ViewMethod(ImageMethod):
    """A two-view method on images (``ImageMethod``) or series (see the module docstring)."""

    modalities: ClassVar[tuple[str, ...]] = ("image", "series")

    def __init__(self, cfg: Any, backbone: nn.Module, augment: Any) -> None:
        self.series = _series_encoder(backbone)
        if not self.series:
            super().__init__(cfg, backbone, augment)
            return
        Method.__init__(self, cfg, backbone, augment)
        self.views = nn.ModuleList(SeriesAugment(v) for v in augment.series)
        self.local_views = nn.ModuleList()
        self.unit = "series"

    @property
    def modality(self) -> str:
        return "series" if self.series else "image"

    def forecast_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Series: what ``selfsup eval forecast`` reads (the encoder's, e.g. TS2Vec's last timestamp)."""
        if not self.series:
            raise ConfigError(f"forecasting reads a time-series encoder; this {self.name} run trains on images")
        return self.encoder.forecast_features(x)

    def use_channels_last(self, enabled: bool) -> bool:
        return False if self.series else super().use_channels_last(enabled)

    def require_two_views(self, no_local: bool = False) -> None:
        if self.series and len(self.views) != 2:
            raise ConfigError(f"{self.name} trains on exactly 2 views; augment.series has {len(self.views)}")
        super().require_two_views(no_local)

    def view_inputs(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(batch, dict) and "images" not in batch:  # built for images: a series batch is refused too
            check_batch(self.name, ("image",), batch)
        return super().view_inputs(batch)

    def _series(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        return float_batch(self.name, ("series",), SERIES_KEY, batch, SERIES_DIMS, SERIES_LAYOUT)

    def make_views(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        if not self.series:
            return super().make_views(batch)
        x = self._series(batch)
        return [v(x) for v in (self.views[:1] if self.single_view else self.views)]

    def preprocess(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._series(batch) if self.series else super().preprocess(batch)

    def export_note(self) -> str:
        if not self.series:
            return super().export_note()
        return ("input: float series (B, C, T), each channel standardized with the training split's mean and std; "
                "returns one vector per series; load with selfsup.export.load_encoder")
