"""The streaming image source (data/sources.py, StreamLoader) and data.mode.

Folders of real JPEG and PNG files written with PIL: the memory and streaming paths give the
same batches for a seed, streamed batches of varied sizes are padded and cropped only inside
each image, the order resumes exactly mid-epoch, two gloo ranks get disjoint equal shards,
unreadable files are replaced and counted, and the trainer runs and resumes in stream mode."""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from PIL import Image

from selfsup.data import BatchLoader, load_dataset
from selfsup.data.datasets import TOO_MANY_PIXELS, UNREADABLE
from selfsup.data.loader import StreamLoader
from selfsup.data.modes import open_data
from selfsup.data.sources import FolderStream, collate_samples, open_folder_stream
from selfsup.errors import ConfigError, DataError
from selfsup.pretext import augment as A


def write_folder(root: Path, sizes: list[tuple[int, int]], classes: int = 2, seed: int = 0,
                 flat_value: bool = False) -> Path:
    """Images of the given (h, w) spread over `classes` class folders, alternating JPEG and PNG
    (PNG only with `flat_value`: each image one grey level, 40 + 10 * its number, exactly)."""
    rng = np.random.default_rng(seed)
    for number, (height, width) in enumerate(sizes):
        folder = root / f"class{number % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        if flat_value:
            pixels = np.full((height, width, 3), 40 + 10 * number, dtype=np.uint8)
        else:
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        suffix = "png" if flat_value or number % 2 else "jpg"
        Image.fromarray(pixels).save(folder / f"img{number:03d}.{suffix}")
    return root


def batches(loader) -> list[dict[str, torch.Tensor]]:
    return [dict(batch) for batch in loader]


# ----------------------------------------------------------------------------------- same samples


@pytest.mark.parametrize("workers", [0, 1])
def test_memory_and_stream_give_the_same_batches_for_a_seed(tmp_path, workers):
    folder = write_folder(tmp_path / "data", [(16, 16)] * 14)
    memory = load_dataset(str(folder), decode_size=16)
    stream = open_folder_stream(str(folder))
    assert len(memory) == len(stream) == 14 and memory.classes == stream.classes
    mem_loader = BatchLoader(memory, 4, seed=5)
    str_loader = StreamLoader(stream, 4, seed=5, workers=workers)
    for epoch in (0, 3):
        mem_loader.set_epoch(epoch)
        str_loader.set_epoch(epoch)
        got, want = batches(str_loader), batches(mem_loader)
        assert len(got) == len(want) == 3
        for a, b in zip(got, want):
            assert "image_sizes" not in a  # one size: nothing padded, the exact memory-path batch
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["labels"], b["labels"])
            assert torch.equal(a["images"], b["images"])
    str_loader.close()


def test_views_of_equal_batches_are_equal(tmp_path):
    """With augmentation on, a streamed batch of one size is augmented exactly as the memory batch."""
    from selfsup.config import load_config
    from selfsup.core.build import build_method

    folder = write_folder(tmp_path / "data", [(20, 20)] * 8)
    mem = next(iter(BatchLoader(load_dataset(str(folder)), 8, seed=1)))
    streamed = next(iter(StreamLoader(open_folder_stream(str(folder)), 8, seed=1, workers=0)))
    method = build_method(load_config(None, ["augment.views.0.size=16", "augment.views.1.size=16"]))
    torch.manual_seed(3)
    want = method.make_views(mem)
    torch.manual_seed(3)
    got = method.make_views(streamed)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ----------------------------------------------------------------------------------- varied sizes


SIZES = [(20, 30), (33, 17), (16, 16), (40, 12), (25, 25), (12, 38)]


def test_varied_sizes_are_padded_at_the_top_left_with_their_sizes(tmp_path):
    folder = write_folder(tmp_path / "data", SIZES, flat_value=True)
    stream = open_folder_stream(str(folder))
    batch = collate_samples([stream[i] for i in range(len(stream))])
    sizes = [tuple(stream.decode(i)[0].shape[-2:]) for i in range(len(stream))]
    assert sorted(sizes) == sorted(SIZES)
    assert batch["image_sizes"].tolist() == [list(s) for s in sizes]
    assert batch["images"].shape == (6, 3, 40, 38) and batch["images"].dtype == torch.uint8
    for image, (h, w), i in zip(batch["images"], sizes, range(len(stream))):
        assert torch.equal(image[:, :h, :w], stream.decode(i)[0])
        assert image[:, h:].count_nonzero() == 0 and image[:, :, w:].count_nonzero() == 0


