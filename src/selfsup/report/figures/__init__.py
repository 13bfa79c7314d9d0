"""The report's figures, in page order. Each draw function takes ``(metrics, summary, model)``
(the embedding map also ``projection`` and ``seed``) and returns a matplotlib Figure or raises
``_Skip`` with the reason it cannot be drawn for this run."""

from __future__ import annotations

from collections.abc import Callable

from selfsup.report.figures.attention import fig_attention
from selfsup.report.figures.embedding import fig_embedding
from selfsup.report.figures.knn import fig_knn
from selfsup.report.figures.loss import fig_loss
from selfsup.report.figures.metrics import fig_metrics
from selfsup.report.figures.predictions import fig_predictions
from selfsup.report.figures.monitor import fig_monitor
from selfsup.report.figures.prototypes import fig_prototypes
from selfsup.report.figures.reconstruction import fig_reconstruction
from selfsup.report.figures.schedules import fig_schedules
from selfsup.train.monitor import STD_ALARM, UNIFORM_ALARM

__all__ = ["FIGURES", "fig_attention", "fig_embedding", "fig_knn", "fig_loss", "fig_metrics", "fig_monitor",
           "fig_predictions", "fig_prototypes", "fig_reconstruction", "fig_schedules"]

# (file stem, title, caption, draw)
FIGURES: list[tuple[str, str, str, Callable]] = [
    ("loss", "Training loss", "Loss per logged optimizer step; the thick line is an exponential moving average.",
     fig_loss),
    ("schedules", "Schedules", "Learning rate and weight decay as applied at each step (warm-up then cosine), "
     "plus EMA momentum / teacher schedules when the method logs them.", fig_schedules),
    ("monitor", "Collapse monitor", "Embedding std of one view after L2 normalization, times sqrt(d): 1 is an "
     f"isotropic spread, below {STD_ALARM:g} (red line) the embeddings are collapsing. Effective rank is RankMe "
     "on the same batch (bounded by min(batch, d)). Student-teacher cosine, when present, near 1 for a long time "
     "can also signal collapse. Prediction uniformity (DINO, DINOv2, SwAV): the student's prediction entropy over "
     f"ln K; above {UNIFORM_ALARM:g} every prediction is uniform and the loss sits at ln K.", fig_monitor),
    ("metrics", "Throughput and method metrics", "Training images per second and the method's own metrics.",
     fig_metrics),
    ("knn", "kNN accuracy", "Weighted kNN top-1 on the labeled test split with the training split as the bank. "
     "Random init is the same architecture with the same seed, untrained: the gap is what pretraining bought.",
     fig_knn),
    ("embedding", "Embedding map", "Backbone features of a seeded random subset of the test split, projected to "
     "2-D and coloured by class: well-separated clusters mean classes are linearly (or kNN-) separable.",
     fig_embedding),
    ("attention", "Attention maps", "Attention of the CLS token to each patch in the last transformer block, "
     "averaged over heads and overlaid on the input (bright = attended).", fig_attention),
    ("prototypes", "Prototype usage", "Test images assigned to each prototype (argmax of the prototype scores), "
     "sorted. A few heavily used prototypes and many empty ones mean partial collapse; perplexity is the "
     "effective number of prototypes in use.", fig_prototypes),
    ("reconstruction", "Reconstructions", "Originals, the masked inputs the encoder saw, and the decoder's "
     "reconstructions.", fig_reconstruction),
    ("predictions", "Predictions", "Language models on test texts: masked tokens as [original→top-3 guesses], or "
     "a prompt >> the greedy continuation.", fig_predictions),
]
