"""Visual tokenizers for BEiT-style masked image modeling: each image patch -> a discrete token id.

BEiT (Bao, Dong, Piao, Wei 2022, ICLR) takes its targets from the discrete VAE of DALL-E
(Ramesh et al. 2021): a 112-px view of the crop is encoded into a 14 x 14 grid of ids from an
8,192-entry codebook. Those weights cannot be downloaded here, so the library ships a tokenizer
it trains itself, :class:`PatchKMeansTokenizer` — **a k-means codebook over per-patch-normalized
patches, not the DALL-E dVAE**:

    f_i = (x_i - mean(x_i)) / sqrt(var(x_i) + eps)        x_i: the p·p·C values of patch i
    id_i = argmin_k || f_i - c_k ||²                       of the normalized view the ViT sees

Mean and variance are taken over all p·p·C values of the patch (MAE's ``norm_pix`` statistics),
so a token encodes the patch's local pattern and its colour relative to its own mean (a uniform
red patch keeps a red signature, a uniform grey one maps to the origin) but not its brightness or
contrast. ``eps`` (default 0.01, a std of 0.1 in units of the dataset-normalized pixels, about
6 grey levels) keeps flat patches near the origin instead of amplifying their quantization noise.

The codebook c_1..c_K is fitted by mini-batch k-means (Sculley 2010, "Web-scale k-means
clustering", WWW) seeded by k-means++ (Arthur & Vassilvitskii 2007): each iteration assigns a
random batch of patch features to the nearest centre and moves each centre k towards the mean of
its n_k new points with the per-centre rate n_k / v_k, where v_k counts every point k received so
far (``c_k <- c_k + (Σ_{i->k} f_i - n_k c_k) / v_k``). Everything is torch on the training device,
drawn from one seeded generator: the same data and seed give the same codebook. BEiT fits it from
the training set's augmented crops at the start of pretraining (unless ``method.tokenizer_path``
gives one) and stores it as a buffer in the checkpoint, so a resumed run does not refit; the run
directory also gets a copy (``tokenizer.safetensors``), reusable through ``method.tokenizer_path``.
``selfsup tokenizer fit`` fits one ahead of time.

Differences from the DALL-E tokenizer: tokens carry no context beyond their own patch (the dVAE's
encoder sees neighbouring pixels), and they are computed on the same crop and patch grid as the
ViT's input rather than on a separate 112-px view. External tokenizers stay possible
(:func:`load_tokenizer_file`): a codebook tensor (``.pt``/``.pth`` saved with ``torch.save``, a
tensor or a dict holding ``"codebook"``; or ``.safetensors`` with a ``"codebook"`` tensor) of shape
(K, p·p·C), or a module — TorchScript (``torch.jit.save``) or a ``.pt2`` program
(``torch.export.save``, export it with a dynamic batch dimension) — mapping the normalized view (B, C, H, W)
to ids (B, N) or (B, gh, gw) — e.g. a wrapped dVAE that resizes and re-maps the pixels itself.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.errors import ConfigError
from selfsup.pretext.augment import pad_images

__all__ = [
    "PatchKMeansTokenizer",
    "patch_features",
    "kmeans_plus_plus",
    "minibatch_kmeans",
    "nearest_code",
    "sample_patch_features",
    "load_tokenizer_file",
]

_ASSIGN_ELEMENTS = 1 << 25  # rows x codes per distance block (128 MB of float32)


def patch_features(images: Tensor, patch_size: int, eps: float = 0.01) -> Tensor:
    """``(B, C, H, W) -> (B, N, p*p*C)`` float32: patches row-major over the grid, each flattened
    as (row, column, channel) like ``ViT.patchify`` (MAE's order), then normalized per patch to
    zero mean and (for non-flat patches) about unit variance: ``(x - μ) / sqrt(σ² + eps)``."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}")
    x = images.float().reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / (var + eps).sqrt()


def _sq_dists(x: Tensor, codebook: Tensor, code_sq: Tensor) -> Tensor:
    """||x - c||² up to the per-row constant ||x||² (enough for an argmin): ||c||² - 2 x·c."""
    return torch.addmm(code_sq, x, codebook.t(), beta=1.0, alpha=-2.0)


