"""Masked patch reconstruction for time series: PatchTST's self-supervised pretraining (Nie,
Nguyen, Sinthong, Kalagnanam 2023, "A Time Series is Worth 64 Words: Long-term Forecasting with
Transformers", ICLR, sec. 3.3; official ``PatchTST_self_supervised``).

Each window (B, C, T) is instance-normalized per channel (RevIN, no affine), every channel cut into
N non-overlapping patches of P steps (the encoder's patching, ``backbone.patch_size`` = stride =
12). Per (window, channel), a random M = N - int(N (1 - r)) of the patches are masked (r = 0.4, the
official ``random_masking``: argsort of uniform noise): their values are set to zero before the
patch embedding. The channel-independent encoder (``backbone: patchtst``) encodes all N patches,
and a linear head (dropout, then Linear D -> P; the official ``PretrainHead``) reconstructs every
patch. The loss is the mean squared error over the masked patches only:

    L = Σ_{b,c,n} m_{b,c,n} · (1/P) Σ_p (x̂_{b,c,n,p} - x_{b,c,n,p})² / Σ m

with x the normalized patch values (``losses.mae_loss`` without MAE's per-patch target
normalization, over the B·C channel sequences). ``method.mask: block`` masks contiguous spans of
``method.mask_span`` patches instead, ``future`` the last M patches (selfsup's options, shared
with ``pretext.masking``; the paper's is ``random``).

Defaults (official ``patchtst_pretrain.py``): context 512 steps, patch 12 / stride 12 (42
patches), mask ratio 0.4, D = 128, 3 blocks, 16 heads, MLP 512, ReLU, BatchNorm, dropout 0.2 and
head dropout 0.2, batch 64, Adam with a one-cycle schedule peaking at lr 1e-4 (the script takes the
rate its lr finder suggests), 100 epochs (sec. 4.2; the script's default is 10). Downstream (the
paper's Table 4, ETTh1 in its extended appendix Table 12): a linear head on the
flattened patch tokens of each channel predicts the next H steps, with the encoder frozen (linear
probing) or fine-tuned; ``selfsup eval forecast`` runs the frozen protocol.

``encode`` is the encoder's pooled feature (each channel's tokens averaged over its patches,
channels side by side) for kNN / linear probes on labeled sets; the collapse monitor watches the
per-channel pooled tokens of the masked windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfsup.backbones.series import instance_norm
from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.losses import mae_loss
from selfsup.modalities.series import SeriesMethod
from selfsup.pretext.masking import check_sequence_mask, sequence_mask
from selfsup.registry import register_method


@dataclass
class PatchTSTConfig(MethodConfig):
    name: str = "patchtst"
    mask_ratio: float = 0.4  # fraction of each channel's patches hidden (paper: 40%)
    mask: str = "random"  # random (paper) | block (spans of mask_span patches) | future (the last patches)
    mask_span: int = 3  # block: patches per span
    head_dropout: float = 0.2  # dropout before the reconstruction head (official head_dropout)

    def validate(self) -> None:
        check_sequence_mask(self.mask_ratio, self.mask, self.mask_span)
        if not 0.0 <= self.head_dropout < 1.0:
            raise ConfigError(f"method.head_dropout={self.head_dropout}: must be in [0, 1)")


@register_method
class PatchTSTPretrain(SeriesMethod):
    name = "patchtst"
    paper = "Nie et al. 2023, PatchTST: masked patch reconstruction for time series"
    family = "masked"
    Config = PatchTSTConfig

    def __init__(self, cfg: PatchTSTConfig, backbone: nn.Module, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        self.head = nn.Sequential(nn.Dropout(cfg.head_dropout), nn.Linear(backbone.embed_dim, backbone.patch_size))

    def masked_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalized patches (B, C, N, P), the same with masked patches zeroed, mask (B, C, N))."""
        enc = self.backbone
        patches = enc.patchify(instance_norm(x)[0])
        b, c, n, _ = patches.shape
        mask = sequence_mask(self.cfg.mask, b * c, n, self.cfg.mask_ratio, span=self.cfg.mask_span,
                             device=x.device).view(b, c, n)
        return patches, patches.masked_fill(mask.unsqueeze(-1), 0.0), mask

    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> StepOutput:
        x = self.preprocess(batch)
        target, inputs, mask = self.masked_inputs(x)
        tokens = self.backbone.encode_patches(inputs)  # (B, C, N, D)
        pred = self.head(tokens)  # (B, C, N, P)
        loss = mae_loss(pred.flatten(0, 1), target.flatten(0, 1), mask.flatten(0, 1), norm_pix_loss=False)
        with torch.no_grad():  # how well the visible patches are copied through, for the logs (no host sync)
            shown = (~mask).to(torch.float32)
            visible = ((pred.float() - target.float()).pow(2).mean(-1) * shown).sum() / shown.sum().clamp_min(1.0)
        return StepOutput(loss, {"mse_visible": visible},
                          embeddings=tokens.detach().mean(2).flatten(0, 1))
