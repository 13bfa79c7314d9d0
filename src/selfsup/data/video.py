"""Video data: clips of T frames decoded from video files or folders of frame images, and an embedded
set of moving CIFAR objects built at run time.

Sources (``data.source``):

- ``embedded-video``: *moving CIFAR*, made from the embedded CIFAR-10 subset by :func:`make_moving_clips`
  (2,000 training clips from its training images, 512 test clips from its test images, 8 frames of
  32 x 32 by default). In each clip a CIFAR image, blurred and darkened, is a still background and a
  second CIFAR image, shrunk to half the side under a soft round mask, moves across it in whole-pixel
  steps along one of 8 directions at 1 or 2 pixels a frame, never leaving the frame. Labels: the
  direction (``E``, ``NE``, ``N``, ``NW``, ``W``, ``SW``, ``S``, ``SE``; the default), ``data.label_column:
  speed`` (``1px``, ``2px``) or ``object`` (the moving image's CIFAR class). Each clip also carries its
  ``motion``, the object's exact (dy, dx) displacement between consecutive frames. It is held in memory
  (:class:`VideoClips`); the same seed builds the same tensors on every machine.
- a video file (``.mp4``, ``.webm``, ``.mkv``, ``.avi``, ``.mov``, ``.m4v``): one unlabeled video, the whole
  set of whatever split is asked for;
- a folder, searched recursively, of video files and of *frame folders*: a folder without subfolders or
  video files that holds at least two images (``.jpg``, ``.png``, ...) is one video, its frames in name
  order (numbers in names compared as numbers, so ``frame_2`` comes before ``frame_10``).

Which sources are video (:func:`is_video_source`, which the registry asks to pick a run's modality when
its method accepts several): the embedded name; a file with a video suffix; a folder holding a video file
among its first 2,000 entries (searched recursively); or a folder whose manifest (``videos.csv`` or
``labels.csv`` at its top) names folders in its file column. A folder of frame folders without such a
manifest is not claimed: it looks exactly like an image folder of class folders, which must keep being
read as images; a run whose method or encoder is a video one reads it as video all the same (the
registry takes the modality from the method first), so the rule only settles sources that could be
either.

Labels and splits of a folder, the first that applies (as ``selfsup.data.audio`` reads recordings):

1. a manifest ``videos.csv`` or ``labels.csv`` (the shallowest one): a file column (``file``,
   ``filename``, ``path``, ``video``, ``folder`` or the first column) naming video files or frame folders
   relative to the manifest, a label column (``data.label_column``, else ``label`` / ``class`` /
   ``category`` / ``target``) and an optional ``split`` column (``train`` / ``val`` / ``test``; without
   it a fixed fifth of the videos, by a hash of their name, is the test split); videos it does not list
   are left out and counted;
2. folders: ``train/``, ``val/``, ``test/`` at the top give the split, and the folder under them (or the
   top folder when there are no split folders) the class;
3. otherwise a fixed fifth of the videos (by a hash of their name) is the test split, and the data's
   one-line description says so.

Decoding happens in the DataLoader workers (:class:`VideoStream`, an ``ImageStream``): listing a folder
opens no file. A clip is T frames ``stride`` frames apart: a training sample starts at a uniformly drawn
frame (``torch.randint``, fresh on every visit), an evaluation sample (``evaluation=True``) is centred.
A video too short for ``(T - 1) * stride + 1`` frames is read at the largest stride that fits; one with
fewer than T frames is skipped ("too short") and, like an unreadable file ("unreadable"), replaced in its
batch by the next usable video and counted. The frame count comes from the container's header, else from
counting the stream's packets (demuxing, no decoding). Frames are decoded one after another from the
start with PyAV (``container.decode(video=0)``, RGB24) and decoding stops after the clip's last frame;
each kept frame has its shorter side resized to ``size`` (antialiased bilinear) and is centre-cropped to
``size`` x ``size``. The random crops, flips and colour changes of augmentation happen later, batched on
the training device.

The decoder is PyAV (``decoder="pyav"``, the default): its wheels bundle FFmpeg, so it works wherever
the package installs. ``decoder="torchcodec"`` reads video files with TorchCodec (``get_frames_at``,
frame-exact seeking, faster on long videos) where it is installed and finds a system FFmpeg, which it
needs and does not ship; where it cannot be loaded, asking for it is a one-line ConfigError. Frame
folders are always read with ``torchvision.io``.

A sample is ``video`` uint8 (T, 3, size, size) with ``labels`` (int64, -1 where unlabeled) and
``index``; a batch stacks them: ``video`` (B, T, 3, size, size). Embedded batches also carry ``motion``
(B, T - 1, 2) float32. :func:`write_video` writes uint8 frames to a file (H.264 where the bundled FFmpeg
has libx264).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from selfsup.data.cache import state_key
from selfsup.data.datasets import (
    IMAGE_EXTENSIONS,
    TOO_MANY_PIXELS,
    UNREADABLE,
    _decode_or_skip,
    _Skips,
)
from selfsup.data.layout import (
    SPLIT_DIRS,
    Layout,
    file_column,
    folder_layout,
    manifest_layout,
)
from selfsup.data.sources import ImageStream, PackedPaths
from selfsup.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

EMBEDDED_VIDEO = "embedded-video"
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
MANIFESTS = ("videos.csv", "labels.csv")
FILE_COLUMNS = ("file", "filename", "path", "video", "folder")
DECODERS = ("pyav", "torchcodec")
CLAIM_SCAN_ENTRIES = 2000  # entries of a folder is_video_source looks at before it says no
MIN_FRAME_FILES = 2  # images a leaf folder needs to be read as one video
TOO_SHORT = "too short"
NO_VIDEO_STREAM = "no video stream"
NOT_IN_MANIFEST = "not in the manifest"

# the embedded set
DIRECTIONS = ("E", "NE", "N", "NW", "W", "SW", "S", "SE")  # counter-clockwise from east, 45 degrees apart
DIRECTION_STEPS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))  # (dy, dx), y down
SPEEDS = (1, 2)  # pixels per frame along each axis that moves
SPEED_NAMES = ("1px", "2px")
EMBEDDED_CLIPS = {"train": 2000, "test": 512}  # 125 and 32 clips of each (direction, speed)
EMBEDDED_SEED = 0
EMBEDDED_LABELS = ("direction", "speed", "object")
EMBEDDED_VERSION = "moving-cifar-1"  # in the fingerprint: change it when the construction changes
BACKGROUND_GAIN = 0.55  # the background is darkened so the object stands out
BACKGROUND_BLUR = 1.5  # sigma in pixels of the background's Gaussian blur
MASK_EDGE = 1.5  # pixels over which the object's round mask fades from opaque to clear


def _name(source: str) -> str:
    return source.strip()


def _is_frame_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _is_video_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(VIDEO_SUFFIXES)


def is_video_source(source: str) -> bool:
    """Whether ``source`` names video (cheap: names, a folder's first entries, a manifest's first rows;
    the rule is in the module docstring)."""
    text = _name(source)
    if text.lower() == EMBEDDED_VIDEO:
        return True
    path = Path(text).expanduser()
    if path.is_file():
        return _is_video_file(path.name)
    if not path.is_dir():
        return False
    for i, f in enumerate(path.rglob("*")):
        if _is_video_file(f.name):
            return True
        if i >= CLAIM_SCAN_ENTRIES:
            break
    return _manifest_names_folders(path)


def _manifest_names_folders(folder: Path, rows: int = 5) -> bool:
    """Whether a manifest at the top of ``folder`` names folders (of frames) in its first ``rows`` rows."""
    for name in MANIFESTS:
        manifest = folder / name
        if not manifest.is_file():
            continue
        try:
            with manifest.open(encoding="utf-8", errors="replace", newline="") as handle:
                reader = csv.DictReader(handle)
                column = file_column(reader.fieldnames or [], FILE_COLUMNS)
                for i, row in enumerate(reader):
                    entry = (row.get(column) or "").strip().strip("/")
                    if entry and (folder / entry).is_dir():
                        return True
                    if i + 1 >= rows:
                        break
        except (OSError, csv.Error):
            continue
    return False


# --------------------------------------------------------------------------------------
# decoding


@lru_cache(maxsize=1)
def torchcodec_available() -> str:
    """An empty string when TorchCodec can be loaded, else why not (it needs a system FFmpeg, which it does
    not ship)."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401 - loading it loads FFmpeg's libraries
    except Exception as exc:  # noqa: BLE001 - a missing FFmpeg surfaces as OSError or RuntimeError
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'not importable'}"
    return ""


