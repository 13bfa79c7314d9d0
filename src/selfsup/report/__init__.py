"""Run reports: one self-contained HTML page per run directory, with the figures that tell
whether a pretraining run worked.

``write_report(run_dir)`` reads what the trainer leaves in a run directory (``metrics.csv``,
``summary.json``, ``config.yaml``, ``last.ckpt``) and writes ``run_dir/report/report.html``
plus one PNG per figure next to it. The HTML embeds every PNG as a base64 data URI and uses
no external CSS, JavaScript or fonts, so it opens offline and can be mailed as one file.

Figures (each drawn only when its inputs exist; otherwise the page says why in one line):

- training loss against steps (raw and smoothed);
- schedules: learning rate, weight decay, and any EMA momentum / ``teacher_*`` column;
- collapse monitor: normalized embedding std with the alarm line at 0.1, RankMe effective
  rank, student-teacher cosine and any other ``monitor/*`` column;
- throughput and method-specific metrics;
- kNN accuracy: online kNN against epochs when the run logged it, else the final kNN of the
  trained encoder next to the same architecture at random init;
- a 2-D map (UMAP, else t-SNE, else PCA) of test-split features coloured by class;
- method-specific pictures: CLS-token attention of the last block for ViT backbones,
  prototype usage for methods that declare the ``"prototypes"`` figure, and originals /
  masked inputs / reconstructions for methods that declare ``"reconstruction"``.

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure`` rendered by the
Agg canvas), never through pyplot: no display is needed and the caller's backend is untouched.

A method gets the method-specific pictures by declaring them in ``Method.figures`` (the
report never guesses from attribute names):

- ``"prototypes"``: it implements ``prototype_scores(features) -> (N, K)``, scores of backbone
  features against its K prototypes;
- ``"reconstruction"``: it implements ``reconstruct(images) -> (masked, reconstruction)``:
  ``images`` is a normalized batch as ``method.preprocess`` returns it; both outputs are
  ``(B, 3, H, W)`` in the same normalized space (the masked input with hidden patches zeroed or
  greyed, the model's reconstruction).

Layout: ``data`` reads the run (metrics, summary, the checkpoint's model, features, pictures),
``figures`` holds one module per figure and their ordered list, ``html`` renders them and the page.

Example::

    from selfsup.report import write_report
    path = write_report("runs/simclr-20250101-120000")   # -> runs/.../report/report.html
"""

from __future__ import annotations

from pathlib import Path

import torch

from selfsup.checkpoint import write_text_atomic
from selfsup.errors import CheckpointError, ConfigError, DataError, SelfSupError
from selfsup.report.data import _first_line, _Model, _read_json, _Skip, read_metrics
from selfsup.report.figures import FIGURES, fig_embedding
from selfsup.report.figures.attention import _vit, cls_attention  # noqa: F401  (_vit: tests import it here)
from selfsup.report.figures.embedding import project_2d
from selfsup.report.figures.prototypes import prototype_scores
from selfsup.report.html import _header_rows, _html, _render

__all__ = ["cls_attention", "project_2d", "prototype_scores", "read_metrics", "report_command", "write_report"]


def write_report(run_dir: str | Path, *, data: str | None = None, max_points: int = 2000, device: str = "cpu",
                 projection: str = "auto", seed: int = 0) -> Path:
    """Write ``run_dir/report/report.html`` (self-contained) and its PNGs; return the HTML path.

    Args:
        run_dir: a run directory written by ``selfsup pretrain``.
        data: labeled data for the embedding map and pictures (default: the run's
            ``data.source``; its ``data.test_split`` is used).
        max_points: test images in the embedding map (a seeded random subset).
        device: where to compute features ("cpu", "cuda", "auto").
        projection: "auto" (UMAP, else t-SNE, else PCA), "umap", "tsne" or "pca".
        seed: seeds the subset and the projection.

    A figure whose inputs are missing (no column, no labels, no checkpoint, not a ViT...) is
    listed under "Not drawn" with the reason; the report itself only fails when ``run_dir``
    is not a run directory, matplotlib is missing, an argument is out of range, ``data`` cannot
    be loaded, or the disk is full.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {str(run_dir)!r} does not exist")
    if not any((run_dir / f).exists() for f in ("metrics.csv", "summary.json", "last.ckpt")):
        raise CheckpointError(f"{str(run_dir)!r} is not a run directory (no metrics.csv, summary.json or last.ckpt)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SelfSupError("the report needs matplotlib: pip install 'selfsup[report]'") from None
    if max_points < 1:
        raise ConfigError(f"max_points (--max-points) must be at least 1, got {max_points}")
    from selfsup.core.runtime import resolve_device

    model = _Model(run_dir, data, max_points, str(resolve_device(device)), seed)
    if data is not None:
        _check_data(model, data)

    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, *_ in FIGURES:  # a figure skipped this time must not leave last time's PNG behind
        (out_dir / f"{key}.png").unlink(missing_ok=True)

    summary = _read_json(run_dir / "summary.json")
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else ""
    cfg_tree = summary.get("config") or {}
    if not cfg_tree and config_text:
        import yaml

        try:
            cfg_tree = yaml.safe_load(config_text) or {}
        except yaml.YAMLError:
            cfg_tree = {}
    metrics = read_metrics(run_dir / "metrics.csv")

    results = []
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        for key, title, caption, draw in FIGURES:
            if draw is fig_embedding:
                fn = lambda d=draw: d(metrics, summary, model, projection=projection, seed=seed)  # noqa: E731
            else:
                fn = lambda d=draw: d(metrics, summary, model)  # noqa: E731
            results.append(_render(out_dir, key, title, caption, fn))

    path = out_dir / "report.html"
    write_text_atomic(path, _html(run_dir, _header_rows(summary, cfg_tree, metrics), results, config_text))
    return path


def _check_data(model: _Model, data: str) -> None:
    """Data the user named must load: a typo in ``--data`` is an error, not a line in the report.
    (The run's own data may have moved since training; that only leaves figures out.)"""
    try:
        with torch.random.fork_rng(devices=[]):  # building the model seeds torch
            model.dataset
    except _Skip as err:
        if isinstance(err.__cause__, DataError):
            raise DataError(f"--data {data}: {_first_line(err.__cause__)}") from None


def report_command(run_dir: str, data: str | None = None, *, device: str = "cpu", max_points: int = 2000,
                   projection: str = "auto") -> Path:
    """``selfsup report RUN_DIR [--data D]``: write the report and say where it went."""
    path = write_report(run_dir, data=data, max_points=max_points, device=device, projection=projection)
    figures = sorted(p.name for p in path.parent.glob("*.png"))
    print(f"report: {path} ({len(figures)} figures: {', '.join(figures)})")
    return path
