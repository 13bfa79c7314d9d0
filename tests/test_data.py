"""Tests for selfsup.data: embedded subset, folders, decoded cache, torchvision errors, BatchLoader.

All tests run on CPU, offline, in a few seconds: image folders are built in
tmp_path from embedded images, and the decoded cache points at tmp_path.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import encode_jpeg, encode_png

from selfsup.data import BatchLoader, ImageArrayDataset, load_dataset
from selfsup.data import datasets as datasets_module
from selfsup.errors import DataError

# torchvision 0.29 flags its image codecs as deprecated; the library relies on them deliberately.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the decoded-data cache at a temporary folder so tests never touch ~/.cache."""
    cache = tmp_path / "decoded-cache"
    monkeypatch.setenv("SELFSUP_CACHE_DIR", str(cache))
    return cache


def embedded_image(index: int) -> torch.Tensor:
    """A real 3 x 32 x 32 uint8 image from the embedded test split."""
    return load_dataset("embedded", "test").images[index]


def write_jpeg(path: Path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_jpeg(image, quality=95).numpy().tobytes())


def write_png(path: Path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image).numpy().tobytes())


def make_image_folder(root: Path) -> None:
    """cat/ has 3 JPEGs (one uppercase extension), dog/ has 3 PNGs (one nested), plus 2 broken files."""
    for i in range(3):
        suffix = ".JPG" if i == 0 else ".jpg"
        write_jpeg(root / "cat" / f"c{i}{suffix}", embedded_image(i))
    write_png(root / "dog" / "d0.png", embedded_image(10))
    write_png(root / "dog" / "d1.png", embedded_image(11))
    write_png(root / "dog" / "nested" / "d2.png", embedded_image(12))
    (root / "dog" / "garbage.jpg").write_bytes(b"this is not an image" * 20)
    good = encode_jpeg(embedded_image(20)).numpy().tobytes()
    (root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "cat" / "notes.txt").write_text("not an image, ignored")