def test_crops_stay_inside_each_image(tmp_path):
    """Each image is one grey level and the padding is black: any output pixel other than the
    image's own level came from the padding (or another image)."""
    folder = write_folder(tmp_path / "data", SIZES, flat_value=True)
    stream = open_folder_stream(str(folder))
    batch = collate_samples([stream[i] for i in range(len(stream))] * 20)  # 120 crops, 20 per image
    levels = torch.stack([image[0, 0, 0] for image in batch["images"]]).float() / 255
    cfg = A.AugmentConfig(size=24, crop_scale=(0.08, 1.0), hflip_p=0.5, jitter_p=0.0, grayscale_p=0.0,
                          mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    aug = A.Augment(cfg)
    out = aug(batch["images"], torch.Generator().manual_seed(0), image_sizes=batch["image_sizes"])
    assert (out - levels.view(-1, 1, 1, 1)).abs().max() < 1e-5
    params = aug.sample_params(120, 40, 38, torch.Generator().manual_seed(1), image_sizes=batch["image_sizes"])
    top, left, height, width = params.boxes.unbind(1)
    own_h, own_w = batch["image_sizes"].float().unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= own_h).all() and (left + width <= own_w).all()
    assert ((height * width) / (own_h * own_w)).max() > 0.8  # large crops reach each image's own edges


def test_per_sample_fallback_is_the_centre_crop_of_each_image():
    # no candidate of aspect >= 4 fits either image: each falls back to its own centre crop
    boxes = A.random_resized_crop_boxes(2, torch.tensor([40, 30]), torch.tensor([40, 90]), (1.0, 1.0), (4.0, 5.0),
                                        torch.Generator().manual_seed(0))
    assert boxes.tolist() == [[15.0, 0.0, 10.0, 40.0], [4.0, 0.0, 22.0, 90.0]]


def test_per_sample_sizes_equal_to_the_batch_size_give_the_same_boxes():
    for scale, ratio in (((0.08, 1.0), (3 / 4, 4 / 3)), ((1.0, 1.0), (2.0, 3.0))):
        shared = A.random_resized_crop_boxes(300, 37, 52, scale, ratio, torch.Generator().manual_seed(4))
        own = A.random_resized_crop_boxes(300, torch.full((300,), 37), torch.full((300,), 52), scale, ratio,
                                          torch.Generator().manual_seed(4))
        assert torch.equal(shared, own)


def test_padded_batches_are_prepared_for_evaluation_image_by_image(tmp_path):
    from selfsup.config import load_config
    from selfsup.core.build import build_method

    folder = write_folder(tmp_path / "data", SIZES)
    stream = open_folder_stream(str(folder))
    batch = collate_samples([stream[i] for i in range(len(stream))])
    method = build_method(load_config(None, ["augment.views.0.size=16", "augment.views.1.size=16"]))
    got = method.preprocess(batch)
    want = torch.cat([A.eval_transform(stream.decode(i)[0][None], 16, method.eval_mean, method.eval_std)
                      for i in range(len(stream))])
    assert got.shape == (6, 3, 16, 16) and torch.equal(got, want)
    # an evaluation stream does that geometry in the worker: every image arrives at 16 x 16
    eval_stream = open_folder_stream(str(folder), eval_size=16)
    assert all(eval_stream[i]["images"].shape == (3, 16, 16) for i in range(len(eval_stream)))


def test_features_of_a_streamed_split_equal_the_memory_path(tmp_path):
    from selfsup.config import load_config
    from selfsup.core.build import build_method
    from selfsup.evaluate import labeled_features

    folder = write_folder(tmp_path / "data", [(16, 16)] * 10)
    common = [f"data.source={folder}", "augment.views.0.size=16", "augment.views.1.size=16", "backbone.width=8",
              "data.eval_batch_size=4", "data.workers=0"]
    method = build_method(load_config(None, common)).eval()
    feats = {mode: labeled_features(method, load_config(None, [*common, f"data.mode={mode}"]), device=torch.device("cpu"))
             for mode in ("memory", "stream")}
    for a, b in zip(feats["memory"][:4], feats["stream"][:4]):
        assert a.shape[0] == 10 and torch.equal(a, b)


def test_large_images_are_shrunk_to_max_side_keeping_aspect(tmp_path):
    folder = write_folder(tmp_path / "data", [(60, 90), (30, 20)], classes=1)
    stream = open_folder_stream(str(folder), max_side=45)
    assert sorted(tuple(stream.decode(i)[0].shape[-2:]) for i in range(2)) == [(30, 20), (30, 45)]
    whole = open_folder_stream(str(folder), max_side=None)
    assert sorted(tuple(whole.decode(i)[0].shape[-2:]) for i in range(2)) == [(30, 20), (60, 90)]


# ----------------------------------------------------------------------------------- order and resume


