"""data2vec for audio (Baevski, Hsu, Xu, Babu, Gu, Auli 2022, "data2vec: A General Framework for
Self-supervised Learning in Speech, Vision and Language", ICML), after fairseq's
``examples/data2vec/models/data2vec_audio.py`` and ``config/audio/pretraining/base_librispeech.yaml``.

A student encoder sees the input with spans of time steps replaced by a learned mask embedding and
regresses, at the masked steps, what an EMA teacher computes from the unmasked input: the average of
the teacher's top-K blocks' feed-forward outputs (before each block's residual add), each
instance-normalized over time (sec. 3.3, eq. 1-2):

    y_t = 1/K Σ_{l = L-K+1}^{L} IN(a_t^l),      L = 1/|M| Σ_{t ∈ M} ||W h_t - y_t||² / sqrt(D)

``W`` a linear head (``final_proj``) on the student's final states; no normalization of the averaged
target (``layer_norm_targets`` and ``instance_norm_targets`` off for audio); the L2 loss summed over
channels and scaled by 1/sqrt(D) (``loss_beta: 0``, ``loss_scale: null``; ``losses.data2vec_loss``).

Input: spectrogram patches, not waveform features. The paper's speech model encodes the 16 kHz
waveform with wav2vec 2.0's 7-layer convolutional feature encoder (20 ms frames) and a convolutional
position embedding; here the encoder is the audio ViT on log-mel patches that Audio-MAE uses
(``backbones.audio``), so that the two audio methods train and are probed through the same network,
and because the paper's conv stack (512 channels at 16 kHz) costs more than the whole ViT on a CPU.
data2vec's claim is that the objective is modality-agnostic; this keeps the objective exactly and
changes the input layer only. Masking follows the paper on the time axis: spans of time (``mask_span_ms``,
200 ms = the paper's 10 frames of 20 ms) start at a fraction ``mask_prob`` 0.65 of the positions
(``pretext.masking.wav2vec_span_masking``, fairseq's ``compute_mask_indices``: overlapping spans, the same
count in every row), each masked time column hiding all of its frequency patches.

Teacher: the EMA of the student's Transformer blocks only (``ema_transformer_only``); it reads the
student's patch embedding and positions (the paper's teacher reads the student's CNN features), runs in
eval mode, and its decay goes linearly from 0.999 to 0.9999 over 30,000 updates (``ema_anneal_end_step``),
then stays.

Defaults (base_librispeech.yaml): K = 8 of 12 blocks, mask_prob 0.65, span 10 frames (200 ms), Adam lr
5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.01, tri-stage schedule (3% warm-up), 400k updates of
about 63 minutes of audio each (the paper scores it by word error rate on LibriSpeech after fine-tuning
with CTC, which this library does not do). The mask embedding is the ViT's ``mask_token`` (N(0, 0.02);
fairseq's ``mask_emb`` is uniform).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfsup.core.method import MethodConfig, Progress, StepOutput
from selfsup.errors import ConfigError
from selfsup.losses import data2vec_loss, data2vec_targets
from selfsup.modalities.audio import AudioMethod
from selfsup.nn.teacher import AnnealedBlockEMA, check_annealed_decay, make_teacher
from selfsup.pretext.masking import wav2vec_span_masking
from selfsup.registry import register_method

FRAME_MS = 10.0  # the spectrogram's frame shift: a patch column spans patch_size * 10 ms


@dataclass
class Data2VecAudioConfig(MethodConfig):
    name: str = "data2vec_audio"
    top_k: int = 8  # average_top_k_layers
    mask_prob: float = 0.65
    mask_span_ms: float = 200.0  # mask_length 10 frames of 20 ms; rounded to whole patch columns (at least 1)
    ema_decay: float = 0.999
    ema_end_decay: float = 0.9999
    ema_anneal_end_step: int = 30_000
    loss_beta: float = 0.0  # 0: L2; > 0: smooth L1 with this beta (official loss_beta)

    def validate(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"method.top_k={self.top_k}: must be >= 1")
        if not 0.0 < self.mask_prob <= 1.0:
            raise ConfigError(f"method.mask_prob={self.mask_prob}: must be in (0, 1]")
        if self.mask_span_ms <= 0:
            raise ConfigError(f"method.mask_span_ms={self.mask_span_ms}: must be > 0")
        check_annealed_decay(self)
        if self.loss_beta < 0:
            raise ConfigError(f"method.loss_beta={self.loss_beta}: must be >= 0")


@register_method
class Data2VecAudio(AnnealedBlockEMA, AudioMethod):
    name = "data2vec_audio"
    paper = "Baevski et al. 2022, data2vec (speech)"
    family = "masked"
    Config = Data2VecAudioConfig

    def __init__(self, cfg: Data2VecAudioConfig, backbone: nn.Module, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        if cfg.top_k > backbone.depth:
            raise ConfigError(f"method.top_k={cfg.top_k} is more than the encoder's {backbone.depth} blocks")
        columns = backbone.grid_size[0]
        self.span = max(1, round(cfg.mask_span_ms / (backbone.patch_size * FRAME_MS)))
        if columns < 2:
            raise ConfigError(f"data2vec_audio masks time columns; the clip has only {columns} column of patches: "
                              "lower backbone.patch_size or lengthen data.clip_seconds")
        self.teacher = make_teacher(backbone, no_drop_path=True)
        self.regression_head = nn.Linear(backbone.embed_dim, backbone.embed_dim)  # final_proj
        self.register_buffer("ema_decay_now", torch.tensor(float(cfg.ema_decay)))

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.teacher, self.backbone)]

    def time_mask(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, N) patch mask: whole time columns (all their frequency patches) in fairseq's spans."""
        rows, cols = self.backbone.grid_of(spec)
        columns = wav2vec_span_masking(spec.shape[0], rows, self.cfg.mask_prob, self.span, device=spec.device)
        return columns.unsqueeze(-1).expand(-1, rows, cols).reshape(spec.shape[0], rows * cols)

    @torch.no_grad()
    def targets(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, N, D) targets of the unmasked spectrogram: the top-K teacher blocks' FFN outputs, each
        instance-normalized over the tokens, averaged (no further norm)."""
        self.teacher.eval()
        ffn: list[torch.Tensor] = []
        hooks = [blk.mlp.register_forward_hook(lambda _m, _i, out: ffn.append(out)) for blk in self.teacher.model.blocks]
        try:
            self.teacher.tokens(spec)
        finally:
            for h in hooks:
                h.remove()
        return data2vec_targets([t[:, 1:] for t in ffn], self.cfg.top_k, instance_norm_layers=True,
                                layer_norm_targets=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        spec = self.preprocess(batch)
        mask = self.time_mask(spec)
        y = self.targets(spec)[mask]
        h = self.backbone.tokens(spec, mask=mask)[:, 1:]
        pred = self.regression_head(h[mask])
        loss = data2vec_loss(pred, y, beta=self.cfg.loss_beta)
        metrics = {"data2vec/ema_decay": self.ema_decay_now.detach().clone()}
        with torch.no_grad():
            metrics["data2vec/target_var"] = y.float().var(0).mean() if len(y) > 1 else y.new_zeros(())
            metrics["data2vec/pred_var"] = pred.detach().float().var(0).mean() if len(pred) > 1 else y.new_zeros(())
            metrics["data2vec/masked"] = mask.float().mean()
        return StepOutput(loss, metrics, embeddings=h.mean(dim=1).detach())

    @torch.no_grad()
    def on_step_end(self, progress: Progress) -> None:
        super().on_step_end(progress)  # the blocks' EMA (AnnealedBlockEMA)
        # ema_transformer_only: the teacher reads the student's input layers (patch embedding, CLS, positions)
        t, s = self.teacher.model, self.backbone.model
        for name in ("patch_embed", "norm_pre", "norm"):
            getattr(t, name).load_state_dict(getattr(s, name).state_dict())
        t.cls_token.copy_(s.cls_token)
        t.pos_embed.copy_(s.pos_embed)