def make_tiny_dataset(count: int) -> ImageArrayDataset:
    """A dataset whose first pixel encodes the sample index, to check what the loader returns."""
    images = torch.zeros(count, 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(count) % 256
    return ImageArrayDataset(images, torch.arange(count) % 5, [str(i) for i in range(5)], name="tiny")


# --------------------------------------------------------------------------- embedded


def test_embedded_train_and_test_are_balanced() -> None:
    train = load_dataset("embedded", "train")
    test = load_dataset("embedded", "test")
    assert train.images.shape == (5000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (1000, 3, 32, 32)
    assert train.images.is_contiguous()
    assert train.labels.dtype == torch.int64
    assert len(train.classes) == 10 and train.classes == sorted(train.classes)
    assert torch.bincount(train.labels).tolist() == [500] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert train.has_labels and train.skipped == 0
    image, label = train[7]
    assert image.shape == (3, 32, 32) and isinstance(label, int)
    assert train.images.float().std() > 20  # real pictures, not blank decodes


def test_embedded_is_memoized_and_resizable() -> None:
    first = load_dataset("embedded", "train")
    second = load_dataset("embedded", "train")
    assert first.images.data_ptr() == second.images.data_ptr()
    resized = load_dataset("embedded", "test", decode_size=40)
    assert resized.images.shape == (1000, 3, 40, 40)
    with pytest.raises(DataError, match="splits"):
        load_dataset("embedded", "validation")


# --------------------------------------------------------------------------- folders


def test_image_folder_skips_and_counts_corrupt_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_image_folder(tmp_path / "pets")
    with caplog.at_level(logging.WARNING, logger="selfsup.data.datasets"):
        dataset = load_dataset(str(tmp_path / "pets"))
    assert dataset.classes == ["cat", "dog"]
    assert len(dataset) == 6 and dataset.images.shape[1:] == (3, 32, 32)
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert dataset.skipped == 2
    assert {Path(p).name for p in dataset.skipped_examples} == {"garbage.jpg", "truncated.jpg"}
    assert "skipped 2 unreadable" in caplog.text and "garbage.jpg" in caplog.text
    assert torch.equal(dataset.images[3], embedded_image(10))  # PNG is lossless


def test_split_subfolders_and_aliases(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data" / "train")
    write_png(tmp_path / "data" / "val" / "cat" / "v.png", embedded_image(30))
    assert len(load_dataset(str(tmp_path / "data"), "train")) == 6
    test = load_dataset(str(tmp_path / "data"), "test")
    assert len(test) == 1 and test.classes == ["cat"]
    with pytest.raises(DataError, match="unlabeled"):
        load_dataset(str(tmp_path / "data"), "unlabeled")


def test_all_corrupt_folder_raises(tmp_path: Path) -> None:
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.jpg").write_bytes(b"\xff\xd8 nope")
    (tmp_path / "bad" / "a" / "y.png").write_bytes(b"")
    with pytest.raises(DataError, match="could be decoded"):
        load_dataset(str(tmp_path / "bad"))


def test_flat_folder_is_unlabeled(tmp_path: Path) -> None:
    for i in range(4):
        write_jpeg(tmp_path / "flat" / f"{i}.jpeg", embedded_image(i))
    bmp = embedded_image(4).permute(1, 2, 0).numpy()
    Image.fromarray(bmp).save(tmp_path / "flat" / "4.bmp")  # torchvision cannot decode BMP: PIL fallback
    train = load_dataset(str(tmp_path / "flat"), "train")
    assert len(train) == 5 and train.skipped == 0
    assert torch.equal(train.images[4], embedded_image(4))
    assert train.labels.tolist() == [-1] * 5
    assert train.classes == [] and not train.has_labels
    assert len(load_dataset(str(tmp_path / "flat"), "test")) == 5  # same folder for every split


def test_missing_empty_and_imageless_folders_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "sub" / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="no images found"):
        load_dataset(str(tmp_path / "docs"))


def test_mixed_sizes_are_resized(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "mixed"
    for i in range(3):
        write_png(folder / f"small{i}.png", embedded_image(i))
    big = torch.nn.functional.interpolate(embedded_image(5)[None].float(), size=(48, 64)).to(torch.uint8)[0]
    write_png(folder / "big.png", big)
    with caplog.at_level(logging.INFO, logger="selfsup.data.datasets"):
        dataset = load_dataset(str(folder))
    assert dataset.images.shape == (4, 3, 32, 32)
    assert "different sizes" in caplog.text
    assert load_dataset(str(folder), decode_size=24).images.shape == (4, 3, 24, 24)


def test_memory_limit_is_enforced(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "pets")
    with pytest.raises(DataError, match="GiB"):
        load_dataset(str(tmp_path / "pets"), decode_size=512, max_memory_gib=0.001)


# --------------------------------------------------------------------------- decoded cache


def test_second_load_uses_cache(tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_image_folder(tmp_path / "pets")
    first = load_dataset(str(tmp_path / "pets"))
    assert len(list(isolated_cache.glob("*.pt"))) == 1

    def refuse(path: str) -> torch.Tensor:
        raise AssertionError(f"decoder called for {path} despite the cache")

    monkeypatch.setattr(datasets_module, "_decode_file", refuse)
    second = load_dataset(str(tmp_path / "pets"))
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == first.classes and second.skipped == 2

    write_png(tmp_path / "pets" / "dog" / "new.png", embedded_image(40))  # changes the key
    with pytest.raises(DataError, match="could be decoded"):
        load_dataset(str(tmp_path / "pets"))


def test_corrupt_cache_is_rebuilt(tmp_path: Path, isolated_cache: Path) -> None:
    make_image_folder(tmp_path / "pets")
    first = load_dataset(str(tmp_path / "pets"))
    (cache_file,) = isolated_cache.glob("*.pt")
    cache_file.write_bytes(b"definitely not a torch file")
    rebuilt = load_dataset(str(tmp_path / "pets"))
    assert torch.equal(first.images, rebuilt.images)
    assert torch.load(cache_file, weights_only=True)["images"].shape == first.images.shape
    assert not list(isolated_cache.glob("*.tmp"))


# --------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize(
    ("name", "archive"),
    [("cifar10", "cifar-10-python.tar.gz"), ("cifar100", "cifar-100-python.tar.gz"), ("stl10", "stl10_binary.tar.gz")],
)
def test_torchvision_offline_error_names_archive(tmp_path: Path, name: str, archive: str) -> None:
    root = tmp_path / "datasets"
    with pytest.raises(DataError) as info:
        load_dataset(name, "train", root=str(root), download=False)
    assert archive in str(info.value) and str(root) in str(info.value)


def test_torchvision_bad_archive_is_reported_without_download(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"partial download")
    with pytest.raises(DataError, match="MD5"):
        load_dataset("cifar10", "test", root=str(tmp_path), download=False)


class FakeCifar:
    """Stands in for torchvision's CIFAR10: NHWC uint8 data, list targets, and the download metadata."""

    filename = "fake-python.tar.gz"
    base_folder = "fake-batches-py"
    url = "https://example.invalid/fake-python.tar.gz"
    tgz_md5 = "0" * 32
    constructed = 0

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        FakeCifar.constructed += 1
        rng = np.random.default_rng(0)
        self.data = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
        self.targets = [0, 1, 2, 0, 1, 2]
        self.classes = ["a", "b", "c"]


class FakeStlUnlabeled:
    """Stands in for torchvision's STL10 unlabeled split: NCHW data and -1 labels."""

    filename = "fake_binary.tar.gz"
    base_folder = "fake_binary"
    url = "https://example.invalid/fake_binary.tar.gz"
    tgz_md5 = "0" * 32

    def __init__(self, root: str, split: str = "train", download: bool = False) -> None:
        self.data = np.zeros((3, 3, 96, 96), dtype=np.uint8)
        self.labels = np.array([-1, -1, -1])
        self.classes = ["x", "y"]


def test_torchvision_layout_resize_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets_module, "_torchvision_class", lambda name: FakeCifar)
    (tmp_path / FakeCifar.base_folder).mkdir()
    (tmp_path / FakeCifar.base_folder / "data_batch_1").write_bytes(b"stand-in")
    native = load_dataset("cifar10", "train", root=str(tmp_path), download=False)
    expected = torch.from_numpy(FakeCifar(str(tmp_path)).data).permute(0, 3, 1, 2)
    assert torch.equal(native.images, expected) and native.images.is_contiguous()
    assert native.labels.tolist() == [0, 1, 2, 0, 1, 2] and native.classes == ["a", "b", "c"]
    FakeCifar.constructed = 0
    resized = load_dataset("cifar10", "train", root=str(tmp_path), decode_size=16, download=False)
    again = load_dataset("cifar10", "train", root=str(tmp_path), decode_size=16, download=False)
    assert resized.images.shape == (6, 3, 16, 16) and torch.equal(resized.images, again.images)
    assert FakeCifar.constructed == 1  # the second resized load came from the decoded cache


def test_torchvision_unlabeled_split_has_no_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets_module, "_torchvision_class", lambda name: FakeStlUnlabeled)
    dataset = load_dataset("stl10", "unlabeled", root=str(tmp_path), download=False)
    assert dataset.images.shape == (3, 3, 96, 96)
    assert dataset.classes == [] and dataset.labels.tolist() == [-1, -1, -1] and not dataset.has_labels


def test_torchvision_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="splits"):
        load_dataset("cifar10", "unlabeled", root=str(tmp_path), download=False)