def check_decoder(decoder: str) -> str:
    """The decoder's name, lower case; a one-line ConfigError for an unknown or unusable one."""
    key = (decoder or "pyav").strip().lower()
    if key not in DECODERS:
        raise ConfigError(f"data.video_decoder={decoder!r}: use one of {', '.join(DECODERS)}")
    if key == "torchcodec":
        why = torchcodec_available()
        if why:
            raise ConfigError(f"data.video_decoder=torchcodec cannot be used here ({why}); it needs the torchcodec "
                              "package and a system FFmpeg; use data.video_decoder=pyav (bundles its own FFmpeg)")
    return key


def _check_geometry(frames: int, stride: int, size: int) -> None:
    for what, value in (("frames", frames), ("frame_stride", stride), ("frame_size", size)):
        if int(value) < 1:
            raise ConfigError(f"data.{what}={value}: must be a positive whole number")


class _Skip(Exception):
    """A video left out of a clip, with the counted reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _ShortRead(Exception):
    """The stream ended before the clip's last frame: the header's frame count was too high."""

    def __init__(self, decoded: int) -> None:
        super().__init__(decoded)
        self.decoded = decoded


def clip_stride(count: int, frames: int, stride: int) -> int:
    """The stride a video of ``count`` frames is read at: ``stride`` when the clip fits, else the largest
    that does; 0 when the video has fewer than ``frames`` frames."""
    if count < frames:
        return 0
    if frames == 1 or count >= (frames - 1) * stride + 1:
        return stride
    return (count - 1) // (frames - 1)


def clip_indices(count: int, frames: int, stride: int, offset: int | str | None) -> list[int]:
    """The frame numbers of a clip of a video of ``count`` frames: ``offset`` None or "centre" centres it,
    "random" draws the start uniformly (``torch.randint``), an int starts there."""
    step = clip_stride(count, frames, stride)
    if step == 0:
        raise _Skip(TOO_SHORT)
    last = count - ((frames - 1) * step + 1)  # the last start at which the clip fits
    if offset is None or offset == "centre":
        start = last // 2
    elif offset == "random":
        start = int(torch.randint(0, last + 1, ()).item())
    else:
        start = int(offset)
        if not 0 <= start <= last:
            raise DataError(f"offset {start} leaves no room for {frames} frames {step} apart in {count} frames "
                            f"(starts 0 to {last} do)")
    return list(range(start, start + (frames - 1) * step + 1, step))


def _fit(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size`` (antialiased bilinear), centre crop to ``size`` x ``size``; (..., 3, H, W) uint8."""
    if tuple(image.shape[-2:]) != (size, size):
        if min(image.shape[-2:]) != size:
            image = TF.resize(image, [size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        image = TF.center_crop(image, [size, size])
    return image.contiguous()


def _natural_key(name: str) -> list[Any]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def frame_files(folder: str | Path) -> list[str]:
    """The image files of a frame folder, in frame order (names compared with numbers as numbers)."""
    return sorted((f for f in os.listdir(folder) if _is_frame_image(f)), key=_natural_key)


def _pyav_frame_count(path: str) -> int:
    """Frames in the first video stream: the header's count, else its packets counted (no decoding)."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise _Skip(NO_VIDEO_STREAM)
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)


def frame_count(path: str | Path, *, decoder: str = "pyav") -> int:
    """The number of frames of a video file or frame folder (DataError when it cannot be read)."""
    path = str(path)
    try:
        if os.path.isdir(path):
            return len(frame_files(path))
        if check_decoder(decoder) == "torchcodec":
            from torchcodec.decoders import VideoDecoder

            return len(VideoDecoder(path))
        return _pyav_frame_count(path)
    except _Skip as skip:
        raise DataError(f"{path}: {skip.reason}") from None
    except (DataError, ConfigError):
        raise
    except Exception as exc:  # noqa: BLE001 - FFmpeg raises many kinds
        raise DataError(f"{path}: not a readable video ({type(exc).__name__}: {exc})") from None


def _pyav_clip(path: str, frames: int, stride: int, offset: int | str | None, size: int,
               max_pixels: int) -> torch.Tensor:
    import av

    count = 0
    for _ in range(2):  # a second pass only when the header promised more frames than the stream holds
        with av.open(path) as container:
            if not container.streams.video:
                raise _Skip(NO_VIDEO_STREAM)
            stream = container.streams.video[0]
            if stream.width * stream.height > max_pixels:
                raise _Skip(TOO_MANY_PIXELS)
            count = count or int(stream.frames) or _pyav_frame_count(path)
            wanted = clip_indices(count, frames, stride, offset)
            kept: list[torch.Tensor] = []
            decoded = 0
            for decoded, frame in enumerate(container.decode(video=0), start=1):
                if decoded - 1 == wanted[len(kept)]:
                    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                    kept.append(_fit(rgb, size))
                    if len(kept) == len(wanted):
                        return torch.stack(kept)
        count = decoded
        if count == 0:
            raise _Skip(UNREADABLE)
    raise _Skip(TOO_SHORT)


def _torchcodec_clip(path: str, frames: int, stride: int, offset: int | str | None, size: int,
                     max_pixels: int) -> torch.Tensor:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(path, dimension_order="NCHW", seek_mode="exact")
    meta = decoder.metadata
    if (meta.width or 0) * (meta.height or 0) > max_pixels:
        raise _Skip(TOO_MANY_PIXELS)
    wanted = clip_indices(len(decoder), frames, stride, offset)
    return _fit(decoder.get_frames_at(indices=wanted).data, size)


def _folder_clip(folder: str, frames: int, stride: int, offset: int | str | None, size: int,
                 max_pixels: int) -> torch.Tensor:
    files = frame_files(folder)
    kept = []
    for i in clip_indices(len(files), frames, stride, offset):
        image, status = _decode_or_skip(os.path.join(folder, files[i]), None, max_pixels)
        if image is None:
            raise _Skip(status)
        kept.append(_fit(image, size))
    return torch.stack(kept)


def load_clip(path: str, *, frames: int, stride: int, offset: int | str | None, size: int, decoder: str = "pyav",
              max_pixels: int | None = None) -> tuple[torch.Tensor | None, str]:
    """(uint8 (T, 3, size, size), "") for the clip of ``path`` (a video file or a frame folder), or (None,
    the reason it is skipped); ``offset`` as :func:`clip_indices` takes it."""
    from selfsup.data.datasets import max_image_pixels

    limit = max_image_pixels() if max_pixels is None else max_pixels
    try:
        if os.path.isdir(path):
            return _folder_clip(path, frames, stride, offset, size, limit), ""
        read = _torchcodec_clip if decoder == "torchcodec" else _pyav_clip
        return read(path, frames, stride, offset, size, limit), ""
    except _Skip as skip:
        return None, skip.reason
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - FFmpeg raises many kinds; each is a counted skip
        logger.debug("cannot decode %s: %s: %s", path, type(exc).__name__, exc)
        return None, UNREADABLE


def read_clip(path: str | Path, frames: int, stride: int, offset: int | None, size: int, *,
              decoder: str = "pyav") -> torch.Tensor:
    """uint8 (``frames``, 3, ``size``, ``size``): frames ``offset``, ``offset + stride``, ... of a video file or
    frame folder (``offset`` None: the centred clip; a video too short for ``stride`` is read at the largest
    stride that fits), each resized on its shorter side and centre-cropped. DataError when it cannot be."""
    _check_geometry(frames, stride, size)
    clip, status = load_clip(str(path), frames=frames, stride=stride, offset=offset, size=size,
                             decoder=check_decoder(decoder))
    if clip is None:
        raise DataError(f"{path}: {status}" + (f" for a clip of {frames} frames" if status == TOO_SHORT else ""))
    return clip


# --------------------------------------------------------------------------------------
# writing


def _encoder(suffix: str) -> str:
    import av

    names = ("libvpx-vp9", "libvpx") if suffix.lower() == ".webm" else ("libx264", "mpeg4")
    for name in names:
        try:
            av.codec.Codec(name, "w")
        except ValueError:  # av.codec.codec.UnknownCodecError: this FFmpeg was built without it
            continue
        return name
    raise DataError(f"the FFmpeg bundled with PyAV has none of the encoders {', '.join(names)}")


def write_video(path: str | Path, frames: np.ndarray | torch.Tensor, fps: float = 8) -> Path:
    """Write uint8 frames, numpy (T, H, W, 3) or a tensor (T, 3, H, W), as a video file with PyAV: H.264
    (libx264, crf 18) where the bundled FFmpeg has it, else MPEG-4 part 2 (VP9 for ``.webm``), yuv420p.
    An odd height or width is padded by one repeated edge row or column (yuv420p needs even sides)."""
    import av

    if isinstance(frames, torch.Tensor):
        array = frames.detach().cpu()
        if array.ndim == 4 and array.shape[1] == 3 and array.shape[-1] != 3:
            array = array.permute(0, 2, 3, 1)
        array = array.numpy()
    else:
        array = np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) or (T, 3, H, W) with T >= 1, got {array.dtype} "
                         f"{tuple(array.shape)}")
    pad_h, pad_w = array.shape[1] % 2, array.shape[2] % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    codec = _encoder(path.suffix)
    with av.open(str(path), mode="w") as container:
        options = {"crf": "18"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.width, stream.height, stream.pix_fmt = array.shape[2], array.shape[1], "yuv420p"
        if codec != "libx264":
            stream.bit_rate = max(400_000, int(array.shape[1] * array.shape[2] * float(fps) * 2))
        for image in array:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# --------------------------------------------------------------------------------------
# listing, labels and splits


def _list_folder(root: Path, skips: _Skips) -> tuple[list[str], dict[str, str]]:
    """The videos below ``root`` ('/'-separated paths relative to it: video files and frame folders, "" when
    ``root`` is itself a frame folder), sorted, and the manifests' text by relative path. Links are
    followed once; a link to a folder already read is left out."""
    from selfsup.data.datasets import LINK_ALREADY_READ, UNREADABLE_FOLDER

    names: list[str] = []
    manifests: dict[str, str] = {}
    seen: set[tuple[int, int]] = set()

    def failed(error: OSError) -> None:
        skips.add(UNREADABLE_FOLDER, str(error.filename))

    for folder, subfolders, files in os.walk(root, followlinks=True, onerror=failed):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            skips.add(LINK_ALREADY_READ, folder)
            subfolders[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        rel = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        videos = [prefix + f for f in files if _is_video_file(f)]
        names.extend(videos)
        for f in files:
            if f.lower() in MANIFESTS:
                manifests[prefix + f] = (Path(folder) / f).read_text(encoding="utf-8", errors="replace")
        if not subfolders and not videos and sum(map(_is_frame_image, files)) >= MIN_FRAME_FILES:
            names.append("" if rel == "." else rel)
    return sorted(names), manifests


def layout_of(names: list[str], manifests: dict[str, str], label_column: str | None) -> Layout:
    """Split and label of every video (``selfsup.data.layout``: the manifest, else the folders)."""
    return (manifest_layout(names, manifests, label_column, file_columns=FILE_COLUMNS, items="videos")
            or folder_layout(names, label_column, items="videos", manifest="videos.csv or labels.csv"))


def _class_order(names: set[str]) -> list[str]:
    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    return sorted(names, key=lambda s: (0, number(s), "") if number(s) is not None else (1, 0.0, s))


# --------------------------------------------------------------------------------------
# the sources


class VideoStream(ImageStream):
    """Video files or frame folders listed, each decoded to one clip in a DataLoader worker's ``__getitem__``.

    A sample is ``video`` uint8 (``frames``, 3, ``size``, ``size``) and ``labels`` (int64 scalar, -1 where
    unlabeled); training clips start at a random frame, evaluation clips (``evaluation``) are centred.
    A video that cannot be decoded, or has fewer than ``frames`` frames, is replaced by the next usable
    one and counted (``skip_reasons``: "unreadable", "too short", ...). Paths are held in one numpy byte
    buffer, as FolderStream holds them, so forked workers do not copy a list of Python strings.
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int], classes: Sequence[str] = (), *, frames: int,
                 stride: int, size: int, evaluation: bool = False, decoder: str = "pyav", name: str = "",
                 note: str = "", max_pixels: int | None = None, listing_skips: _Skips | None = None,
                 directory: str = "") -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} videos but {len(labels)} labels")
        _check_geometry(frames, stride, size)
        super().__init__(torch.as_tensor(list(labels), dtype=torch.int64), classes, name=name, max_side=None,
                         eval_size=size if evaluation else None, max_pixels=max_pixels, skips=listing_skips,
                         directory=directory)
        self.frames, self.stride, self.size = int(frames), int(stride), int(size)
        self.evaluation = bool(evaluation)
        self.decoder = check_decoder(decoder)
        self.note = note
        self._paths = PackedPaths(files)  # no Python string per video in the forked workers

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        """The video file or frame folder of sample ``index``."""
        return self._paths[index]

    def paths(self) -> list[str]:
        """Every video, in order (a list: for subsets and fingerprints, not for workers)."""
        return [self.path(i) for i in range(len(self))]

    def load(self, index: int) -> tuple[dict[str, Any] | None, str]:
        """({"video", "labels"}, "") for video ``index``, or (None, the reason it is skipped)."""
        clip, status = load_clip(self.path(index), frames=self.frames, stride=self.stride,
                                 offset="centre" if self.evaluation else "random", size=self.size,
                                 decoder=self.decoder, max_pixels=self.max_pixels)
        if clip is None:
            return None, status
        return {"video": clip, "labels": torch.tensor(int(self.labels[index]), dtype=torch.int64)}, ""

    def subset(self, keep: torch.Tensor, name: str) -> VideoStream:
        """The videos at the positions ``keep``, in that order (``data.limit``)."""
        return VideoStream([self.path(i) for i in keep.tolist()], self.labels[keep].tolist(), self.classes,
                           frames=self.frames, stride=self.stride, size=self.size, evaluation=self.evaluation,
                           decoder=self.decoder, name=name, note=self.note, max_pixels=self.max_pixels,
                           listing_skips=self._copied_skips(), directory=self.directory)

    @property
    def fingerprint(self) -> str:
        """What identifies the data: every video's path and stat (see cache.state_key) and the clip geometry."""
        if self._fingerprint is None:
            self._fingerprint = state_key(self.paths(), self.labels.tolist(), self.classes, "video", self.frames,
                                          self.stride, self.size, self.evaluation, self.decoder, self.max_pixels)
        return self._fingerprint

    def warn_skipped(self) -> None:
        """Log what the listing left out, one line per reason."""
        for reason, count in self._skips.counts.items():
            logger.warning("left out %d video(s) of %s (%s): %s", count, self.directory, reason,
                           ", ".join(self._skips.examples.get(reason, [])))


