"""The report page: the summary rows at its top, each figure rendered to its PNG, and the
self-contained HTML that embeds them."""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from selfsup.checkpoint import write_atomic
from selfsup.errors import WriteError
from selfsup.report.data import _final_knn, _first_line, _has, _Result, _series, _Skip

log = logging.getLogger("selfsup")

_DPI = 110


def _render(out_dir: Path, key: str, title: str, caption: str, draw: Callable[[], Any]) -> _Result:
    """Draw one figure into ``out_dir/<key>.png`` (atomically: a full disk leaves no empty PNG)."""
    result = _Result(key, title, caption)
    try:
        fig = draw()
        path = out_dir / f"{key}.png"
        write_atomic(path, lambda fh: fig.savefig(fh, dpi=_DPI, format="png", metadata={"Software": None},
                                                  facecolor="white"))
        result.path = path
    except _Skip as err:
        result.note = str(err)
    except WriteError:  # a full disk is no figure's fault, and the HTML would not fit either
        raise
    except Exception as err:  # a report never fails because one figure did
        log.warning("report: figure %r failed: %s", key, err, exc_info=log.isEnabledFor(logging.DEBUG))
        result.note = f"could not be drawn ({type(err).__name__}: {_first_line(err)})"
    return result


# --------------------------------------------------------------------------------------
# HTML


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table.summary { border-collapse: collapse; font-size: 0.92em; }
table.summary td { padding: 0.2em 1.2em 0.2em 0; vertical-align: top; }
table.summary td:first-child { color: #666; white-space: nowrap; }
img { max-width: 100%; height: auto; }
p.caption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
ul.skipped { color: #777; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
"""


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def _header_rows(summary: dict, cfg_tree: dict, metrics: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    method = summary.get("method") or (cfg_tree.get("method") or {}).get("name") or "unknown"
    paper = ""
    try:
        from selfsup.registry import get_method

        paper = get_method(method).paper
    except Exception:
        pass
    rows.append(("method", f"{method}" + (f" ({paper})" if paper else "")))
    rows.append(("backbone", str((cfg_tree.get("backbone") or {}).get("name", "n/a"))))
    data = summary.get("data") or {}
    source = data.get("source") or (cfg_tree.get("data") or {}).get("source", "n/a")
    rows.append(("data", f"{source}" + (f", {data['train_samples']} training samples" if "train_samples" in data
                                         else "")))
    pos = summary.get("position") or {}
    if pos:
        epochs = (cfg_tree.get("trainer") or {}).get("epochs")
        state = "finished" if summary.get("finished") else "stopped early" if summary.get("stopped_early") else \
            "not finished"
        rows.append(("steps", f"{pos.get('step')} / {pos.get('total_steps')} ({pos.get('epoch')} of "
                              f"{epochs if epochs is not None else '?'} epochs, {state})"))
    elif "step" in metrics and metrics["step"].size:
        rows.append(("steps", f"{int(np.nanmax(metrics['step']))} (from metrics.csv; no summary.json)"))
    final_loss = summary.get("final_loss")
    if final_loss is None and _has(metrics, "loss"):
        final_loss = float(_series(metrics, "loss")[1][-1])
    rows.append(("final loss", _fmt(final_loss)))
    lm = summary.get("language_model") or {}
    if "loss" in lm:
        rows.append((f"held-out loss ({lm['split']})", f"{lm['loss']:.4f} nats/token, perplexity "
                                                      f"{lm['perplexity']:.2f}, token accuracy {lm['accuracy']:.1f}%"))
    trained, rand = _final_knn(summary)
    for k, res in trained.items():
        text = f"{res['top1']:.2f}%" + (f" (top-5 {res['top5']:.2f}%)" if "top5" in res else "")
        if k in rand:
            gain = res["top1"] - rand[k]["top1"]
            text += f"; random init {rand[k]['top1']:.2f}%; gain {gain:+.2f} points"
        rows.append((f"kNN top-1 ({k})", text))
    if (summary.get("knn") or {}).get("skipped"):
        rows.append(("kNN", f"skipped: {summary['knn']['skipped']}"))
    if summary.get("online_knn"):
        last = summary["online_knn"][-1]
        rows.append(("online kNN (last)", f"{last['top1']:.2f}% at epoch {last['epoch']}"))
    t = summary.get("timings") or {}
    if t:
        parts = [f"training {_fmt(t.get('train_seconds'), '.1f')} s"]
        for unit in ("images", "tokens"):
            if t.get(f"{unit}_per_second"):
                parts.append(f"{t[f'{unit}_per_second']:.0f} {unit}/s")
        total = t.get("total_seconds_this_session", t.get("wall_seconds_this_session"))
        if total is not None:
            parts.append(f"session total {total:.1f} s")
        rows.append(("timings", ", ".join(parts)))
    if summary.get("device"):
        rows.append(("device", f"{summary['device']}, precision {summary.get('precision')}, "
                               f"world size {summary.get('world_size')}"))
    mon = summary.get("monitor") or {}
    if mon:
        rows.append(("collapse monitor", f"last std {_fmt(mon.get('last_std'), '.3f')}, "
                                         f"min std {_fmt(mon.get('min_std'), '.3f')}, "
                                         f"rank {_fmt(mon.get('last_rank'), '.1f')}, "
                                         f"alarm steps {mon.get('alarm_steps', 0)}"))
        if mon.get("last_uniformity") is not None:
            rows.append(("prediction uniformity", f"last {_fmt(mon.get('last_uniformity'), '.4f')} of ln K, "
                                                  f"alarm steps {mon.get('uniform_alarm_steps', 0)}"))
    if summary.get("bad_steps_skipped"):
        rows.append(("non-finite steps skipped", str(summary["bad_steps_skipped"])))
    versions = summary.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform")))
    return rows


def _html(run_dir: Path, rows: list[tuple[str, str]], results: list[_Result], config_text: str) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>selfsup report: {esc(run_dir.name)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>selfsup run report: {esc(run_dir.name)}</h1>",
             f'<p class="caption">{esc(str(run_dir.resolve()))}</p>', '<table class="summary">']
    parts += [f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows]
    parts.append("</table>")
    for res in results:
        if res.path is None:
            continue
        data = base64.b64encode(res.path.read_bytes()).decode("ascii")
        parts += [f'<h2 id="{res.key}">{esc(res.title)}</h2>',
                  f'<img src="data:image/png;base64,{data}" alt="{esc(res.title)}">',
                  f'<p class="caption">{esc(res.caption)}</p>']
    skipped = [r for r in results if r.path is None]
    if skipped:
        parts.append("<h2>Not drawn</h2><ul class=\"skipped\">")
        parts += [f"<li>{esc(r.title)}: {esc(r.note or 'skipped')}</li>" for r in skipped]
        parts.append("</ul>")
    parts += ["<h2>Configuration</h2>", f"<pre>{esc(config_text or '(no config.yaml)')}</pre>", "</body></html>"]
    return "\n".join(parts) + "\n"