def test_mid_epoch_resume_continues_exactly(tmp_path):
    folder = write_folder(tmp_path / "data", SIZES * 3)
    stream = open_folder_stream(str(folder))
    loader = StreamLoader(stream, 3, seed=2, workers=0)
    loader.set_epoch(4)
    straight = batches(loader)
    assert len(straight) == 6
    for k in (1, 4):
        resumed = StreamLoader(stream, 3, seed=2, workers=0)
        resumed.set_epoch(4)
        resumed.set_start_batch(k)
        rest = batches(resumed)
        assert len(rest) == len(straight) - k
        for a, b in zip(rest, straight[k:]):
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    # ... and the next iteration starts the epoch from its first batch again
    assert torch.equal(batches(resumed)[0]["index"], straight[0]["index"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, folder: str, out: dict, shards: bool = False) -> None:
    """One gloo rank streaming ``folder`` (``shards``: a shard set) in batches of 2; ``out[rank]`` is
    (its batch count, the indices of each batch)."""
    from selfsup.data.shards import open_shards

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a rank with a batch more than the other would wait in all_gather: the timeout turns a hang into an error
    tdist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        source = open_shards(folder) if shards else open_folder_stream(folder)
        loader = StreamLoader(source, 2, seed=1, rank=rank, world_size=world, workers=0)
        seen = []
        for batch in loader:
            parts = [torch.empty_like(batch["index"]) for _ in range(world)]
            tdist.all_gather(parts, batch["index"])  # what SimCLR's gathered negatives need: equal shapes
            seen.append(batch["index"].tolist())
        out[rank] = (len(loader), seen)
    finally:
        tdist.destroy_process_group()


def test_two_gloo_ranks_get_disjoint_equal_shards_of_an_uneven_set(tmp_path):
    # 15 samples over 2 ranks: 7 each (one left out this epoch), 3 batches of 2; without the cut
    # to equal shards rank 0 would have 4 batches and wait in all_gather for a 4th of rank 1
    folder = write_folder(tmp_path / "data", [(12, 12)] * 15)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_worker, args=(2, _free_port(), str(folder), out), nprocs=2, join=True)
        results = dict(out)
    (len0, seen0), (len1, seen1) = results[0], results[1]
    assert len0 == len1 == len(seen0) == len(seen1) == 3
    flat0 = [i for b in seen0 for i in b]
    flat1 = [i for b in seen1 for i in b]
    assert len(flat0) == len(flat1) == 6
    assert not set(flat0) & set(flat1) and set(flat0) | set(flat1) <= set(range(15))


# ----------------------------------------------------------------------------------- unreadable files


