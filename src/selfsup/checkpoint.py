"""Checkpoints, and every file a run, an evaluation or a report writes, written atomically: a
kill or a full disk at any moment leaves the previous file whole. Checkpoints load safely."""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from selfsup.errors import CheckpointError, WriteError

_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# files are made as open() would make them (mkstemp's are private): read once, as reading it means setting it
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(fh)`` on a temp file beside ``path``, fsync, then os.replace it over ``path``
    (atomic on POSIX): readers, and a kill at any moment, see the old file or the whole new one.

    A symbolic link is followed (the file it names is replaced, not the link). A target that
    exists and is no regular file (a folder, ``/dev/full``, a pipe) is refused: replacing it
    would turn a device into a file. A full disk or quota ends in one :class:`WriteError` naming
    the file and the free space; the temp file is removed and the old file stays as it was."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_file():
        raise WriteError(f"{path} exists and is not a regular file; refusing to replace it (choose a file path)")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the writer's pid in the name lets a later run tell an orphan (writer gone) from a live write
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = _disk_full(err)
        if reason is None:
            raise
        kept = f"; the previous {path.name} is unchanged" if path.is_file() else ""
        raise WriteError(f"could not write {path}: {reason} ({_free_space(path.parent)}){kept}") from None


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` through :func:`write_atomic`: a checkpoint is whole or not there."""
    write_atomic(path, lambda fh: torch.save(obj, fh))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) through :func:`write_atomic` (summary.json, config.yaml, eval
    results, metrics.csv rewrites, report.html)."""
    data = text.encode("utf-8")
    write_atomic(path, lambda fh: fh.write(data))


@contextmanager
def explain_disk_full(path: str | Path) -> Iterator[None]:
    """For writes that cannot go through :func:`write_atomic` (appending a row to metrics.csv):
    a full disk or quota becomes one :class:`WriteError` naming ``path`` and the free space."""
    try:
        yield
    except OSError as err:
        reason = _disk_full(err)
        if reason is None or isinstance(err, WriteError):
            raise
        raise WriteError(f"could not write {path}: {reason} ({_free_space(Path(path).parent)})") from None


def _disk_full(err: BaseException | None) -> str | None:
    """Why a write failed when the disk or the quota is full (``err`` or an error behind it is
    ENOSPC / EDQUOT), else None. torch.save reports a failed write as a RuntimeError ("unexpected
    pos ...") whose context is the OSError the file raised, so the chain is searched."""
    for _ in range(10):  # a chain is short; the bound only guards against a cycle
        if err is None:
            return None
        if isinstance(err, OSError) and not isinstance(err, WriteError) and err.errno in _DISK_FULL:
            return _DISK_FULL[err.errno]
        err = err.__cause__ or err.__context__
    return None


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return f"free space in {folder} unknown"
    return f"{human_bytes(free)} free in {folder}"


def human_bytes(count: int) -> str:
    """``count`` bytes for a person: '512 B', '3.2 MiB', '1.5 GiB'."""
    if count < 1024:
        return f"{count} B"
    size, unit = count / 1024, "KiB"
    for larger in ("MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, larger
    return f"{size:.1f} {unit}"


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files :func:`write_atomic` left in ``folder`` when its process was killed
    (``.NAME.PID-XXXX.tmp`` whose PID is no longer running; older names without a PID count as
    orphans too). A write in progress in a live process is left alone. Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        match = re.search(r"\.(\d+)-[A-Za-z0-9_]+\.tmp$", tmp.name)
        if match and _alive(int(match.group(1))):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:  # gone meanwhile, or not ours to delete: leave it
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to another user
        return True
    return True


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load with ``weights_only=True`` (no arbitrary code from the file). A run directory is
    accepted too and means its ``last.ckpt``."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.ckpt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt, truncated, or not a checkpoint at all
        raise CheckpointError(f"{path} is not a readable selfsup checkpoint: {_why_unreadable(path, err)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a selfsup checkpoint (missing model/config)")
    return ckpt


def _why_unreadable(path: Path, err: Exception) -> str:
    """One line on why torch.load failed; torch's own messages run to many lines, and for a file
    that is no checkpoint at all they suggest ``weights_only=False``, which would not help."""
    if not zipfile.is_zipfile(path):
        return "not a complete PyTorch file (truncated, corrupted, or another format)"
    if isinstance(err, pickle.UnpicklingError):
        return ("it holds Python objects beyond tensors and plain containers, which a safe "
                "(weights_only) load refuses; it was not written by selfsup")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def load_weights(module: torch.nn.Module, state: dict, source: str | Path) -> None:
    """``module.load_state_dict(state)``, strict, with a one-line :class:`CheckpointError` that
    counts what differs (torch lists every key, hundreds of them for a ResNet)."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as err:
        what = fit_report(module.state_dict(), state, source)["summary"] or str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"{source}: its weights do not fit the model its config builds ({what}); overrides that "
            "change the backbone or heads do not apply to a trained checkpoint") from None


def fit_report(own: dict, state: dict, source: str | Path) -> dict:
    """How the tensors of ``state`` (from ``source``) fit a module's ``own`` state dict: counts and
    names of those missing from the file, not in the module, or of another shape, plus a one-line
    ``summary`` of the differences ('' when everything fits)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and getattr(state[k], "shape", None) is not None
                and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights missing from the file (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the model (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                     f"{tuple(own[k].shape)} in the model)")
    return {"source": str(source), "loaded": len(own) - len(missing) - len(reshaped), "total": len(own),
            "missing": missing, "unexpected": unexpected, "mismatched": reshaped, "summary": "; ".join(parts)}


def encoder_state(source: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The encoder weights held by a run directory, a checkpoint or a ``selfsup export`` file, named
    as the backbone's library names them (the keys of ``Backbone.model``), and where they came from.
    A checkpoint's encoder is the module its ``encode`` read (recorded as ``encoder``; checkpoints
    older than that record give their online ``backbone``)."""
    path = Path(source)
    if path.is_dir():
        path = path / "last.ckpt"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        try:
            return load_file(str(path)), str(path)
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    ckpt = load_checkpoint(path)
    prefix = f"{ckpt.get('encoder', 'backbone')}.model."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    return state, f"{path} ({prefix[:-len('.model.')]})"