class VideoClips:
    """Clips held in memory: ``video`` (N, T, 3, H, W) uint8, ``labels`` (N,) int64 (-1 where unlabeled),
    and where known ``motion`` (N, T - 1, 2) float32, the moving object's (dy, dx) between frames.
    The tensors may be shared with the per-process cache: never modify them in place."""

    def __init__(self, video: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], *,
                 motion: torch.Tensor | None = None, name: str = "", fingerprint: str = "", note: str = "",
                 skipped: int = 0, skip_reasons: dict[str, int] | None = None,
                 skipped_examples: Sequence[str] = ()) -> None:
        if video.dtype != torch.uint8 or video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be a uint8 (N, T, 3, H, W) tensor, got {video.dtype} {tuple(video.shape)}")
        if labels.shape != (video.shape[0],):
            raise ValueError(f"labels must have shape ({video.shape[0]},), got {tuple(labels.shape)}")
        self.video, self.labels, self.classes, self.motion = video, labels.to(torch.int64), list(classes), motion
        self.name, self.fingerprint, self.note = name, fingerprint, note
        self.skipped, self.skip_reasons = skipped, dict(skip_reasons or {})
        self.skipped_examples = list(skipped_examples)

    def __len__(self) -> int:
        return int(self.video.shape[0])

    @property
    def frames(self) -> int:
        return int(self.video.shape[1])

    @property
    def size(self) -> int:
        return int(self.video.shape[-1])

    @property
    def has_labels(self) -> bool:
        return bool(self.classes) and len(self) > 0 and bool((self.labels >= 0).all())

    def gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of clips ``index``: one ``index_select`` per tensor."""
        batch = {"video": self.video.index_select(0, index), "labels": self.labels.index_select(0, index),
                 "index": index}
        if self.motion is not None:
            batch["motion"] = self.motion.index_select(0, index)
        return batch

    def subset(self, keep: torch.Tensor, name: str) -> VideoClips:
        return VideoClips(self.video[keep], self.labels[keep], self.classes,
                          motion=None if self.motion is None else self.motion[keep], name=name,
                          fingerprint=f"{self.fingerprint}:{name}", note=self.note, skipped=self.skipped,
                          skip_reasons=self.skip_reasons, skipped_examples=self.skipped_examples)

    def __repr__(self) -> str:
        return f"VideoClips(name={self.name!r}, n={len(self)}, frames={self.frames}, size={self.size}, " \
               f"classes={len(self.classes)})"


# --------------------------------------------------------------------------------------
# the embedded set


@lru_cache(maxsize=4)
def _build_moving_clips(split: str, frames: int, size: int, seed: int) -> dict[str, Any]:
    """Moving CIFAR, every label kind (see make_moving_clips); memoized per process."""
    from selfsup.data.datasets import load_dataset

    cifar = load_dataset("embedded", split)
    images, object_classes = cifar.images, cifar.labels
    count, m = EMBEDDED_CLIPS[split], len(cifar)
    side = size // 2  # the object's side
    room = size - side  # top-left positions 0..room keep it inside the frame
    if (frames - 1) * max(SPEEDS) > room:
        raise ConfigError(f"the embedded video set cannot move a {side}-pixel object {max(SPEEDS)} pixels a frame "
                          f"for {frames} frames inside {size} x {size}; use data.frame_size >= {4 * (frames - 1)} "
                          "or fewer frames")
    generator = torch.Generator().manual_seed(seed * 2 + (split == "test"))
    order = torch.randperm(m, generator=generator)
    clip = torch.arange(count)
    obj, background = order[clip % m], order[(clip + m // 2) % m]  # never the same image in one clip
    kinds = len(DIRECTIONS) * len(SPEEDS)
    combo = torch.randperm(count, generator=generator) % kinds  # each (direction, speed) equally often
    direction, speed = combo % len(DIRECTIONS), combo // len(DIRECTIONS)
    step = torch.tensor(DIRECTION_STEPS)[direction] * torch.tensor(SPEEDS)[speed][:, None]  # (N, 2) (dy, dx)
    travel = step * (frames - 1)
    low, high = (-travel).clamp(min=0), room - travel.clamp(min=0)
    start = low + (torch.rand(count, 2, generator=generator) * (high - low + 1)).long()
    where = start[:, None, :] + step[:, None, :] * torch.arange(frames)[None, :, None]  # (N, T, 2) top-left

    scene = images[background]
    if size != scene.shape[-1]:
        scene = TF.resize(scene, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    scene = TF.gaussian_blur(scene.float(), [5, 5], [BACKGROUND_BLUR, BACKGROUND_BLUR]) * BACKGROUND_GAIN
    scene = scene.round().to(torch.uint8).permute(0, 2, 3, 1)  # (N, S, S, 3)
    sprite = TF.resize(images[obj], [side, side], interpolation=InterpolationMode.BILINEAR, antialias=True)
    sprite = sprite.permute(0, 2, 3, 1).float()[:, None]  # (N, 1, s, s, 3)
    centre = (torch.arange(side, dtype=torch.float32) + 0.5 - side / 2) / (side / 2)
    radius = (centre[:, None] ** 2 + centre[None, :] ** 2).sqrt()  # 1 on the inscribed circle
    alpha = ((1 - radius) * (side / 2) / MASK_EDGE).clamp(0, 1)[..., None]  # (s, s, 1): opaque inside, soft rim

    video = scene[:, None].expand(count, frames, size, size, 3).clone()
    n = torch.arange(count)[:, None, None, None]
    t = torch.arange(frames)[None, :, None, None]
    rows = where[:, :, 0, None, None] + torch.arange(side)[None, None, :, None]  # (N, T, s, 1)
    cols = where[:, :, 1, None, None] + torch.arange(side)[None, None, None, :]  # (N, T, 1, s)
    under = video[n, t, rows, cols].float()  # (N, T, s, s, 3)
    video[n, t, rows, cols] = (under * (1 - alpha) + sprite * alpha).round().to(torch.uint8)
    video = video.permute(0, 1, 4, 2, 3).contiguous()
    motion = step.float()[:, None, :].expand(count, max(frames - 1, 0), 2).contiguous()
    digest = hashlib.sha256(f"{EMBEDDED_VERSION}:{split}:{frames}:{size}:{seed}".encode())
    digest.update(video.numpy().tobytes())
    return {"video": video, "motion": motion, "direction": direction, "speed": speed,
            "object": object_classes[obj].clone(), "object_classes": tuple(cifar.classes),
            "fingerprint": digest.hexdigest()[:16]}


def make_moving_clips(split: str, *, frames: int = 8, size: int = 32, seed: int = EMBEDDED_SEED,
                      label_column: str | None = None) -> VideoClips:
    """The embedded video set (moving CIFAR; module docstring): split ``train`` (2,000 clips, 125 of each
    direction and speed, from the embedded training images) or ``test`` (512, from the test images),
    ``frames`` frames of ``size`` x ``size``, labeled by ``label_column`` (direction, speed or object).

    Built with one ``torch.Generator`` seeded by ``seed`` and the split, so it is the same on every machine;
    an object of ``size // 2`` pixels starts where its whole path stays inside the frame, so positions are
    whole pixels and ``motion`` is exact.
    """
    key = SPLIT_DIRS.get(split.lower(), split)
    if key not in EMBEDDED_CLIPS:
        raise DataError(f"the embedded video set has splits {', '.join(EMBEDDED_CLIPS)}; got split={split!r}")
    kind = (label_column or "direction").lower()
    if kind not in EMBEDDED_LABELS:
        raise ConfigError(f"data.label_column={label_column!r}: the embedded video set is labeled by "
                          f"{', '.join(EMBEDDED_LABELS)}")
    _check_geometry(frames, 1, size)
    built = _build_moving_clips(key, int(frames), int(size), int(seed))
    classes = {"direction": DIRECTIONS, "speed": SPEED_NAMES, "object": built["object_classes"]}[kind]
    note = (f" (a {size // 2}-pixel CIFAR object moving {'/'.join(map(str, SPEEDS))} px a frame in one of 8 "
            f"directions over a blurred CIFAR background; labeled by {kind})")
    return VideoClips(built["video"], built[kind], classes, motion=built["motion"],
                      name=f"embedded moving CIFAR ({key})", fingerprint=f"{built['fingerprint']}:{kind}", note=note)


# --------------------------------------------------------------------------------------
# opening a source


def open_video(source: str, split: str, *, frames: int, stride: int, size: int, label_column: str | None = None,
               evaluation: bool = False, decoder: str = "pyav") -> VideoClips | VideoStream:
    """Split ``split`` (train | val | test) of ``source`` as clips of ``frames`` frames ``stride`` apart at
    ``size`` x ``size``: the embedded set in memory (``stride`` does not apply: its motion is per frame), or
    a :class:`VideoStream` of files that decodes in the loader's workers; ``evaluation`` centres the clips."""
    _check_geometry(frames, stride, size)
    key = SPLIT_DIRS.get(split.lower())
    if key is None:
        raise DataError(f"video split {split!r}: use train, val or test")
    text = _name(source)
    if text.lower() == EMBEDDED_VIDEO:
        _check_memory(EMBEDDED_CLIPS.get(key, 0) * frames * 3 * size * size, "the embedded video set")
        return make_moving_clips(key, frames=frames, size=size, label_column=label_column)
    decoder = check_decoder(decoder)
    root = Path(text).expanduser()
    if not root.exists():
        raise DataError(f"{text}: no such video file or folder")
    geometry = {"frames": frames, "stride": stride, "size": size, "evaluation": evaluation, "decoder": decoder}
    if root.is_file():
        if not _is_video_file(root.name):
            raise DataError(f"{text}: not a video file ({', '.join(VIDEO_SUFFIXES)})")
        return VideoStream([str(root)], [-1], name=f"{root.name} ({key})", note=" (one unlabeled video)",
                           directory=str(root.parent), **geometry)
    skips = _Skips()
    names, manifests = _list_folder(root, skips)
    if not names:
        raise DataError(f"{text}: no video files ({', '.join(VIDEO_SUFFIXES)}) or folders of frame images found")
    if names == [""]:
        return VideoStream([str(root)], [-1], name=f"{root.name} ({key})", note=" (one unlabeled frame folder)",
                           listing_skips=skips, directory=str(root), **geometry)
    layout = layout_of(names, manifests, label_column)
    for name, s in zip(names, layout.split):
        if not s:
            skips.add(NOT_IN_MANIFEST, name)
    chosen = [i for i, s in enumerate(layout.split) if s == key]
    if not chosen:
        have = sorted({s for s in layout.split if s})
        raise DataError(f"{text}: no videos in the {key} split (it has: {', '.join(have) or 'none'}; {layout.how})")
    classes = _class_order({layout.labels[i] for i, s in enumerate(layout.split) if s}) if layout.labels else []
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[layout.labels[i]] for i in chosen] if layout.labels else [-1] * len(chosen)
    return VideoStream([str(root / names[i]) for i in chosen], labels, classes, name=f"{root.name} ({key})",
                       note=f" ({layout.how})", listing_skips=skips, directory=str(root), **geometry)