# --------------------------------------------------------------------------- BatchLoader


def collect(loader: BatchLoader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def test_batches_are_deterministic_and_well_formed() -> None:
    dataset = make_tiny_dataset(103)
    loader = BatchLoader(dataset, 10, seed=3)
    assert len(loader) == 10
    batches = collect(loader)
    again = collect(BatchLoader(dataset, 10, seed=3))
    assert len(batches) == 10
    for batch, other in zip(batches, again):
        assert torch.equal(batch["index"], other["index"])
        assert batch["images"].shape == (10, 3, 2, 2) and batch["images"].dtype == torch.uint8
        assert batch["labels"].dtype == torch.int64
        assert torch.equal(batch["images"][:, 0, 0, 0], batch["index"].to(torch.uint8))
        assert torch.equal(batch["labels"], batch["index"] % 5)
    seen = torch.cat([b["index"] for b in batches])
    assert len(set(seen.tolist())) == 100
    loader.set_epoch(1)
    assert not torch.equal(collect(loader)[0]["index"], batches[0]["index"])
    assert not torch.equal(collect(BatchLoader(dataset, 10, seed=4))[0]["index"], batches[0]["index"])


def test_unshuffled_keeps_order_and_last_partial_batch() -> None:
    loader = BatchLoader(make_tiny_dataset(25), 10, shuffle=False, drop_last=False)
    batches = collect(loader)
    assert len(loader) == 3 == len(batches)
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(25))
    assert len(batches[-1]["index"]) == 5


