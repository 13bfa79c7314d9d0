"""V-JEPA 2-AC (Assran et al. 2025, "V-JEPA 2: Self-Supervised Video Models Enable Understanding, Prediction and
Planning", sec. 4; official facebookresearch/vjepa2 ``src/models/ac_predictor.py``, ``app/vjepa_droid/train.py``,
``configs/train/vitg16/droid-256px-8f.yaml``): an action-conditioned world model on a frozen V-JEPA 2 encoder.

The encoder (``backbone``, started from a V-JEPA 2 run with ``backbone.init`` and frozen) encodes every frame of a
clip on its own, as a clip of ``tubelet_size`` copies of it, and its tokens are layer-normed over the features:
h_t (N tokens of D) for frames t = 0 .. T-1. The predictor P reads, per frame t, the action token a_t
(``Linear(action_dim -> D_p)``), the state token s_t (``Linear(state_dim -> D_p)``) and the frame's tokens
(``Linear(D -> D_p)``), in that order, under a block-causal attention mask (a token of frame t sees every token of
frames <= t), with V-JEPA 2's 3-D RoPE (frame tokens rotated by (t, h, w), action and state tokens by their time
only: the official ``ACRoPEAttention``), then LayerNorm and ``Linear(D_p -> D)``; its output at frame t predicts
h_{t+1}. Training, both losses L1 on layer-normed predictions (``loss_exp`` 1):

- teacher forcing: ẑ_{1..T-1} = LN(P(h_{0..T-2}, a_{0..T-2}, s_{0..T-2})), L_tf = mean |ẑ - h_{1..T-1}|;
- rollout (``rollout_steps`` = 2, the official ``auto_steps``): starting from [h_0, ẑ_1], each next frame is the
  predictor's last output on its own previous predictions, L_ro = mean |[ẑ_1, ẑ_2, ...] - h_{1..k}|, ground-truth
  states fed throughout;

L = L_tf + L_ro; only the predictor trains.

Planning (``selfsup.eval.planning.cem_plan``, ``selfsup eval plan``): from the current frame's tokens and state and
a goal frame's tokens, the cross-entropy method samples action sequences, rolls the predictor out over them and
keeps the ones whose last predicted frame is closest (mean L1) to the goal.

Defaults (``droid-256px-8f.yaml``): predictor 24 blocks x 1024 wide x 16 heads, 8 frames at 4 fps, 256 px, 7-D
end-effector states and actions (state differences), AdamW, weight decay 0.04, lr 7.5e-5 -> 4.25e-4 over 4,500
warm-up steps, constant, then a linear decay to 0 over the last 4,500 (94,500 steps), batch 256, 62 hours of
DROID. On the embedded clips (``configs/vjepa2_ac/embedded_cpu.yaml``) the action is the object's motion (dy, dx)
in pixels per frame and the state its displacement since the first frame, both given by the data (``motion``).

Departures: no augmentation (a crop or flip changes what an action does to the frame, so none is drawn; the
official DROID loader crops the same way every frame too); the frame encoder is whichever ``backbone.init``
gives (the paper's is its own frozen V-JEPA 2 ViT-g).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.backbones.video import Block
from selfsup.core.method import StepOutput
from selfsup.errors import ConfigError
from selfsup.modalities.video import BATCH_KEY, VideoMethod, VideoMethodConfig
from selfsup.nn.predictors import official_init_
from selfsup.registry import register_method


@dataclass
class VJEPA2ACConfig(VideoMethodConfig):
    name: str = "vjepa2_ac"
    action_dim: int = 7  # DROID: end-effector deltas (xyz, euler, gripper); the embedded clips: 2, (dy, dx)
    state_dim: int = 7
    pred_dim: int = 1024
    pred_depth: int = 24
    pred_heads: int = 16
    rollout_steps: int = 2  # frames predicted from the predictor's own outputs (official auto_steps)
    flip: bool = False

    def validate(self) -> None:
        super().validate()
        if min(self.action_dim, self.state_dim, self.pred_dim, self.pred_depth, self.pred_heads, self.rollout_steps) < 1:
            raise ConfigError("method.action_dim, state_dim, pred_dim, pred_depth, pred_heads and rollout_steps must be >= 1")
        if self.pred_dim % self.pred_heads or self.pred_dim // self.pred_heads < 6:
            raise ConfigError(f"method.pred_dim={self.pred_dim} must be a multiple of method.pred_heads={self.pred_heads} "
                              "with at least 6 channels per head (3-D RoPE)")
        if self.flip:
            raise ConfigError("method.flip=true: a mirrored clip is moved by other actions than the data's; vjepa2_ac "
                              "trains on the frames as they are")


def block_causal_mask(frames: int, per_frame: int, device: torch.device | None = None) -> torch.Tensor:
    """(F·n, F·n) bool, True where attention is allowed: a token of frame t sees every token of frames <= t
    (the official ``build_action_block_causal_attention_mask``)."""
    frame = torch.arange(frames, device=device).repeat_interleave(per_frame)
    return frame[:, None] >= frame[None, :]


class ACPredictor(nn.Module):
    """V-JEPA 2-AC's ``VisionTransformerPredictorAC`` (see the module docstring): per frame [action, state, tokens]
    in, under block-causal attention with 3-D RoPE; out, per frame, the predicted tokens of the next frame."""

    def __init__(self, enc_dim: int, action_dim: int, state_dim: int, pred_dim: int, depth: int, heads: int,
                 grid_hw: tuple[int, int]) -> None:
        super().__init__()
        self.grid_hw = tuple(grid_hw)
        self.embed = nn.Linear(enc_dim, pred_dim)
        self.action_embed = nn.Linear(action_dim, pred_dim)
        self.state_embed = nn.Linear(state_dim, pred_dim)
        self.blocks = nn.ModuleList(Block(pred_dim, heads, 4.0, 0.0, False, None) for _ in range(depth))
        self.norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.proj = nn.Linear(pred_dim, enc_dim)
        official_init_(self)  # the official init_video_model: trunc-normal(0.02) Linear, LayerNorm 1 / 0

    def coords(self, frames: int, device: torch.device) -> torch.Tensor:
        """(F·(2 + H·W), 3) (t, h, w) of every token: action and state tokens at (t, 0, 0) (rotated by their time
        only: a zero angle leaves the row and column channels as they are)."""
        h, w = self.grid_hw
        rows = torch.arange(h, device=device).repeat_interleave(w)
        cols = torch.arange(w, device=device).repeat(h)
        per = torch.stack([torch.zeros(h * w + 2, device=device), torch.cat([rows.new_zeros(2), rows]).float(),
                           torch.cat([cols.new_zeros(2), cols]).float()], dim=1)
        out = per.unsqueeze(0).repeat(frames, 1, 1)
        out[:, :, 0] = torch.arange(frames, device=device).float()[:, None]
        return out.flatten(0, 1)

    def forward(self, tokens: torch.Tensor, actions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """tokens (B, F, N, D) of frames 0..F-1, actions (B, F, A) and states (B, F, S) at those frames ->
        (B, F, N, D): at frame t the prediction of frame t + 1's tokens (before the final layer norm of the loss)."""
        b, f, n, _ = tokens.shape
        x = torch.cat([self.action_embed(actions.to(tokens.dtype)).unsqueeze(2),
                       self.state_embed(states.to(tokens.dtype)).unsqueeze(2), self.embed(tokens)], dim=2)
        x = x.flatten(1, 2)
        coords = self.coords(f, x.device).expand(b, -1, -1)
        mask = block_causal_mask(f, n + 2, x.device)
        for block in self.blocks:
            x = block(x, coords, None, mask)
        return self.proj(self.norm(x.view(b, f, n + 2, -1)[:, :, 2:]))


