"""The sharded source (data/shards.py) and ``selfsup data shard``.

Folders of real JPEG and PNG files written as WebDataset shards: the shards are standard tars that
webdataset itself reads; they give the folder's samples in the folder's order; shards from other
tools (no index) are indexed from their headers; an epoch is shuffled shard by shard and resumes
exactly mid-epoch; two gloo ranks get disjoint equal shares of an uneven shard set; a corrupt
member is replaced and counted; an interrupted write leaves nothing; the trainer picks shards by
itself and resumes exactly."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_streaming import SIZES, _free_port, _rank_worker, batches, write_folder

from selfsup.data.datasets import UNREADABLE
from selfsup.data.loader import StreamLoader
from selfsup.data.modes import open_data
from selfsup.data.shards import (
    BAD_SHARD,
    INDEX_NAME,
    SHUFFLE_SHARDS,
    ShardIndex,
    index_tars,
    open_shards,
    write_shards,
)
from selfsup.data.sources import open_folder_stream
from selfsup.errors import ConfigError, DataError


def shard(folder: Path, out: Path, per_shard: int = 4, **kwargs) -> Path:
    write_shards(str(folder), out, max_samples=per_shard, progress=False, **kwargs)
    return out


def test_shards_are_webdataset_tars_that_webdataset_reads(tmp_path):
    import webdataset as wds

    folder = write_folder(tmp_path / "data", [(10, 12)] * 7, classes=3)
    out = shard(folder, tmp_path / "shards", per_shard=3)
    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not list(out.glob(".*"))  # no temporary file left
    files = open_folder_stream(str(folder)).paths()
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False))
    assert len(samples) == 7
    for sample, file, label in zip(samples, files, open_folder_stream(str(folder)).labels.tolist()):
        ext = Path(file).suffix.lstrip(".")
        assert sample[ext] == Path(file).read_bytes()  # the bytes as stored, not re-encoded
        assert int(sample["cls"]) == label


@pytest.mark.parametrize("workers", [0, 1])
def test_shards_give_the_folders_samples_in_its_order(tmp_path, workers):
    folder = write_folder(tmp_path / "data", SIZES * 2, classes=2)
    out = shard(folder, tmp_path / "shards", per_shard=5)
    stream, shards = open_folder_stream(str(folder)), open_shards(str(out))
    assert len(shards) == len(stream) == 12 and shards.classes == stream.classes and shards.has_labels
    want = batches(StreamLoader(stream, 4, shuffle=False, workers=0))
    got_loader = StreamLoader(shards, 4, shuffle=False, workers=workers)
    got = batches(got_loader)
    got_loader.close()
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_shards_without_an_index_are_indexed_from_their_headers(tmp_path):
    folder = write_folder(tmp_path / "data", [(8, 8)] * 9, classes=3)
    out = shard(folder, tmp_path / "shards")
    written = ShardIndex.load(out / INDEX_NAME)
    (out / INDEX_NAME).unlink()  # what another tool's shards look like
    rebuilt = open_shards(str(out)).index
    for name in ("shard", "offset", "size", "label", "key"):
        assert np.array_equal(getattr(rebuilt, name), getattr(written, name)), name
    assert rebuilt.shards == written.shards
    assert rebuilt.classes == ["0", "1", "2"]  # class numbers only: names live in the index


def test_an_epoch_is_shuffled_shard_by_shard_and_resumes_exactly(tmp_path):
    folder = write_folder(tmp_path / "data", [(8, 8)] * 40, classes=2)
    shards = open_shards(str(shard(folder, tmp_path / "shards", per_shard=4)))  # 10 shards
    loader = StreamLoader(shards, 4, seed=3, workers=0)
    loader.set_epoch(2)
    order = loader.indices()
    assert sorted(order.tolist()) == list(range(40)) and order.tolist() != list(range(40))
    group = 4 * SHUFFLE_SHARDS
    for start in range(0, 40, group):  # each group of SHUFFLE_SHARDS shards is visited whole before the next
        assert len({int(shards.index.shard[i]) for i in order[start : start + group]}) <= SHUFFLE_SHARDS
    straight = batches(loader)
    assert len(straight) == 10
    resumed = StreamLoader(shards, 4, seed=3, workers=1)  # another worker count: the same batches
    resumed.set_epoch(2)
    resumed.set_start_batch(6)
    rest = batches(resumed)
    resumed.close()
    assert len(rest) == 4
    for a, b in zip(rest, straight[6:]):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_two_gloo_ranks_get_disjoint_equal_shares_of_an_uneven_shard_set(tmp_path):
    # 15 samples in 3 shards (6, 6, 3): shards do not divide over 2 ranks, samples are shared out instead
    folder = write_folder(tmp_path / "data", [(8, 8)] * 15)
    out = shard(folder, tmp_path / "shards", per_shard=6)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_worker, args=(2, _free_port(), str(out), results, True), nprocs=2, join=True)
        results = dict(results)
    (len0, seen0), (len1, seen1) = results[0], results[1]
    assert len0 == len1 == len(seen0) == len(seen1) == 3
    flat0, flat1 = [i for b in seen0 for i in b], [i for b in seen1 for i in b]
    assert len(flat0) == len(flat1) == 6 and not set(flat0) & set(flat1)


def test_a_corrupt_member_is_replaced_and_counted(tmp_path, caplog):
    folder = write_folder(tmp_path / "data", [(12, 12)] * 9, classes=1)
    out = shard(folder, tmp_path / "shards", per_shard=5)
    index = ShardIndex.load(out / INDEX_NAME)
    with open(out / index.shards[int(index.shard[3])], "r+b") as handle:  # garbage over sample 3's image
        handle.seek(int(index.offset[3]))
        handle.write(b"\x00" * int(index.size[3]))
    shards = open_shards(str(out))
    for epoch in range(2):
        loader = StreamLoader(shards, 3, seed=0, workers=1)
        loader.set_epoch(epoch)
        got = batches(loader)
        loader.close()
        assert [len(b["index"]) for b in got] == [3, 3, 3] and 3 not in torch.cat([b["index"] for b in got])
    assert shards.skipped == 1 and shards.skip_reasons == {UNREADABLE: 1}
    assert "shard-000000.tar:000000003" in caplog.text


def test_damaged_shards_are_clear_errors_or_counted(tmp_path, caplog):
    folder = write_folder(tmp_path / "data", [(8, 8)] * 8)
    out = shard(folder, tmp_path / "shards")
    tar = out / "shard-000001.tar"
    header_of_sample_5 = int(ShardIndex.load(out / INDEX_NAME).offset[5]) - 512
    tar.write_bytes(tar.read_bytes()[: header_of_sample_5 + 100])  # cut inside the second sample's header
    with pytest.raises(DataError, match="index no longer matches"):
        open_shards(str(out))
    (out / INDEX_NAME).unlink()
    index = index_tars(sorted(out.glob("*.tar")), progress=False)
    assert len(index) == 5 and index.skips.counts[BAD_SHARD] == 1  # 4 + the sample before the cut
    (out / "shard-000000.tar").rename(out / "x.tar.gz")
    tar.unlink()
    with pytest.raises(DataError, match="compressed shards"):
        open_shards(str(out))


def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import webdataset

    folder = write_folder(tmp_path / "data", [(8, 8)] * 9)
    calls = {"n": 0}
    original = webdataset.TarWriter.write

    def write(self, sample):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(self, sample)

    monkeypatch.setattr(webdataset.TarWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        shard(folder, tmp_path / "shards", per_shard=3)
    assert list((tmp_path / "shards").iterdir()) == []
    monkeypatch.undo()
    shard(folder, tmp_path / "shards", per_shard=3)
    with pytest.raises(DataError, match="already holds shards"):
        shard(folder, tmp_path / "shards")


def test_modes_choose_shards_and_refuse_what_cannot_read_them(tmp_path):
    folder = write_folder(tmp_path / "data", [(8, 8)] * 6)
    out = shard(folder, tmp_path / "set" / "train")
    opened = open_data(str(tmp_path / "set"), "train")  # the parent of per-split shard folders
    assert opened.mode == "shards" and opened.note.startswith("shards (auto: ")
    with pytest.raises(ConfigError, match="holds shards"):
        open_data(str(out), "train", mode="stream")
    with pytest.raises(DataError, match="no shards"):
        open_data(str(folder), "train", mode="shards")


def test_cli_writes_shards_and_pretrains_from_them_with_exact_resume(tmp_path, capsys):
    from conftest import TINY, resume_matches_straight

    from selfsup.cli import main
    from selfsup.config import load_config

    folder = write_folder(tmp_path / "data", SIZES * 6)
    out = tmp_path / "shards"
    assert main(["data", "shard", str(folder), str(out), "--shard-samples", "10"]) == 0
    printed = capsys.readouterr().out
    assert "36" in printed and "4 in" in printed
    assert main(["data", "shard", str(folder), str(out)]) == 2
    assert "already holds shards" in capsys.readouterr().err

    cfg = load_config(None, [*TINY, f"data.source={out}", "data.workers=1", "backbone.width=8",
                             "data.batch_size=8", "trainer.epochs=1"])
    mid, _ = resume_matches_straight(cfg, tmp_path, until_step=2)
    assert mid["position"] == {"step": 2, "epoch": 0, "batch": 2}
    rc = main(["pretrain", *TINY, f"data.source={out}", "data.workers=0", "backbone.width=8", "data.batch_size=8",
               f"trainer.out_dir={tmp_path}", "trainer.run_name=cli", "trainer.max_steps=1", "eval.final_knn=false"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "samples from shards" in err and "data: shards (auto: " in err


def test_every_member_of_a_written_shard_is_where_the_index_says(tmp_path):
    folder = write_folder(tmp_path / "data", [(8, 8)] * 5)
    out = shard(folder, tmp_path / "shards", per_shard=10)
    index = ShardIndex.load(out / INDEX_NAME)
    with tarfile.open(out / "shard-000000.tar") as tar:
        images = [m for m in tar if not m.name.endswith(".cls")]
        assert [m.offset_data for m in images] == index.offset.tolist()
        assert [m.size for m in images] == index.size.tolist()