def test_rank_sharding_is_disjoint_equal_and_covering() -> None:
    dataset = make_tiny_dataset(101)
    world = 4
    loaders = [BatchLoader(dataset, 5, seed=9, rank=r, world_size=world) for r in range(world)]
    for loader in loaders:
        loader.set_epoch(2)
    shards = [loader.indices() for loader in loaders]
    assert {len(shard) for shard in shards} == {25}
    assert {len(loader) for loader in loaders} == {5}
    union = torch.cat(shards)
    assert len(set(union.tolist())) == 100  # disjoint
    single = BatchLoader(dataset, 5, seed=9)
    single.set_epoch(2)
    assert set(union.tolist()) == set(single.indices()[:100].tolist())  # same permutation on every rank
    served = torch.cat([b["index"] for b in collect(loaders[1])])
    assert torch.equal(served, shards[1])


def test_start_batch_resumes_exactly() -> None:
    dataset = make_tiny_dataset(64)
    loader = BatchLoader(dataset, 8, seed=1)
    loader.set_epoch(5)
    full = collect(loader)
    resumed = BatchLoader(dataset, 8, seed=1)
    resumed.set_start_batch(3)
    resumed.set_epoch(5)
    tail = collect(resumed)
    assert len(tail) == len(full) - 3
    for got, expected in zip(tail, full[3:]):
        assert torch.equal(got["index"], expected["index"])
    assert len(collect(resumed)) == len(full)  # the skip applies to one epoch only


def test_too_small_dataset_raises() -> None:
    with pytest.raises(DataError, match="10 samples"):
        BatchLoader(make_tiny_dataset(10), 16)
    with pytest.raises(DataError, match="per rank"):
        BatchLoader(make_tiny_dataset(20), 8, rank=1, world_size=4)
    assert len(BatchLoader(make_tiny_dataset(10), 16, drop_last=False)) == 1


def test_folder_without_test_split_is_scored_leave_one_out(tmp_path, tiny_overrides, capsys):
    import json

    from selfsup.cli import main

    make_image_folder(tmp_path / "pets")  # cat/ and dog/, no train/ or test/: both splits are this folder
    assert main(["pretrain", "--data", str(tmp_path / "pets"), *tiny_overrides, "data.batch_size=2",
                 "trainer.epochs=1", "trainer.run_name=pets"]) == 0
    out = capsys.readouterr().out
    assert "leave-one-out" in out
    knn = json.loads((tmp_path / "runs" / "pets" / "summary.json").read_text())["knn"]
    assert knn["leave_one_out"] is True and knn["bank_samples"] == knn["test_samples"] == 6
    assert set(knn["trained"]) == {"k5"}  # k clamped to the 5 other images, not the 6 with itself

    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "runs" / "pets")]) == 0
    result = json.loads((tmp_path / "runs" / "pets" / "eval_knn.json").read_text())
    assert result["leave_one_out"] is True and result["test_is_train"] is True
