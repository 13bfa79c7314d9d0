"""Jigsaw puzzles (Noroozi, Favaro 2016, "Unsupervised Learning of Visual Representations by
Solving Jigsaw Puzzles", ECCV).

A view of each image is cut into a 3x3 grid of cells and one tile is cropped at a random
position inside each cell (gaps hide edge continuity); a permutation index y is drawn uniformly
per image from a fixed set P = {π_1..π_K} of permutations with large Hamming distances
(Algorithm 1, see ``selfsup.pretext.permutations``), and the tiles are fed in the order
(t_{π_y(1)}, ..., t_{π_y(9)}). The context-free network (CFN) encodes every tile with the SAME
backbone f (one pass over all 9B tiles), maps it with a shared per-tile layer g (the paper's fc6,
1024-d), concatenates the 9 codes in the shuffled order and a classifier h (fc7 4096 -> fc8 K)
predicts y:

    loss = 1/B Σ_b -log softmax(h([g(f(t_{b,π(1)})), ..., g(f(t_{b,π(9)}))]))_{y_b}.

Shortcut prevention (sec. 3): each tile is normalized to zero mean and unit std on its own
(per channel here), tiles are separated by random gaps, each colour channel of a colour tile is
shifted by its own random ±0/1/2 pixels (chromatic aberration), and part of the images are
grayscale (the view's ``grayscale_p``). ``jigsaw_acc`` logs the pretext accuracy.

Evaluation features (``eval_input``): the backbone is trained on tiles, so by default ``encode(x)``
cuts the evaluation image into the same grid, takes the central ``tile``-px tile of each cell (no
gap jitter), normalizes each as in training and averages the backbone's features of the tiles:
the protocol of Kolesnikov, Zhai, Beyer 2019 ("Revisiting Self-Supervised Visual Representation
Learning", CVPR; official evaluation config: 3x3 patches of the training tile size, no jitter,
per-patch standardization, representations average-pooled over the patches). ``eval_input=image``
gives the backbone on the whole image instead, which is what an exported backbone computes; on
32-px CIFAR it stayed below random init at every budget measured (BENCHMARKS.md). With
``input=image`` (JiGen) the backbone trains on whole images and is evaluated on them.

Paper defaults (ImageNet, AlexNet-based CFN): 225-px random crop of the image's central square
resized to 255 px, 75-px cells, 64-px tiles; K = 1000 permutations (maximal average Hamming
distance); per-tile fc6 1024, fc7 4096, dropout; SGD lr 0.01 divided by 10 every 100k
iterations, 350k iterations at batch 256 (official solver_cfn_jps.prototxt: momentum 0.9,
weight decay 5e-4); the released Caffe data layer instead cuts 64-px tiles from 85-px cells of a
255-px crop. Defaults here: the paper's geometry when the view is 225 px (``tile_size`` None gives
round(cell x 64/75)), K = 1000 chosen by Algorithm 1 from 100k candidates (``perm_criterion=maxmin``
keeps the average distance and raises the minimum, see ``selfsup.pretext.permutations``), ±2-px
channel jitter, fc6 1024, fc7 4096. Departures: BN replaces dropout in the heads (as the VISSL
ResNet-50 jigsaw head); see the recipes for the ResNet optimizer and the 32-px CIFAR puzzle.

``input=image`` is the whole-image variant of JiGen (Carlucci et al. 2019, "Domain Generalization
by Solving Jigsaw Puzzles", CVPR; official code: a 3x3 grid of whole cells, 30 permutations, no
per-tile normalization, 10% grayscale tiles): the shuffled tiles are put back into one
``grid*tile``-px image, the backbone runs once per image, and an MLP on its feature predicts y.
The backbone then sees whole images as it will downstream; JiGen's extra "unshuffled" class is
not included. Set ``tile_size`` to the cell size for JiGen's gapless grid and ``tile_norm`` false
for its raw tiles.

Example (the CIFAR recipe's puzzle on a batch):
    >>> method = build_method(load_config("configs/jigsaw/cifar10.yaml"))
    >>> tiles, labels = method.make_puzzles(images)  # (B, 9, 3, 9, 9), (B,) permutation indices
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.core.method import MethodConfig, StepOutput
from selfsup.errors import ConfigError
from selfsup.heads import mlp
from selfsup.losses import classification_loss
from selfsup.modalities.image import ImageMethod
from selfsup.pretext.permutations import (
    CRITERIA,
    assemble_tiles,
    extract_tiles,
    hamming_permutations,
    normalize_tiles,
    shuffle_tiles,
    tile_positions,
)
from selfsup.registry import register_method

PAPER_TILE_FRACTION = 64 / 75  # 64-px tiles in 75-px cells
INPUTS = ("tiles", "image")


@dataclass
class JigsawConfig(MethodConfig):
    """Only ``augment.views[0]`` is used (the image the puzzle is cut from)."""

    name: str = "jigsaw"
    n_permutations: int = 1000  # K, the number of classes
    grid: int = 3  # grid x grid tiles
    tile_size: int | None = None  # None: round(cell * 64/75), the paper's tile/cell ratio
    tile_input_size: int | None = None  # resize tiles to this side for the backbone (ViTs need img_size)
    input: str = "tiles"  # tiles: the paper's CFN, one backbone pass per tile; image: JiGen's reassembled image
    eval_input: str | None = None  # features: mean over the grid's tiles, or the whole image; None: as trained
    tile_norm: bool = True  # zero mean, unit std per tile and channel (paper sec. 3)
    channel_jitter: int = 2  # ±pixels each colour channel of a colour tile moves (paper: 2)
    tile_dim: int = 1024  # shared per-tile layer (fc6); 0 concatenates the backbone features
    hidden_dim: int = 4096  # classifier hidden layer (fc7)
    perm_pool: int = 100_000  # candidate permutations scanned by the greedy selection (0: all)
    perm_criterion: str = "mean"  # mean: Algorithm 1 (max average distance); maxmin: max minimum
    perm_seed: int = 0
    min_batch_size = 2  # BN in the classifier needs two puzzles

    def validate(self) -> None:
        if not 2 <= self.grid <= 4:
            raise ConfigError(f"method.grid={self.grid}: must be 2, 3 or 4")
        n_tiles = self.grid * self.grid
        limit = math.factorial(n_tiles) if self.perm_pool <= 0 else min(self.perm_pool, math.factorial(n_tiles))
        if not 2 <= self.n_permutations <= limit:
            raise ConfigError(f"method.n_permutations={self.n_permutations}: must be in [2, {limit}] "
                              f"({n_tiles} tiles, perm_pool {self.perm_pool})")
        if self.perm_pool <= 0 and n_tiles > 9:
            raise ConfigError(f"method.perm_pool=0 (all {n_tiles}! permutations) is only possible up to 3x3 tiles")
        for key in ("input", "eval_input"):
            value = getattr(self, key)
            if value not in INPUTS and not (key == "eval_input" and value is None):
                raise ConfigError(f"method.{key}={value!r}: must be one of {', '.join(INPUTS)}")
        if self.input == "image" and self.tile_input_size is not None:
            raise ConfigError("method.tile_input_size resizes single tiles: it only applies to method.input=tiles "
                              "(with input=image the backbone sees grid x tile_size pixels)")
        if self.perm_criterion not in CRITERIA:
            raise ConfigError(f"method.perm_criterion={self.perm_criterion!r}: must be one of {', '.join(CRITERIA)}")
        for key in ("tile_size", "tile_input_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"method.{key}={value}: must be >= 1 (or null)")
        if self.channel_jitter < 0:
            raise ConfigError(f"method.channel_jitter={self.channel_jitter}: must be >= 0")
        if self.tile_dim < 0 or self.hidden_dim < 1:
            raise ConfigError("method.tile_dim must be >= 0 and method.hidden_dim >= 1")


@register_method
class Jigsaw(ImageMethod):
    name = "jigsaw"
    paper = "Noroozi & Favaro 2016, Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles"
    family = "pretext"
    Config = JigsawConfig
    single_view = True

    def __init__(self, cfg: JigsawConfig, backbone, augment) -> None:
        super().__init__(cfg, backbone, augment)
        size = augment.views[0].size
        self.cell = size // cfg.grid
        self.tile = cfg.tile_size if cfg.tile_size is not None else max(1, round(self.cell * PAPER_TILE_FRACTION))
        if self.cell < 1 or self.tile > self.cell:
            raise ConfigError(f"method.tile_size={self.tile} does not fit a {cfg.grid}x{cfg.grid} grid of "
                              f"{self.cell}-px cells in the {size}-px view augment.views.0.size")
        self.n_tiles = cfg.grid * cfg.grid
        self.eval_input = cfg.eval_input or cfg.input  # what encode() reads: as trained unless told
        # part of the model: the classifier's output k means permutation k; saved in checkpoints
        perms = hamming_permutations(cfg.n_permutations, self.n_tiles, cfg.perm_pool, cfg.perm_seed,
                                     cfg.perm_criterion)
        self.register_buffer("permutations", perms)
        dim = backbone.out_dim
        self.tile_head = nn.Identity()
        if cfg.input == "tiles" and cfg.tile_dim > 0:  # fc6, shared by the 9 tiles
            self.tile_head = nn.Sequential(nn.Linear(dim, cfg.tile_dim, bias=False), nn.BatchNorm1d(cfg.tile_dim),
                                           nn.ReLU(inplace=True))
            dim = cfg.tile_dim
        # fc7 -> fc8 on the 9 concatenated tile codes, or on the one feature of a reassembled image
        in_dim = self.n_tiles * dim if cfg.input == "tiles" else dim
        self.classifier = mlp(in_dim, cfg.hidden_dim, cfg.n_permutations, 2)

    def make_puzzles(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shuffled tiles ``(B, T, C, t, t)`` of a uint8 batch (each normalized on its own when
        ``tile_norm``) and the index of the permutation each image got ``(B,)``: position i of
        puzzle b holds tile ``permutations[labels[b], i]`` (cells numbered row-major).
        ``image_sizes`` (B, 2): each image's own size in a padded batch (see ``ImageMethod.make_views``).
        The view is made here, not by ``make_views``: the tiles need its grayscale draws."""
        view = self.views[0]
        batch, _, height, width = images.shape
        params = view.sample_params(batch, height, width, device=images.device, image_sizes=image_sizes)
        x = view.apply_params(images, params)
        color = None if params.grayscale is None else ~params.grayscale
        top, left = tile_positions(batch, view.cfg.size, self.cfg.grid, self.tile, self.cfg.channel_jitter,
                                   color, channels=x.shape[1], device=x.device)
        tiles = extract_tiles(x, top, left, self.tile)
        labels = torch.randint(0, self.cfg.n_permutations, (batch,), device=x.device)  # one per image
        shuffled = shuffle_tiles(tiles, self.permutations[labels])
        return (normalize_tiles(shuffled) if self.cfg.tile_norm else shuffled), labels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation features of normalized images ``(B, C, S, S)``: the mean of the backbone's
        features of the grid's central tiles (``eval_input=tiles``, the default for tile training),
        or the backbone on the whole image."""
        if self.eval_input == "image":
            return self.backbone(x)
        batch, channels, size = x.shape[0], x.shape[1], x.shape[-1]
        if x.shape[-2] != size or self.tile > size // self.cfg.grid:
            raise ConfigError(f"jigsaw's tile features need a square image of at least {self.cfg.grid * self.tile} px "
                              f"(got {tuple(x.shape[-2:])}); method.eval_input=image evaluates whole images")
        top, left = tile_positions(batch, size, self.cfg.grid, self.tile, channels=channels, device=x.device,
                                   centred=True)  # each cell's central tile
        tiles = extract_tiles(x, top, left, self.tile)
        feats = self._tile_features((normalize_tiles(tiles) if self.cfg.tile_norm else tiles).flatten(0, 1))
        return feats.reshape(batch, self.n_tiles, -1).mean(dim=1)

    def export_note(self) -> str:
        if self.eval_input == "image":
            return ""
        norm = ", each normalized to zero mean and unit std per channel" if self.cfg.tile_norm else ""
        return (f"jigsaw's evaluation feature is the mean of this backbone's features of the {self.cfg.grid}x"
                f"{self.cfg.grid} grid's central {self.tile}-px tiles{norm} (method.eval_input=tiles); on the "
                f"whole image it computes method.eval_input=image's feature")

    def _tile_features(self, flat: torch.Tensor) -> torch.Tensor:
        """The backbone on tiles ``(N, C, t, t)``, resized to ``tile_input_size`` first if set."""
        if self.cfg.tile_input_size is not None and self.cfg.tile_input_size != self.tile:
            size = (self.cfg.tile_input_size,) * 2
            flat = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
        return self.backbone(self.layout(flat))

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        tiles, labels = self.make_puzzles(*self.view_inputs(batch))
        n = tiles.shape[0]
        if self.cfg.input == "image":  # position i of the grid holds tile permutations[label, i]
            feats = self.backbone(self.layout(assemble_tiles(tiles, self.cfg.grid)))
            loss, acc = classification_loss(self.classifier(feats), labels)
            return StepOutput(loss=loss, metrics={"jigsaw_acc": acc}, embeddings=feats.detach())
        feats = self._tile_features(tiles.flatten(0, 1))  # every tile of every puzzle in one pass
        codes = self.tile_head(feats).reshape(n, -1)  # concatenated in the shuffled order
        loss, acc = classification_loss(self.classifier(codes), labels)
        first_tiles = feats.reshape(n, self.n_tiles, -1)[:, 0]  # what the collapse monitor watches
        return StepOutput(loss=loss, metrics={"jigsaw_acc": acc}, embeddings=first_tiles.detach())