def test_unreadable_files_are_replaced_and_counted(tmp_path, monkeypatch, caplog):
    folder = write_folder(tmp_path / "data", [(12, 12)] * 6 + [(30, 30)], classes=1)
    (folder / "class0" / "img100.jpg").write_bytes(b"not an image at all")
    good = (folder / "class0" / "img000.jpg").read_bytes()
    (folder / "class0" / "img101.jpg").write_bytes(good[: len(good) // 3])  # truncated
    monkeypatch.setenv("SELFSUP_MAX_IMAGE_PIXELS", "500")  # the 30 x 30 image is over it, by its header
    stream = open_folder_stream(str(folder))
    assert len(stream) == 9 and stream.skipped == 0  # listing opens no file
    for epoch in range(2):  # each bad file is counted once, however often it is met
        loader = StreamLoader(stream, 3, seed=0, workers=1, drop_last=False)
        loader.set_epoch(epoch)
        got = batches(loader)
        loader.close()
        assert [len(b["index"]) for b in got] == [3, 3, 3]  # batches keep their size
        assert all(b["images"].shape[-2:] == (12, 12) for b in got)
    assert stream.skipped == 3
    assert stream.skip_reasons == {UNREADABLE: 2, TOO_MANY_PIXELS: 1}
    assert any("img100.jpg" in path for path in stream.skipped_examples)
    assert "img100.jpg" in caplog.text


def test_ctrl_c_reaches_the_trainer_not_the_workers(tmp_path):
    """Ctrl-C goes to the whole process group; the trainer stops after its step, so the workers must
    live on to deliver the batches it still asks for."""
    import signal
    import time

    folder = write_folder(tmp_path / "data", [(12, 12)] * 40)  # more batches than the worker prefetches
    loader = StreamLoader(open_folder_stream(str(folder)), 2, workers=1)
    it = iter(loader)
    next(it)
    workers = [int(pid) for task in Path("/proc/self/task").iterdir()
               for pid in (task / "children").read_text().split()]
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert len(list(it)) == 19
    loader.close()


def test_listing_uses_the_folder_walker_that_stops_at_link_loops(tmp_path):
    from selfsup.data.datasets import LINK_ALREADY_READ

    folder = write_folder(tmp_path / "data", [(12, 12)] * 4, classes=2)
    (folder / "class0" / "loop").symlink_to(folder, target_is_directory=True)
    stream = open_folder_stream(str(folder))
    assert len(stream) == 4 and stream.skip_reasons == {LINK_ALREADY_READ: 1}


def test_a_folder_of_unreadable_files_is_one_clear_error(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="could be decoded"):
        batches(StreamLoader(open_folder_stream(str(folder)), 2, workers=0))


# ----------------------------------------------------------------------------------- data.mode


def test_auto_keeps_the_embedded_data_in_memory_and_streams_over_the_budget(tmp_path):
    embedded = open_data("embedded", "train", mode="auto")
    assert embedded.mode == "memory" and "auto" in embedded.note
    folder = write_folder(tmp_path / "data", [(24, 32)] * 6)
    small = open_data(str(folder), "train", mode="auto")
    assert small.mode == "memory" and "cuts the borders" in small.note
    tiny = open_data(str(folder), "train", mode="auto", memory_budget_gib=1e-9)
    assert tiny.mode == "stream" and isinstance(tiny.dataset, FolderStream) and "over the" in tiny.note


def test_modes_that_cannot_apply_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="built-in dataset"):
        open_data("embedded", "train", mode="stream")
    with pytest.raises(ConfigError, match="built-in dataset"):
        open_data("embedded", "train", mode="shards")
    from selfsup.config import load_config

    with pytest.raises(ConfigError, match="data.mode"):
        load_config(None, ["data.mode=tar"])


def test_cli_first_lines_say_which_mode_and_why(tmp_path, capsys):
    from conftest import TINY

    from selfsup.cli import main

    rc = main(["pretrain", *TINY, f"trainer.out_dir={tmp_path}", "trainer.run_name=r", "trainer.max_steps=1",
               "eval.final_knn=false"])
    assert rc == 0
    lines = capsys.readouterr().err.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("selfsup "))
    assert "samples in memory" in lines[first]
    assert lines[first + 1].startswith("data: memory (auto: built-in datasets are held in memory)")


# ----------------------------------------------------------------------------------- the trainer


def test_trainer_streams_resumes_exactly_and_reports_data_wait(tmp_path):
    from conftest import TINY, resume_matches_straight

    from selfsup.config import load_config

    folder = write_folder(tmp_path / "data", SIZES * 6)  # 36 images of 6 sizes: padded batches
    cfg = load_config(None, [*TINY, f"data.source={folder}", "data.mode=stream", "data.workers=1", "backbone.width=8",
                             "data.batch_size=8", "trainer.epochs=1"])
    mid, _ = resume_matches_straight(cfg, tmp_path, until_step=2)
    assert mid["position"] == {"step": 2, "epoch": 0, "batch": 2}

    from selfsup.train.trainer import Trainer

    trainer = Trainer(cfg, run_dir=tmp_path / "summary")
    assert trainer.data_mode == "stream" and "1 loader worker(s)" in trainer.data_note
    summary = trainer.fit()
    assert summary["data"]["mode"] == "stream" and summary["position"]["step"] == 4
    share = summary["timings"]["data_wait"]
    assert share is not None and 0.0 <= share <= 1.0
    json.dumps(summary, default=str)


def test_data_wait_share_and_advice():
    from selfsup.train.logging import DataWait

    wait = DataWait()
    for _ in range(DataWait.WARMUP):
        wait.add(10.0, 0.0)  # start-up waits are left out
    for _ in range(DataWait.SETTLE):
        wait.add(0.05, 0.95)
    assert wait.share == pytest.approx(0.05)
    assert wait.advice("stream", 3) is None  # under 10%
    for _ in range(DataWait.SETTLE):
        wait.add(0.45, 0.55)
    assert wait.share == pytest.approx(0.25)
    advice = wait.advice("stream", 3)
    assert "bottleneck" in advice and "data.workers (now 3)" in advice and "data.mode=memory" in advice
    assert wait.advice("stream", 3) is None  # said once


@pytest.mark.parametrize(("mode", "says"), [("iterable", "num_workers"), ("dataset", "__getitem__"),
                                            ("shards", "data.workers (now 2)"), ("memory", "other processes")])
def test_data_wait_advice_names_what_to_change_for_each_source(mode, says):
    from selfsup.train.logging import DataWait

    wait = DataWait()
    for _ in range(DataWait.WARMUP + DataWait.SETTLE):
        wait.add(0.5, 0.5)
    assert says in wait.advice(mode, 2)
