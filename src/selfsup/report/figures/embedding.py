"""A 2-D map (UMAP, else t-SNE, else PCA) of test-split features coloured by class."""

from __future__ import annotations

import logging

import numpy as np
import torch

from selfsup.report.data import _Skip
from selfsup.report.figures._plot import _figure

log = logging.getLogger("selfsup")

_TINY_SET = 50  # below this many points the 2-D map uses PCA (UMAP / t-SNE need neighbours)


def project_2d(feats: np.ndarray | torch.Tensor, how: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of (N, D) features and the name of the projection used.

    Features are L2-normalized first (Euclidean distance on the sphere ranks neighbours as
    cosine similarity does, the metric SSL embeddings are trained with). ``how``: "auto" (UMAP
    when ``umap-learn`` imports, else t-SNE, else PCA; PCA below 50 points), "umap", "tsne"
    or "pca". A projection that fails falls back to the next one.
    """
    x = torch.as_tensor(feats).double()
    x = torch.nn.functional.normalize(x.reshape(x.shape[0], -1), dim=1).numpy()
    n = x.shape[0]
    if n < 3:
        raise _Skip(f"only {n} points: nothing to map")
    order = {"auto": ["umap", "tsne", "pca"], "umap": ["umap", "tsne", "pca"], "tsne": ["tsne", "pca"],
             "pca": ["pca"]}.get(how)
    if order is None:
        raise ValueError(f"projection must be auto, umap, tsne or pca, got {how!r}")
    if n < _TINY_SET:
        order = ["pca"]
    for name in order:
        try:
            if name == "umap":
                import umap  # optional and slow to import (numba): only here

                reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), min_dist=0.1, random_state=seed)
                return np.asarray(reducer.fit_transform(x)), "UMAP"
            if name == "tsne":
                from sklearn.manifold import TSNE

                tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed)
                return np.asarray(tsne.fit_transform(x)), "t-SNE"
        except Exception as err:  # ImportError or a failing fit: fall back to the next one
            log.debug("report: %s projection failed: %s", name, err)
            continue
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.column_stack([coords, np.zeros(n)])
    return coords, "PCA"


def fig_embedding(metrics, summary, model, projection: str = "auto", seed: int = 0):
    feats, labels = model.features
    ds = model.dataset
    coords, name = project_2d(feats, projection, seed)
    fig, (ax,) = _figure(1, panel_w=7.4, panel_h=5.6)
    labeled = ds.has_labels
    if labeled:
        import matplotlib

        classes = ds.classes
        cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo"]
        lab = labels.numpy()
        for c, cname in enumerate(classes):
            pts = coords[lab == c]
            if len(pts):
                color = cmap(c if len(classes) <= 20 else c / max(1, len(classes) - 1))
                ax.scatter(pts[:, 0], pts[:, 1], s=9, alpha=0.8, color=color, label=cname, linewidths=0)
        if len(classes) <= 20:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, markerscale=2.0, frameon=False,
                      title="class")
    else:
        ax.scatter(coords[:, 0], coords[:, 1], s=9, alpha=0.7, color="tab:blue", linewidths=0)
    ax.set_title(f"{name} of test-split features ({len(coords)} images"
                 f"{'' if labeled else ', unlabeled'})")
    ax.set_xlabel(f"{name} 1")
    ax.set_ylabel(f"{name} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig
