"""Folder datasets fed hostile input: changed files behind the decoded cache, damaged cache files,
symbolic-link loops, decompression bombs, animated GIFs, and the cache's own housekeeping.

Every folder is built from real image files in tmp_path; the decoded cache points at tmp_path.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.cli import main
from selfsup.data import load_dataset
from selfsup.data import datasets as datasets_module
from selfsup.data.headers import image_size
from selfsup.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

LOGGER = "selfsup.data"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the decoded-data cache at a temporary folder so tests never touch ~/.cache."""
    cache = tmp_path / "decoded-cache"
    monkeypatch.setenv("SELFSUP_CACHE_DIR", str(cache))
    monkeypatch.delenv("SELFSUP_MAX_IMAGE_PIXELS", raising=False)
    return cache


def noise(seed: int, height: int = 16, width: int = 16) -> np.ndarray:
    """A distinct H x W x 3 uint8 picture per seed."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return path


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1)


def sample_of(dataset, array: np.ndarray) -> int | None:
    """Index of the sample whose pixels equal `array`, or None."""
    matches = (dataset.images == chw(array)).flatten(1).all(1).nonzero().flatten().tolist()
    return matches[0] if len(matches) == 1 else None


def make_pets(root: Path, per_class: int = 2, fmt: str = "png") -> dict[str, np.ndarray]:
    """cat/ and dog/ with `per_class` lossless images each; returns {relative path: pixels}."""
    pictures = {}
    for c, name in enumerate(("cat", "dog")):
        for i in range(per_class):
            relative = f"{name}/{i}.{fmt}"
            pictures[relative] = noise(100 * c + i)
            save(root / relative, pictures[relative])
    return pictures


# --------------------------------------------------------------------------- decoded cache notices changes


def test_same_size_replacement_keeping_mtime_and_inode_is_noticed(tmp_path: Path) -> None:
    """What `cp -p new.bmp cat/0.bmp` does: rewrite in place (same inode), same size, old mtime restored."""
    make_pets(tmp_path / "pets", fmt="bmp")  # BMP: every 16x16 picture has exactly the same file size
    target = tmp_path / "pets" / "cat" / "0.bmp"
    assert load_dataset(str(tmp_path / "pets")).images.shape[0] == 4
    before = os.stat(target)
    replacement = noise(999)
    buffer = io.BytesIO()
    Image.fromarray(replacement).save(buffer, "BMP")
    assert len(buffer.getvalue()) == before.st_size
    with open(target, "r+b") as stream:  # in place, as cp does: the inode stays
        stream.write(buffer.getvalue())
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    while os.stat(target).st_ctime_ns == before.st_ctime_ns:  # a coarse clock may not have ticked yet
        time.sleep(0.005)
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(target)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)

    reloaded = load_dataset(str(tmp_path / "pets"))
    assert sample_of(reloaded, replacement) is not None  # the new picture, not the cached old one


def test_files_swapped_between_class_folders_change_the_labels(tmp_path: Path) -> None:
    pictures = make_pets(tmp_path / "pets")
    for relative in pictures:  # one mtime for all, as when unpacked from an archive
        os.utime(tmp_path / "pets" / relative, ns=(1_600_000_000 * 10**9,) * 2)
    first = load_dataset(str(tmp_path / "pets"))
    assert first.labels[sample_of(first, pictures["cat/0.png"])] == 0
    cat, dog = tmp_path / "pets" / "cat" / "0.png", tmp_path / "pets" / "dog" / "0.png"
    parked = tmp_path / "parked.png"
    cat.rename(parked)  # same names, sizes and mtimes afterwards: only the contents moved
    dog.rename(cat)
    parked.rename(dog)

    swapped = load_dataset(str(tmp_path / "pets"))
    assert swapped.labels[sample_of(swapped, pictures["cat/0.png"])] == 1  # now a dog
    assert swapped.labels[sample_of(swapped, pictures["dog/0.png"])] == 0


def test_flipped_bytes_in_the_cache_are_detected_and_rebuilt(
    tmp_path: Path, isolated_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_pets(tmp_path / "pets")
    first = load_dataset(str(tmp_path / "pets"))
    (cache_file,) = isolated_cache.glob("*.pt")
    blob = bytearray(cache_file.read_bytes())
    pixels = first.images.numpy().tobytes()
    start = blob.find(pixels)
    assert start >= 0 and blob.find(pixels, start + 1) < 0  # the pixel payload, located exactly
    for offset in range(start + len(pixels) // 2, start + len(pixels) // 2 + 8):
        blob[offset] ^= 0xFF
    cache_file.write_bytes(bytes(blob))
    damaged = torch.load(cache_file, weights_only=True)["images"]
    assert not torch.equal(damaged, first.images)  # torch itself loads the wrong pixels without a word

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = load_dataset(str(tmp_path / "pets"))
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert "checksum" in caplog.text and "rebuilding" in caplog.text
    assert torch.equal(torch.load(cache_file, weights_only=True)["images"], first.images)  # rewritten whole


def test_a_changed_folder_replaces_its_old_cache_entry(tmp_path: Path, isolated_cache: Path) -> None:
    make_pets(tmp_path / "pets")
    load_dataset(str(tmp_path / "pets"))
    load_dataset(str(tmp_path / "pets"), decode_size=8)  # another decode size: a second, valid entry
    assert len(list(isolated_cache.glob("*.pt"))) == 2
    save(tmp_path / "pets" / "dog" / "new.png", noise(7))
    assert len(load_dataset(str(tmp_path / "pets"))) == 5
    entries = sorted(isolated_cache.glob("*.pt"))
    assert len(entries) == 2  # the entry for the old files is gone, the decode_size=8 one stays
    assert len(load_dataset(str(tmp_path / "pets"), decode_size=8)) == 5  # rebuilt for the new file...
    assert len(list(isolated_cache.glob("*.pt"))) == 2  # ...in place of its predecessor


# --------------------------------------------------------------------------- symbolic links


def test_a_symlink_loop_is_followed_once_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_pets(tmp_path / "pets", per_class=10)
    os.symlink(tmp_path / "pets" / "cat", tmp_path / "pets" / "cat" / "loop")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = load_dataset(str(tmp_path / "pets"))
    assert len(dataset) == 20 and dataset.labels.tolist() == [0] * 10 + [1] * 10
    assert dataset.skipped == 1 and dataset.skip_reasons == {"link to a folder already read": 1}
    assert dataset.skipped_examples == [str(tmp_path / "pets" / "cat" / "loop")]
    assert "did not follow 1 symbolic link" in caplog.text and "no link is followed twice" in caplog.text


def test_links_to_outside_folders_are_followed_but_not_into_other_classes(tmp_path: Path) -> None:
    make_pets(tmp_path / "pets")
    outside = tmp_path / "archive"
    save(outside / "a.png", noise(50))
    save(outside / "deeper" / "b.png", noise(51))
    os.symlink(outside, outside / "deeper" / "back-up")  # a loop outside the data folder
    os.symlink(outside, tmp_path / "pets" / "dog" / "more")  # assembling a class from elsewhere: followed
    os.symlink(tmp_path / "pets" / "dog", tmp_path / "pets" / "cat" / "dogs")  # dogs labeled cat: not followed
    dataset = load_dataset(str(tmp_path / "pets"))
    assert len(dataset) == 6 and dataset.labels.tolist() == [0, 0, 1, 1, 1, 1]
    assert dataset.labels[sample_of(dataset, noise(51))] == 1
    assert dataset.skip_reasons == {"link to a folder already read": 2}


# --------------------------------------------------------------------------- pixel limit


def big_png(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG: a huge canvas in a few tens of KB, built row by row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_skipped_at_the_default_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_pets(tmp_path / "pets")
    bomb = tmp_path / "pets" / "cat" / "bomb.png"
    bomb.write_bytes(big_png(16000, 16000))  # 256 M pixels, 768 MB once decoded as RGB
    assert bomb.stat().st_size < 300_000
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = load_dataset(str(tmp_path / "pets"))
    assert len(dataset) == 4 and dataset.images.shape[-2:] == (16, 16)
    assert dataset.skip_reasons == {"over the pixel limit": 1} and dataset.skipped_examples == [str(bomb)]
    assert "89,478,485 pixels" in caplog.text and "SELFSUP_MAX_IMAGE_PIXELS" in caplog.text


def test_the_pixel_limit_is_checked_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    make_pets(tmp_path / "pets")
    save(tmp_path / "pets" / "dog" / "large.png", noise(5, 40, 30))  # 1200 pixels
    save(tmp_path / "pets" / "dog" / "large.jpg", noise(6, 30, 41), quality=95)
    monkeypatch.setenv("SELFSUP_MAX_IMAGE_PIXELS", "1000")
    decoded_shapes = []
    real_decode = datasets_module.decode_image

    def recording_decode(data, mode):  # the real decoder, watched
        image = real_decode(data, mode=mode)
        decoded_shapes.append(tuple(image.shape[-2:]))
        return image

    monkeypatch.setattr(datasets_module, "decode_image", recording_decode)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = load_dataset(str(tmp_path / "pets"))
    assert len(dataset) == 4 and decoded_shapes == [(16, 16)] * 4
    assert dataset.skipped == 2 and dataset.skip_reasons == {"over the pixel limit": 2}
    assert "more than 1,000 pixels" in caplog.text

    cached = load_dataset(str(tmp_path / "pets"))  # the cache keeps the counts
    assert cached.skipped == 2 and cached.skip_reasons == dataset.skip_reasons and len(decoded_shapes) == 4
    monkeypatch.setenv("SELFSUP_MAX_IMAGE_PIXELS", "5000")  # a higher limit gives another result, not the cache's
    assert len(load_dataset(str(tmp_path / "pets"))) == 6
    monkeypatch.setenv("SELFSUP_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(DataError, match="SELFSUP_MAX_IMAGE_PIXELS"):
        load_dataset(str(tmp_path / "pets"))


def test_header_sizes_match_pil_for_every_accepted_format() -> None:
    picture = Image.fromarray(noise(1, 23, 37))
    variants = [
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("JPEG", {"exif": b"Exif\x00\x00" + bytes(6000)}),  # a large segment before the frame header
        ("PNG", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("WEBP", {"quality": 80}),
        ("WEBP", {"lossless": True}),
        ("WEBP", {"save_all": True, "append_images": [picture], "lossless": True}),  # extended (VP8X)
    ]
    for fmt, options in variants:
        buffer = io.BytesIO()
        picture.save(buffer, fmt, **options)
        assert image_size(buffer.getvalue()) == (37, 23), (fmt, options)
        assert image_size(buffer.getvalue()[:8]) is None  # cut before the size
    assert image_size(big_png(16000, 9000)[:64]) == (16000, 9000)
    assert image_size(b"not an image at all") is None


# --------------------------------------------------------------------------- animated GIF


def test_an_animated_gif_contributes_its_first_frame(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_pets(tmp_path / "pets")
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (16, 16), color) for color in colors]
    frames[0].save(tmp_path / "pets" / "cat" / "blink.gif", save_all=True, append_images=frames[1:], duration=50)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        dataset = load_dataset(str(tmp_path / "pets"))
    assert len(dataset) == 5 and dataset.skipped == 0
    red = np.zeros((16, 16, 3), dtype=np.uint8)
    red[..., 0] = 255
    assert dataset.labels[sample_of(dataset, red)] == 0
    assert "first frame of 1 animated image" in caplog.text


# --------------------------------------------------------------------------- selfsup cache info / clean


def test_cache_info_and_clean_touch_only_cache_files(
    tmp_path: Path, isolated_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_pets(tmp_path / "pets")
    load_dataset(str(tmp_path / "pets"))
    load_dataset(str(tmp_path / "pets"), decode_size=8)
    old_format = isolated_cache / f"pets-{'0' * 24}.pt"
    old_format.write_bytes(bytes(1000))
    foreign = [isolated_cache / "model.pt", isolated_cache / "notes.txt"]
    for path in foreign:
        path.write_text("not ours")
    ours = sum(path.stat().st_size for path in isolated_cache.iterdir() if path not in foreign)

    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(isolated_cache) in out and "3 entries" in out and old_format.name in out
    assert main(["cache", "clean"]) == 0
    out = capsys.readouterr().out
    assert f"removed 3 files ({ours:,} bytes" in out
    assert sorted(isolated_cache.iterdir()) == sorted(foreign)
    assert main(["cache", "clean"]) == 0 and "removed 0 files" in capsys.readouterr().out
    assert main(["cache", "info", "--dir", str(tmp_path / "nowhere")]) == 0
    assert "0 entries" in capsys.readouterr().out