@torch.no_grad()
def nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook row (squared Euclidean) for every row of ``x`` (M, D) -> (M,),
    in float32 and in row blocks so the distance matrix never exceeds ~128 MB."""
    x, codebook = x.float(), codebook.float()
    code_sq = codebook.pow(2).sum(dim=1).unsqueeze(0)
    step = max(1, _ASSIGN_ELEMENTS // max(1, codebook.shape[0]))
    return torch.cat([_sq_dists(x[i : i + step], codebook, code_sq).argmin(dim=1) for i in range(0, len(x), step)])


@torch.no_grad()
def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): the first centre uniformly at random, each
    next one a data point drawn with probability proportional to its squared distance to the
    nearest centre chosen so far. ``x`` (M, D) float32 with M >= k -> (k, D)."""
    m = x.shape[0]
    if m < k:
        raise ValueError(f"k-means++ needs at least k={k} points, got {m}")
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = torch.randint(m, (1,), generator=generator, device=x.device)
    centers[0] = x[first[0]]
    d2 = (x - centers[0]).pow(2).sum(dim=1)
    for j in range(1, k):
        total = d2.sum()
        # all points already coincide with centres: any point will do (uniform draw)
        weights = torch.where(total > 0, d2, torch.ones_like(d2))
        idx = torch.multinomial(weights, 1, generator=generator)
        centers[j] = x[idx[0]]
        d2 = torch.minimum(d2, (x - centers[j]).pow(2).sum(dim=1))
    return centers


