"""data2vec 2.0 for images (Baevski, Babu, Hsu, Auli 2023, "Efficient Self-supervised Learning
with Contextualized Target Representations for Vision, Speech and Language", ICML).

A student ViT regresses, for the patches it does not see, the contextualized representations an
EMA teacher computes from the whole image (data2vec, Baevski et al. 2022), made efficient
(sec. 3) by encoding only the visible patches, a light convolutional decoder, and M masked
copies of each image sharing one teacher pass. Per image x (official ``data2vec2.py``,
``modalities/images.py``, ``modalities/base.py``, ``config/v2/base_images_only_task.yaml``):

1. teacher: the EMA copy of the encoder on the unmasked x; its top-K blocks' FFN outputs (before
   the block's last residual connection, official ``ffn_targets``) without the CLS token give the
   targets ``y = LN(1/K Σ_l IN(a^l))`` (``losses.data2vec_targets``: instance norm over tokens per
   layer, mean, layer norm over channels; no affine anywhere);
2. student: M = ``clone_batch`` copies of x, each with its own inverse block mask hiding 80% of
   the patches (``pretext.masking.inverse_block_masking``); the encoder sees the visible patches
   (+ CLS) only; the teacher's targets are repeated M times;
3. decoder (official ``Decoder2d``): the visible tokens go back to the 2-D patch grid, the masked
   positions are filled with N(0, 0.01²) noise (``mask_noise_std``, no learned mask token, no
   positions), then ``decoder_layers`` blocks of [grouped Conv2d(k x k) -> LayerNorm over channels
   without affine -> GELU], each with a residual connection from its input where the widths match,
   then a Linear to the encoder width;
4. loss (``losses.data2vec_loss``) on the masked positions only, a mean over them of
   ``||f(x)_t - y_t||² / sqrt(D)``, plus the CLS loss (``cls_loss`` 0.01): the student's CLS
   output regresses the mean over tokens of the teacher's targets, ``||c - mean_t y_t||² / sqrt(D)``.
   The official criterion sums that term over the GPU's B·M samples (times 0.01) before dividing
   the total by the number of masked tokens, so its weight grows with the per-GPU batch; here it is
   the mean over samples times ``cls_loss x cls_loss_ref_samples`` (256 = the official 16 images
   x 16 clones per GPU), which is the same number at the official batch and stays put at others.
5. EMA: θ_t <- τ θ_t + (1 - τ) θ_s after every step, over the whole encoder (patch embedding, CLS,
   blocks, norm; ``ema_encoder_only: false``), τ linear from ``ema_decay`` 0.9998 to
   ``ema_end_decay`` 0.99999 over ``ema_anneal_end_step`` (official ``get_annealed_rate``), then
   constant; the update after optimizer step s uses τ(s).

Defaults are the official ViT-B recipe: K = 10 top blocks, M = 16, mask ratio 0.8 (inverse
block masks of 3x3 blocks, ``mask_prob_adjust`` 0.07), decoder 6 layers x 768 wide, kernel 3,
16 groups; the ViT-L recipe uses K = 18, mask 0.75, decoder 3 layers x 1024, kernel 5.
Downstream: ``encode`` is the backbone's pooled output; the official fine-tuning / linear head
reads the mean of the patch tokens, so the recipes set ``backbone.pool: mean``. The collapse
monitor watches the pooled student tokens of the first masked copy of each image.

Departures from the official model (documented in the recipes too): our encoder is the shared
pre-LN timm ViT (the official one is post-LN, BERT-style, with an embedding LayerNorm and 2
"prenet" blocks before 10 main blocks, the targets taken from the 10 main ones); its export
loads into timm. The student's images are repeated M times before the patch embedding (the
official code repeats the embedded patches; same values, slightly more compute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.core.method import MethodConfig, Progress, StepOutput
from selfsup.errors import ConfigError
from selfsup.losses import data2vec_loss, data2vec_targets
from selfsup.modalities.image import ImageMethod
from selfsup.nn.teacher import annealed_decay, ema_update, make_teacher
from selfsup.registry import register_method


class ConvDecoder2d(nn.Module):
    """data2vec 2.0's image decoder (official ``Decoder2d``): tokens (B, N, in_dim) laid out on the
    (gh, gw) grid, ``layers`` x [grouped Conv2d -> LayerNorm over channels (no affine) -> GELU] with
    a residual connection wherever input and output widths match, then Linear(dim -> in_dim)."""

    def __init__(self, in_dim: int, dim: int = 768, layers: int = 6, kernel: int = 3, groups: int = 16,
                 residual: bool = True) -> None:
        super().__init__()
        self.kernel, self.residual = kernel, residual
        self.convs = nn.ModuleList(
            nn.Conv2d(in_dim if i == 0 else dim, dim, kernel, padding=kernel // 2, groups=groups)
            for i in range(layers))
        self.proj = nn.Linear(dim, in_dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        h = x.transpose(1, 2).reshape(b, c, *grid)
        for conv in self.convs:
            out = conv(h)
            if self.kernel % 2 == 0:  # official SamePad2d: an even kernel pads one too many
                out = out[..., :-1, :-1]
            out = F.layer_norm(out.permute(0, 2, 3, 1), out.shape[1:2]).permute(0, 3, 1, 2)
            out = F.gelu(out)
            h = out + h if self.residual and h.shape[1] == out.shape[1] else out
        return self.proj(h.flatten(2).transpose(1, 2))


@dataclass
class Data2Vec2Config(MethodConfig):
    name: str = "data2vec2"
    clone_batch: int = 16  # M masked copies per image
    mask_ratio: float = 0.8
    mask_length: int = 3  # side of the square blocks of the inverse block mask
    mask_prob_adjust: float = 0.07
    average_top_k_layers: int = 10  # K (all blocks when K >= depth)
    instance_norm_target_layer: bool = True
    layer_norm_target_layer: bool = False
    layer_norm_targets: bool = True
    instance_norm_targets: bool = False
    end_of_block_targets: bool = False  # False: each block's FFN output before its last residual (official)
    decoder_dim: int = 768
    decoder_layers: int = 6
    decoder_kernel: int = 3
    decoder_groups: int = 16
    decoder_residual: bool = True
    mask_noise_std: float = 0.01
    loss_scale: float | None = None  # None: 1/sqrt(D)
    loss_beta: float = 0.0  # 0: L2; > 0: smooth L1
    cls_loss: float = 0.01
    cls_loss_ref_samples: int = 256  # official per-GPU images x clones its cls term is summed over
    ema_decay: float = 0.9998
    ema_end_decay: float = 0.99999
    ema_anneal_end_epochs: float = 20.0  # official 100,000 updates at 5,005 updates per epoch
    min_batch_size = 1

    def validate(self) -> None:
        if self.clone_batch < 1:
            raise ConfigError(f"method.clone_batch={self.clone_batch}: must be >= 1")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"method.mask_ratio={self.mask_ratio}: must be in (0, 1)")
        if self.mask_length < 1:
            raise ConfigError(f"method.mask_length={self.mask_length}: must be >= 1")
        if self.average_top_k_layers < 1:
            raise ConfigError(f"method.average_top_k_layers={self.average_top_k_layers}: must be >= 1")
        if min(self.decoder_dim, self.decoder_layers, self.decoder_kernel, self.decoder_groups) < 1:
            raise ConfigError("method.decoder_dim, decoder_layers, decoder_kernel and decoder_groups must be >= 1")
        if self.decoder_dim % self.decoder_groups:
            raise ConfigError(f"method.decoder_dim={self.decoder_dim} is not divisible by "
                              f"method.decoder_groups={self.decoder_groups}")
        for key in ("ema_decay", "ema_end_decay"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"method.{key}={getattr(self, key)}: must be in [0, 1]")
        if self.ema_anneal_end_epochs < 0 or self.mask_noise_std < 0 or self.cls_loss < 0 or self.loss_beta < 0:
            raise ConfigError("method.ema_anneal_end_epochs, mask_noise_std, cls_loss and loss_beta must be >= 0")
        if self.cls_loss_ref_samples < 1:
            raise ConfigError(f"method.cls_loss_ref_samples={self.cls_loss_ref_samples}: must be >= 1")


def _spread(x: torch.Tensor) -> torch.Tensor:
    """Official ``compute_var``: mean over channels of the std over rows (a collapse signal)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return torch.sqrt(x.var(dim=0) + 1e-6).mean() if x.shape[0] > 1 else x.new_zeros(())


