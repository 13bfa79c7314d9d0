"""Originals, masked inputs and reconstructions, for methods that declare the ``"reconstruction"``
figure (``Method.figures``)."""

from __future__ import annotations

import torch

from selfsup.report.data import _Skip
from selfsup.report.figures._plot import _figure, _to_display


def _reconstructed(method, batch):
    """(the prepared inputs, masked inputs, reconstructions) of a raw batch, in eval mode without gradients."""
    x = method.preprocess(batch)
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad():
            return (x, *method.reconstruct(x))
    finally:
        method.train(was_training)


def fig_reconstruction(metrics, summary, model):
    method, _ = model.method
    if "reconstruction" not in type(method).figures:
        raise _Skip("the method has no reconstruct()")
    if method.modality == "audio":
        return _spectrograms(method, model)
    if method.modality == "video":
        return _frames(method, model)
    images, titles = model.pictures()
    x, masked, recon = _reconstructed(method, {"images": images.to(model.device)})
    rows = [("original", x), ("masked", masked), ("reconstruction", recon)]
    n = x.shape[0]
    fig, axes = _figure(3 * n, cols=n, panel_w=1.7, panel_h=1.8)
    for r, (label, batch) in enumerate(rows):
        shown = _to_display(batch, method.eval_mean, method.eval_std)
        for i in range(n):
            ax = axes[r * n + i]
            ax.imshow(shown[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[i], fontsize=8)
        axes[r * n].set_ylabel(label, fontsize=8)
    fig.suptitle("masked-image modelling: originals, masked inputs, reconstructions")
    return fig


def _spectrograms(method, model):
    """Log-mel spectrograms (time across, mel filters up) of one test clip per class: the input, what the
    encoder saw (hidden patches blank) and the reconstruction with the visible patches pasted back."""
    clips, titles = model.clips(4)
    x, masked, recon = _reconstructed(method, {"audio": clips.to(model.device)})
    import matplotlib

    cmap = matplotlib.colormaps["magma"]
    cmap = cmap.with_extremes(bad="white")
    rows = [("original", x), ("masked", masked), ("reconstruction", recon)]
    n = x.shape[0]
    fig, axes = _figure(3 * n, cols=n, panel_w=2.4, panel_h=1.7)
    for i in range(n):
        shown = x[i, 0].float().cpu()
        lo, hi = float(shown.min()), float(shown.max())
        for r, (label, batch) in enumerate(rows):
            ax = axes[r * n + i]
            ax.imshow(batch[i, 0].float().cpu().T.numpy(), origin="lower", aspect="auto", cmap=cmap, vmin=lo, vmax=hi,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[i], fontsize=8)
            if i == 0:
                ax.set_ylabel(f"{label}\nmel", fontsize=8)
    fig.suptitle("masked spectrogram modelling: log-mel inputs (time across), masked, reconstructed")
    return fig


def _frames(method, model):
    """Frame grids of a few test clips (frames across): each clip, what the encoder saw (hidden tubelets grey) and
    the reconstruction with the visible tubelets pasted back (``reconstruct`` returns RGB in [0, 1])."""
    clips, titles = model.videos(3)
    x, masked, recon = _reconstructed(method, {"video": clips.to(model.device)})
    original = clips.float().div(255).permute(0, 2, 1, 3, 4)  # (B, 3, T, H, W), as the reconstruction
    if original.shape[-2:] != recon.shape[-2:]:
        original = torch.nan_to_num(recon.clone(), nan=0.5)  # frames resized for the encoder: show those
    n, t = x.shape[0], x.shape[2]
    rows = []
    for i in range(n):
        rows += [(f"{titles[i]}\noriginal", original[i]), ("masked", masked[i]), ("reconstruction", recon[i])]
    fig, axes = _figure(len(rows) * t, cols=t, panel_w=1.1, panel_h=1.1)
    for r, (label, clip) in enumerate(rows):
        frames = torch.nan_to_num(clip.float().cpu(), nan=0.5).clamp(0, 1).permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
        for f in range(t):
            ax = axes[r * t + f]
            ax.imshow(frames[f], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {f}", fontsize=7)
        axes[r * t].set_ylabel(label, fontsize=7)
    fig.suptitle("masked video modelling: clips, visible tubelets, reconstructions", fontsize=9)
    return fig