@register_method
class VJEPA2AC(VideoMethod):
    name = "vjepa2_ac"
    paper = "Assran et al. 2025, V-JEPA 2-AC: an action-conditioned world model on V-JEPA 2"
    family = "world model"
    Config = VJEPA2ACConfig

    def __init__(self, cfg: VJEPA2ACConfig, backbone, augment=None) -> None:
        super().__init__(cfg, backbone, augment)
        if backbone.num_frames - 1 < cfg.rollout_steps:
            raise ConfigError(f"vjepa2_ac: clips of {backbone.num_frames} frames leave {backbone.num_frames - 1} to predict, "
                              f"fewer than method.rollout_steps={cfg.rollout_steps}")
        backbone.requires_grad_(False)  # the frame encoder is frozen; only the predictor trains
        _, h, w = backbone.grid_size
        self.predictor = ACPredictor(backbone.embed_dim, cfg.action_dim, cfg.state_dim, cfg.pred_dim, cfg.pred_depth,
                                     cfg.pred_heads, (h, w))

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout or stochastic depth in the frame encoder
        return self

    @torch.no_grad()
    def frame_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized clips (B, 3, T, H, W) -> (B, T, N, D): each frame encoded alone (``tubelet_size`` copies of it),
        its tokens layer-normed over the features (the official ``normalize_reps``)."""
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, 1, h, w).expand(-1, -1, self.backbone.tubelet_size, -1, -1)
        tokens = self.backbone.tokens(frames)
        return F.layer_norm(tokens, (tokens.shape[-1],)).view(b, t, tokens.shape[1], -1)

    def actions_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(actions (B, T-1, A), states (B, T, S)) of a batch: its ``actions`` and ``states``, or from ``motion`` (the
        embedded clips' per-frame displacement): actions = motion, states = displacement since the first frame."""
        if "actions" in batch and "states" in batch:
            actions, states = batch["actions"].float(), batch["states"].float()
        elif "motion" in batch:
            actions = batch["motion"].float()
            states = torch.cat([actions.new_zeros(actions.shape[0], 1, actions.shape[2]), actions.cumsum(1)], dim=1)
        else:
            raise ConfigError(f"{self.name} trains on clips with actions: a batch with 'actions' and 'states' (or the "
                              "embedded clips' 'motion'); this one has " + ", ".join(sorted(batch)))
        t = batch[BATCH_KEY].shape[1]
        if actions.shape[1:] != (t - 1, self.cfg.action_dim) or states.shape[1:] != (t, self.cfg.state_dim):
            raise ConfigError(f"{self.name}: clips of {t} frames need actions (B, {t - 1}, {self.cfg.action_dim}) and states "
                              f"(B, {t}, {self.cfg.state_dim}) (method.action_dim, method.state_dim); got "
                              f"{tuple(actions.shape)} and {tuple(states.shape)}")
        return actions, states

    def predict_next(self, tokens: torch.Tensor, actions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Layer-normed predictions (B, F, N, D) of frames 1..F from frames 0..F-1 and their actions and states."""
        out = self.predictor(tokens, actions, states)
        return F.layer_norm(out, (out.shape[-1],))

    def rollout(self, first: torch.Tensor, actions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Autoregressive prediction from one frame's tokens (B, N, D) over actions (B, k, A) at states (B, k, S):
        (B, k, N, D), the k frames after it, each predicted from the previous predictions."""
        z = first.unsqueeze(1)
        for step in range(actions.shape[1]):
            nxt = self.predict_next(z, actions[:, :step + 1], states[:, :step + 1])[:, -1:]
            z = torch.cat([z, nxt], dim=1)
        return z[:, 1:]

    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> StepOutput:
        batch = self.check(batch)
        actions, states = self.actions_states(batch)
        h = self.frame_tokens(self.preprocess(batch))  # (B, T, N, D)
        z_tf = self.predict_next(h[:, :-1], actions, states[:, :-1])
        loss_tf = (z_tf.float() - h[:, 1:].float()).abs().mean()
        k = self.cfg.rollout_steps
        z = torch.cat([h[:, :1], z_tf[:, :1]], dim=1)
        preds = [z_tf[:, :1]]
        for step in range(1, k):
            nxt = self.predict_next(z, actions[:, :step + 1], states[:, :step + 1])[:, -1:]
            z = torch.cat([z, nxt], dim=1)
            preds.append(nxt)
        loss_ro = (torch.cat(preds, dim=1).float() - h[:, 1:k + 1].float()).abs().mean()
        metrics = {f"{self.name}/teacher_forcing": loss_tf.detach(), f"{self.name}/rollout": loss_ro.detach()}
        return StepOutput(loss_tf + loss_ro, metrics, embeddings=z_tf.detach().mean(dim=(1, 2)))