def _check_memory(nbytes: int, what: str) -> None:
    from selfsup.data.modes import memory_budget

    budget, why = memory_budget(None)
    if nbytes / 2**30 > budget:
        raise DataError(f"{what} at these settings needs {nbytes / 2**30:.1f} GiB, over the {budget:.1f} GiB budget "
                        f"({why}); lower data.frame_size or data.frames")


def describe(data: VideoClips | VideoStream) -> str:
    """One line: how many clips, their frames and size, where from, the classes, what was skipped."""
    labels = f", {len(data.classes)} classes" if data.classes else ", unlabeled"
    skipped = ""
    if data.skipped:
        skipped = "; skipped " + ", ".join(f"{n} {why}" for why, n in sorted(data.skip_reasons.items()))
    if isinstance(data, VideoClips):
        return (f"{len(data):,} clips of {data.frames} frames at {data.size}x{data.size} from {data.name}"
                f"{labels}{data.note}{skipped}")
    start = "centred" if data.evaluation else "random start"
    return (f"{len(data):,} videos read as clips of {data.frames} frames every {data.stride} at {data.size}x"
            f"{data.size} ({start}, {data.decoder}) from {data.name}{labels}{data.note}{skipped}")


__all__ = ["DIRECTIONS", "EMBEDDED_VIDEO", "SPEED_NAMES", "VIDEO_SUFFIXES", "Layout", "VideoClips", "VideoStream",
           "check_decoder", "clip_indices", "clip_stride", "describe", "frame_count", "frame_files", "is_video_source",
           "layout_of", "load_clip", "make_moving_clips", "open_video", "read_clip", "torchcodec_available",
           "write_video"]