@torch.no_grad()
def minibatch_kmeans(x: Tensor, k: int, *, iters: int = 300, batch_size: int = 16384,
                     init_sample: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Mini-batch k-means (Sculley 2010, Algorithm 1, with the per-batch centre update): k-means++
    seeds from a random subset of ``init_sample`` points (default max(16 k, 4096)), then ``iters``
    steps, each assigning ``batch_size`` random points to their nearest centre and moving centre k
    by (Σ_{i->k} x_i - n_k c_k) / v_k with v_k its running count. ``x`` (M, D) -> centres (k, D)."""
    x = x.float()
    m = x.shape[0]
    if m < k:
        raise ValueError(f"cannot fit {k} codes on {m} patches; give more data or a smaller vocabulary")
    n_init = min(m, init_sample or max(16 * k, 4096))
    sub = torch.randperm(m, generator=generator, device=x.device)[:n_init]
    centers = kmeans_plus_plus(x[sub], k, generator)
    counts = torch.zeros(k, dtype=torch.float32, device=x.device)
    for _ in range(iters):
        batch = x[torch.randint(m, (min(batch_size, m),), generator=generator, device=x.device)]
        assign = nearest_code(batch, centers)
        n = torch.zeros(k, dtype=torch.float32, device=x.device).index_add_(
            0, assign, torch.ones_like(assign, dtype=torch.float32))
        sums = torch.zeros_like(centers).index_add_(0, assign, batch)
        counts += n
        # running mean of everything each centre received (centres with n_k = 0 stay put)
        centers += (sums - n.unsqueeze(1) * centers) / counts.clamp_min(1.0).unsqueeze(1)
    return centers


@torch.no_grad()
def sample_patch_features(images: Any, view: nn.Module, patch_size: int, n_patches: int, *, eps: float = 0.01,
                          device: torch.device | str = "cpu", seed: int = 0, chunk: int = 256) -> Tensor:
    """Per-patch-normalized features of about ``n_patches`` patches for fitting a codebook:
    random images of ``images``, each augmented once by ``view`` (the training view, so the
    codebook sees the distribution it will tokenize), all patches of each. ``images`` is uint8
    (N, C, H, W) (``dataset.images`` of data held in memory) or a streamed source (a sized
    sequence of samples with uint8 ``images`` (C, h, w) at their own sizes: a folder or shards),
    whose images are read only as far as the patches need, each cropped inside its own size.
    Deterministic given ``seed``. Returns (M, p*p*C) float32 on ``device``."""
    device = torch.device(device)
    cpu_gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    order = torch.randperm(len(images), generator=cpu_gen)
    feats: list[Tensor] = []
    total = 0
    for start in range(0, len(order), chunk):
        if isinstance(images, Tensor):
            x = view(images[order[start : start + chunk]].to(device), generator=dev_gen)
        else:
            read = [images[int(i)] for i in order[start : start + chunk]]
            read = [sample["images"] for sample in read if "images" in sample]  # not the unusable ones
            if not read:
                continue
            batch, sizes = pad_images(read)
            x = view(batch.to(device), generator=dev_gen, image_sizes=None if sizes is None else sizes.to(device))
        f = patch_features(x, patch_size, eps)
        feats.append(f.reshape(-1, f.shape[-1]))
        total += feats[-1].shape[0]
        if total >= n_patches:
            break
    return torch.cat(feats)[:n_patches]


class PatchKMeansTokenizer(nn.Module):
    """Token id of each patch = its nearest code in a k-means codebook over per-patch-normalized
    patches (module docstring). Buffers ``codebook`` (K, p*p*C) and ``fitted`` (number of fits
    or loads; 0 = not ready) travel in the state dict, so checkpoints carry the tokenizer.

    Example::

        tok = PatchKMeansTokenizer(vocab_size=512, patch_size=4)
        tok.fit(patch_features(views, 4).flatten(0, 1), iters=200, seed=0)
        ids = tok(views)                       # (B, 64) long for 32-px views
        tok.save("tokenizer.safetensors")      # reusable as method.tokenizer_path
    """

    def __init__(self, vocab_size: int = 8192, patch_size: int = 16, channels: int = 3, eps: float = 0.01) -> None:
        super().__init__()
        self.vocab_size, self.patch_size, self.channels, self.eps = vocab_size, patch_size, channels, eps
        self.register_buffer("codebook", torch.zeros(vocab_size, patch_size * patch_size * channels))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.long))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted.item() > 0)

    def features(self, images: Tensor) -> Tensor:
        return patch_features(images, self.patch_size, self.eps)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Normalized images (B, C, H, W) -> token ids (B, N) long, in float32 even under autocast."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            f = self.features(images)
            return nearest_code(f.reshape(-1, f.shape[-1]), self.codebook).reshape(f.shape[:2])

    @torch.no_grad()
    def fit(self, feats: Tensor, *, iters: int = 300, batch_size: int = 16384, seed: int = 0) -> dict[str, Any]:
        """Fit the codebook on patch features (M, p*p*C) (from :meth:`features`); returns how many
        codes the data uses and the mean squared quantization error per dimension."""
        if feats.shape[-1] != self.codebook.shape[1]:
            raise ValueError(f"features have {feats.shape[-1]} dims, the codebook {self.codebook.shape[1]}")
        feats = feats.to(self.codebook.device, torch.float32)
        gen = torch.Generator(device=feats.device).manual_seed(seed)
        self.codebook.copy_(minibatch_kmeans(feats, self.vocab_size, iters=iters, batch_size=batch_size,
                                             generator=gen))
        self.fitted += 1
        assign = nearest_code(feats, self.codebook)
        err = (feats - self.codebook[assign]).pow(2).mean()
        return {"codes": self.vocab_size, "patches": int(feats.shape[0]),
                "codes_used": int(assign.unique().numel()), "quantization_mse": float(err)}

    @torch.no_grad()
    def load_codebook(self, codebook: Tensor) -> None:
        if tuple(codebook.shape) != tuple(self.codebook.shape):
            k, d = self.codebook.shape
            raise ConfigError(
                f"tokenizer codebook has shape {tuple(codebook.shape)}, expected ({k}, {d}) = (method.vocab_size, "
                f"patch_size^2 x {self.channels}); set method.vocab_size={codebook.shape[0]} or use a codebook "
                f"made for patch size {self.patch_size}")
        self.codebook.copy_(codebook.to(self.codebook))
        self.fitted += 1

    def save(self, path: str | Path) -> Path:
        """Write the codebook: ``.safetensors`` (tensor ``codebook`` + metadata) or, for any other
        suffix, ``torch.save({"codebook": ..., "patch_size": ..., "eps": ...})``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        codebook = self.codebook.detach().float().cpu().contiguous()
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"codebook": codebook}, str(path), metadata={
                "format": "selfsup-patch-kmeans/1", "patch_size": str(self.patch_size),
                "channels": str(self.channels), "eps": repr(self.eps)})
        else:
            torch.save({"codebook": codebook, "patch_size": self.patch_size, "channels": self.channels,
                        "eps": self.eps}, path)
        return path


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder and ``constants.pkl``; a plain
    ``torch.save`` zip has neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def load_tokenizer_file(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[str, Any]:
    """``("codebook", tensor (K, D))`` or ``("script", module)`` from ``path``: a ``.safetensors``
    codebook, a ``.pt2`` ``torch.export`` program, a TorchScript archive, or a ``torch.save``'d
    codebook tensor / dict with ``"codebook"``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"method.tokenizer_path={str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if "codebook" not in tensors and len(tensors) != 1:
                raise ConfigError(f"{path} holds {sorted(tensors)}; expected one tensor named 'codebook'")
            return "codebook", tensors.get("codebook", next(iter(tensors.values()))).float()
        if path.suffix == ".pt2":  # torch.export program (TorchScript's successor)
            return "script", torch.export.load(str(path)).module()
        if _is_torchscript(path):
            return "script", torch.jit.load(str(path), map_location=map_location).eval()
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except ConfigError:
        raise
    except Exception as err:  # corrupt or foreign file
        raise ConfigError(f"method.tokenizer_path={str(path)!r} is not a readable codebook or TorchScript "
                          f"tokenizer ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict):
        obj = obj.get("codebook")
    if not torch.is_tensor(obj) or obj.ndim != 2:
        raise ConfigError(f"method.tokenizer_path={str(path)!r}: expected a (K, D) codebook tensor "
                          "(or a dict with 'codebook'), or a TorchScript module")
    return "codebook", obj.float()