@register_method
class Data2Vec2(ImageMethod):
    name = "data2vec2"
    paper = ("Baevski et al. 2023, Efficient Self-supervised Learning with Contextualized Target "
             "Representations for Vision, Speech and Language")
    family = "masked"
    Config = Data2Vec2Config
    single_view = True  # teacher and student see the same crop

    def __init__(self, cfg: Data2Vec2Config, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        if not callable(getattr(backbone, "tokens", None)):
            raise ConfigError("data2vec2 needs a token-dropping ViT backbone: backbone.name=vit_tiny, vit_small, "
                              "vit_base or vit_large (timm:* models cannot encode only the visible patches)")
        dim = backbone.embed_dim
        if dim % cfg.decoder_groups:
            raise ConfigError(f"method.decoder_groups={cfg.decoder_groups} must divide the encoder width {dim}")
        # data2vec 2.0 drops masked patches, it never uses the ViT's mask token: keep it out of the
        # optimizer (and of DDP, which would wait for its gradient)
        backbone.mask_token.requires_grad_(False)
        self.decoder = ConvDecoder2d(dim, cfg.decoder_dim, cfg.decoder_layers, cfg.decoder_kernel,
                                     cfg.decoder_groups, cfg.decoder_residual)
        self.teacher = make_teacher(self.backbone, no_drop_path=True)  # the official teacher runs in eval mode
        self.register_buffer("ema_decay_now", torch.tensor(float(cfg.ema_decay), dtype=torch.float64))

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher targets (B, N, D) for normalized images x (B, C, H, W)."""
        c = self.cfg
        if c.end_of_block_targets:
            _, layers = self.teacher.tokens(x, return_layers=True)
        else:  # each block's FFN output, before the residual add (timm Block: x + mlp(norm2(x)))
            layers = []
            hooks = [blk.mlp.register_forward_hook(lambda _m, _i, out: layers.append(out))
                     for blk in self.teacher.model.blocks]
            try:
                self.teacher.tokens(x)
            finally:
                for h in hooks:
                    h.remove()
        return data2vec_targets([t[:, 1:] for t in layers], c.average_top_k_layers,
                                instance_norm_layers=c.instance_norm_target_layer,
                                layer_norm_layers=c.layer_norm_target_layer,
                                layer_norm_targets=c.layer_norm_targets,
                                instance_norm_targets=c.instance_norm_targets)

    def masks(self, batch: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(batch, N) bool, True = masked: an independent inverse block mask per row."""
        from selfsup.pretext.masking import inverse_block_masking

        return inverse_block_masking(batch, grid, self.cfg.mask_ratio, block_size=self.cfg.mask_length,
                                     mask_prob_adjust=self.cfg.mask_prob_adjust, device=device)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        from selfsup.pretext.masking import mask_to_indices

        c = self.cfg
        (x,) = self.make_views(batch)
        b, m = x.shape[0], c.clone_batch
        grid = self.backbone.grid_of(x)
        y = self.targets(x)  # (B, N, D) float32
        mask = self.masks(b * m, grid, x.device)  # clone j of image i is row i * M + j
        keep, _ = mask_to_indices(mask)
        tokens = self.backbone.tokens(x.repeat_interleave(m, dim=0), keep=keep)  # (B*M, 1+K, D)
        visible = tokens[:, 1:]
        d = visible.shape[-1]
        noise = torch.randn(b * m, mask.shape[1], d, device=x.device, dtype=visible.dtype) * c.mask_noise_std
        dec_in = noise.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), visible)
        pred = self.decoder(dec_in, grid)  # (B*M, N, D)
        y_rep = y.repeat_interleave(m, dim=0)
        pred_m, y_m = pred[mask], y_rep[mask]
        reg = data2vec_loss(pred_m, y_m, scale=c.loss_scale, beta=c.loss_beta)
        loss = reg
        metrics = {"data2vec2/reg_loss": reg.detach(), "data2vec2/ema_decay": self.ema_decay_now.detach().clone()}
        if c.cls_loss > 0:
            cls_target = y.mean(dim=1).repeat_interleave(m, dim=0)
            cls = data2vec_loss(tokens[:, 0], cls_target, scale=c.loss_scale, beta=c.loss_beta)
            loss = loss + c.cls_loss * c.cls_loss_ref_samples * cls
            metrics["data2vec2/cls_loss"] = cls.detach()
        with torch.no_grad():
            metrics["data2vec2/target_var"] = _spread(y_m)
            metrics["data2vec2/pred_var"] = _spread(pred_m.detach())
        return StepOutput(loss=loss, metrics=metrics,
                          embeddings=self.backbone.pool_tokens(tokens[::m]).detach())

    def ema_anneal_end_step(self, progress: Progress) -> int:
        return int(round(self.cfg.ema_anneal_end_epochs * progress.steps_per_epoch))

    def momentum(self, progress: Progress) -> float:
        """τ for the update after optimizer step ``progress.step`` (official ``set_num_updates``)."""
        return annealed_decay(progress.step, self.cfg.ema_decay, self.cfg.ema_end_decay,
                              self.ema_anneal_end_step(progress))

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.teacher, self.backbone)]

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> None:
        tau = self.momentum(progress)
        self.ema_decay_now.fill_(tau)
        if tau < 1.0:
            ema_update(self.teacher, self.backbone, tau)
