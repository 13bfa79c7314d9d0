"""BEiT (Bao, Dong, Piao, Wei 2022, "BEiT: BERT Pre-Training of Image Transformers", ICLR).

Masked image modeling with discrete targets, BERT-style (sec. 2; official ``modeling_pretrain.py``
and ``engine_for_pretraining.py``). For a crop x with N patches:

1. a tokenizer maps the **unmasked** crop to visual tokens z_1..z_N ∈ {1..V} (no gradient);
2. blockwise masking picks a set M of about 40% of the patches (Algorithm 1: rectangles of at
   least 16 patches, aspect 0.3-1/0.3, until 75 of 196 are masked; ``pretext.masking.block_masking``);
3. the embeddings of the masked patches are replaced by a learnable mask token e_[M], position
   embeddings are added and the ViT encodes the whole corrupted sequence [CLS; x^M];
4. a linear head on the final LayerNorm'd tokens predicts the visual token of each masked patch:
   p(z_i | x^M) = softmax(W h_i + b), and the loss is the cross-entropy over masked patches only,

       L = - 1/Σ|M| Σ_x Σ_{i ∈ M} log p(z_i | x^M)      (eq. 1; ``losses.beit_loss``).

**Tokenizer.** The paper uses the DALL-E dVAE (V = 8,192) on a separate 112-px view of the same
crop. Its weights cannot be downloaded here, so by default the method fits its own tokenizer:
a k-means codebook of ``vocab_size`` codes over per-patch-normalized patches of the augmented
training crops (``pretext.tokenizer.PatchKMeansTokenizer``, mini-batch k-means seeded by
k-means++), fitted once at the start of pretraining (``prepare``), stored in the checkpoint as a
buffer (a resumed run does not refit) and copied to ``RUN/tokenizer.safetensors``. It sees the
same crop and patch grid as the ViT. ``method.tokenizer_path`` loads a codebook fitted ahead of
time (``selfsup tokenizer fit``) or an external TorchScript tokenizer (module: normalized view
(B, C, H, W) -> ids (B, N) or (B, gh, gw); set ``method.vocab_size`` to its vocabulary).

Defaults (paper sec. 2.5 / appendix, official ``run_beit_pretraining.py`` and README command for
ImageNet-1k): ViT-B/16 at 224 px, V = 8,192, 75 masked patches, min 16 patches per block, aspect
≥ 0.3; RandomResizedCrop (0.08-1, bicubic) + horizontal flip + colour jitter (0.4, 0.4, 0.4);
AdamW lr 1.5e-3 at batch 2048, betas (0.9, 0.999) in the paper (the script's default is 0.98),
weight decay 0.05, 10 warm-up epochs then cosine to 1e-5, gradient clipping 3.0, 800 epochs,
stochastic depth 0.1, layer scale 0.1, shared relative position bias; head ``lm_head``
Linear(D, V) with truncated-normal std 0.02 weights and zero bias; mask token N(0, 0.02).

Implementation notes: the masks come from the default generator, which the trainer seeds per step
(resume replays them). The view is ``augment.views[0]`` (BEiT trains on one view). Logits are
computed only at masked positions, as ``lm_head(x[bool_masked_pos])``. ``metrics["beit/mlm_acc"]``
is the official top-1 accuracy of the predicted tokens. The collapse monitor watches the pooled
encoding of the corrupted crop. Layer scale is ``backbone.layer_scale`` (0.1 in the ImageNet
recipe); our ViT (``backbones/vit.py``) has no relative position bias or BEiT's depth-scaled init
of the residual projections (departures; see the recipes).
Downstream the CLS token is never trained by this loss, so the recipes pool the mean patch token
(BEiT's fine-tuning default, ``use_mean_pooling``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup import dist
from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError, TrainingError
from selfsup.losses import beit_loss
from selfsup.modalities.image import ImageMethod
from selfsup.pretext.masking import block_masking
from selfsup.pretext.tokenizer import (
    PatchKMeansTokenizer,
    load_tokenizer_file,
    sample_patch_features,
)
from selfsup.registry import register_method


@dataclass
class BEiTConfig(MethodConfig):
    name: str = "beit"
    vocab_size: int = 8192  # V: DALL-E's codebook size; our k-means codes
    num_masked: int | None = None  # masked patches per image (official: 75 of 196); None -> mask_ratio
    mask_ratio: float = 0.4  # used when num_masked is None: round(ratio x N)
    min_block_patches: int = 16  # smallest block (official min_mask_patches_per_block)
    max_block_patches: int | None = None  # largest block (official: None = num_masked)
    min_aspect: float = 0.3  # block aspect in [0.3, 1/0.3]
    tokenizer_path: str | None = None  # codebook (.pt/.safetensors) or TorchScript tokenizer; None: fit k-means
    tokenizer_patches: int = 1_000_000  # patches sampled from the training crops to fit the codebook
    tokenizer_iters: int = 300  # mini-batch k-means steps
    tokenizer_batch: int = 16384  # patches per k-means step
    tokenizer_eps: float = 0.01  # per-patch normalization: (x - mean) / sqrt(var + eps)
    tokenizer_seed: int = 0

    def validate(self) -> None:
        if self.vocab_size < 2:
            raise ConfigError(f"method.vocab_size={self.vocab_size}: must be >= 2")
        if self.num_masked is not None and self.num_masked < 1:
            raise ConfigError(f"method.num_masked={self.num_masked}: must be >= 1 (or null to use mask_ratio)")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"method.mask_ratio={self.mask_ratio}: must be in (0, 1)")
        if self.min_block_patches < 1:
            raise ConfigError(f"method.min_block_patches={self.min_block_patches}: must be >= 1")
        if self.max_block_patches is not None and self.max_block_patches < self.min_block_patches:
            raise ConfigError(f"method.max_block_patches={self.max_block_patches}: must be >= min_block_patches")
        if not 0.0 < self.min_aspect <= 1.0:
            raise ConfigError(f"method.min_aspect={self.min_aspect}: must be in (0, 1]")
        if self.tokenizer_patches < self.vocab_size:
            raise ConfigError(f"method.tokenizer_patches={self.tokenizer_patches}: must be >= vocab_size")
        if min(self.tokenizer_iters, self.tokenizer_batch) < 1:
            raise ConfigError("method.tokenizer_iters and tokenizer_batch must be >= 1")
        if self.tokenizer_eps <= 0:
            raise ConfigError(f"method.tokenizer_eps={self.tokenizer_eps}: must be > 0")


@register_method
class BEiT(ImageMethod):
    name = "beit"
    paper = "Bao et al. 2022, BEiT: BERT Pre-Training of Image Transformers"
    family = "masked"
    Config = BEiTConfig
    single_view = True

    def __init__(self, cfg: BEiTConfig, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        if not (hasattr(backbone, "tokens") and hasattr(backbone, "mask_token")):
            raise ConfigError("beit needs a ViT backbone with mask tokens: backbone.name=vit_tiny, vit_small, "
                              "vit_base or vit_large")
        self.tokenizer = PatchKMeansTokenizer(cfg.vocab_size, backbone.patch_size, backbone.in_chans,
                                              cfg.tokenizer_eps)
        self.head = nn.Linear(backbone.embed_dim, cfg.vocab_size)  # official lm_head
        nn.init.trunc_normal_(self.head.weight, std=0.02, a=-0.02, b=0.02)  # official trunc_normal_(std, a=-std, b=std)
        nn.init.zeros_(self.head.bias)
        self._script: Any = None  # external TorchScript tokenizer (kept out of the state dict)
        self._checked_ids = False

    # ---- tokenizer -----------------------------------------------------------------------

    def _load_external(self, device: torch.device) -> None:
        """Load ``method.tokenizer_path`` once: a TorchScript tokenizer, or a codebook copied into
        the buffer (a fitted buffer, e.g. from a resumed checkpoint, is kept and the file not read)."""
        if self._script is not None or self.tokenizer.is_fitted:
            return
        kind, obj = load_tokenizer_file(self.cfg.tokenizer_path, map_location=device)
        if kind == "script":
            self._script = obj.to(device)
        else:
            self.tokenizer.load_codebook(obj)

    @torch.no_grad()
    def fit_tokenizer(self, images: Any) -> dict[str, Any]:
        """Fit the k-means codebook on patches of ``images`` (uint8 (N, C, H, W), e.g. the
        training set's ``dataset.images``, or a streamed source: see ``sample_patch_features``),
        each augmented once by the training view; returns the fit's statistics (codes used,
        quantization error, patches, seconds)."""
        import time

        t0 = time.perf_counter()
        c = self.cfg
        device = self.tokenizer.codebook.device
        feats = sample_patch_features(images, self.views[0], self.tokenizer.patch_size, c.tokenizer_patches,
                                      eps=c.tokenizer_eps, device=device, seed=c.tokenizer_seed)
        if feats.shape[0] < c.vocab_size:
            raise ConfigError(f"beit: {len(images)} images give {feats.shape[0]} patches, too few to fit "
                              f"method.vocab_size={c.vocab_size} codes; lower the vocabulary or add data")
        stats = self.tokenizer.fit(feats, iters=c.tokenizer_iters, batch_size=c.tokenizer_batch, seed=c.tokenizer_seed)
        return {**stats, "seconds": time.perf_counter() - t0}

    def prepare(self, dataset, run_dir: str | Path | None = None) -> None:
        """Before the first step (after a resume's state is loaded): load the external tokenizer,
        or fit the k-means codebook on the training set unless the checkpoint brought one. Every
        rank fits the same codebook from the same seed (DDP also broadcasts rank 0's buffers)."""
        if self.cfg.tokenizer_path is not None:
            self._load_external(self.tokenizer.codebook.device)
            return
        if self.tokenizer.is_fitted:
            return
        if dist.is_main():
            print(f"beit: fitting the k-means tokenizer ({self.cfg.vocab_size} codes) on up to "
                  f"{self.cfg.tokenizer_patches} patches of the training crops", file=sys.stderr)
        stats = self.fit_tokenizer(tokenizer_images(dataset))
        if dist.is_main():
            print(f"beit: tokenizer ready in {stats['seconds']:.1f} s ({stats['patches']} patches), "
                  f"{stats['codes_used']} of {stats['codes']} codes used, quantization MSE "
                  f"{stats['quantization_mse']:.3f}", file=sys.stderr)
            if run_dir is not None:
                self.tokenizer.save(Path(run_dir) / "tokenizer.safetensors")

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Visual token ids (B, N) of normalized views ``x``."""
        if self.cfg.tokenizer_path is not None:
            self._load_external(x.device)
        if self._script is not None:
            ids = self._script(x).reshape(x.shape[0], -1).long()
            if not self._checked_ids:  # once: out-of-range ids would crash cross_entropy obscurely
                if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
                    raise ConfigError(f"the tokenizer at {self.cfg.tokenizer_path} returned ids in "
                                      f"[{int(ids.min())}, {int(ids.max())}]; set method.vocab_size to its vocabulary")
                self._checked_ids = True
            return ids
        if not self.tokenizer.is_fitted:
            raise TrainingError("beit's tokenizer is not fitted: call method.prepare(dataset) (the trainer does) "
                                "or set method.tokenizer_path")
        return self.tokenizer(x)

    # ---- training step -------------------------------------------------------------------

    def num_masked_for(self, n: int) -> int:
        k = self.cfg.num_masked if self.cfg.num_masked is not None else round(self.cfg.mask_ratio * n)
        if not 1 <= k < n:
            raise ConfigError(f"beit masks {k} of {n} patches; method.num_masked / mask_ratio must leave "
                              "at least one patch visible and mask at least one")
        return k

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        (x,) = self.make_views(batch)
        ids = self.tokenize(x)  # (B, N) of the unmasked crop
        grid = self.backbone.grid_of(x)
        n = grid[0] * grid[1]
        c = self.cfg
        mask = block_masking(x.shape[0], grid, self.num_masked_for(n), min_patches=c.min_block_patches,
                             min_aspect=c.min_aspect, max_patches=c.max_block_patches, device=x.device)
        tokens = self.backbone.tokens(x, mask=mask)  # (B, 1 + N, D), final-normed
        logits = self.head(tokens[:, 1:][mask])  # (M, V): masked positions only
        labels = ids[mask]
        loss = beit_loss(logits, labels)
        with torch.no_grad():
            acc = (logits.argmax(dim=-1) == labels).float().mean()
            pooled = self.backbone.pool_tokens(tokens).detach()
        return StepOutput(loss=loss, metrics={"beit/mlm_acc": acc}, embeddings=pooled)


def tokenizer_images(dataset: Any) -> Any:
    """What ``fit_tokenizer`` reads from a training source: the decoded tensor of data held in
    memory, else the source itself (a streamed folder, shards, a Python Dataset), read sample by sample."""
    from selfsup.data.datasets import ImageArrayDataset

    return dataset.images if isinstance(dataset, ImageArrayDataset) else dataset
