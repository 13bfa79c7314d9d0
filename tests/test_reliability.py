"""Runs, evaluations and reports under hostile conditions: changed data, reused run names, full
disks, special files as targets, bad arguments, kill -9, and checkpoints that carry code."""

import csv
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

import selfsup.checkpoint as ckpt_mod
from selfsup.checkpoint import (
    load_checkpoint,
    remove_stale_temp_files,
    save_atomic,
    write_text_atomic,
)
from selfsup.cli import main
from selfsup.config import load_config
from selfsup.errors import ConfigError, WriteError
from selfsup.train.runtime import make_run_dir
from selfsup.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
# TINY at half the batch: 4 steps an epoch, each half the work
RUN = [*TINY, "data.limit=32", "data.batch_size=8", "eval.final_knn=false", "trainer.log_every=1",
       "eval.online_every=0"]


def one_error_line(capsys) -> str:
    """The one ``selfsup: error:`` line on stderr (pretrain prints its banner before), and no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("selfsup: error: ")]
    assert len(errors) == 1 and "Traceback" not in err and err.rstrip().endswith(errors[0]), err
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step tiny SimCLR run (one epoch of 32 images), made once for the tests that only read it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    Trainer(load_config(None, [*RUN, "trainer.epochs=1"]), run_dir=run).fit()
    return run


def steps_logged(run: Path) -> list[int]:
    with (run / "metrics.csv").open(newline="") as fh:
        return [int(row["step"]) for row in csv.DictReader(fh) if row["loss"]]


# --------------------------------------------------------------------------------------
# evaluation follows the data, not a stale cache


def write_folder(root: Path, classes: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_eval_cache_follows_the_data_folder(trained, tmp_path, capsys):
    data, out = tmp_path / "pets", tmp_path / "knn.json"
    write_folder(data, {"cat": 6, "dog": 6})
    args = ["eval", "knn", "--checkpoint", str(trained), "--data", str(data), "--out", str(out)]
    assert main(args) == 0
    assert json.loads(out.read_text())["test_samples"] == 12

    for i in range(3):  # delete some images, add a class
        (data / "cat" / f"{i}.png").unlink()
    write_folder(data, {"bird": 5}, seed=1)
    assert main(args) == 0
    assert json.loads(out.read_text())["test_samples"] == 14

    # same names, same sizes, other pixels: still not answered from the cache
    entries = len(list((trained / "features").glob("*.pt")))
    write_folder(data, {"bird": 5}, seed=2)
    assert main(args) == 0
    assert len(list((trained / "features").glob("*.pt"))) > entries
    # and the same data again is a cache hit (no new entry)
    entries = len(list((trained / "features").glob("*.pt")))
    assert main(args) == 0
    assert len(list((trained / "features").glob("*.pt"))) == entries
    capsys.readouterr()


# --------------------------------------------------------------------------------------
# a new run never writes into an existing one


def test_named_run_refuses_an_existing_run_directory(tmp_path, capsys):
    args = ["pretrain", *RUN, "trainer.max_steps=2", f"trainer.out_dir={tmp_path}", "trainer.run_name=r"]
    assert main(args) == 0
    run = tmp_path / "r"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(args) == 2
    err = one_error_line(capsys)
    assert "already holds a run" in err and f"--resume {run}" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    cfg = load_config(None, [*RUN, "trainer.max_steps=2"])
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(cfg, run_dir=run)
    # an empty folder, or one with unrelated files, may take a run
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    assert Trainer(cfg, run_dir=tmp_path / "empty").run_dir == tmp_path / "empty"
    # --resume continues the run in its folder
    assert main(["pretrain", "--resume", str(run), "trainer.max_steps=3"]) == 0
    assert load_checkpoint(run)["position"]["step"] == 3


def test_default_run_names_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    import selfsup.train.runtime as trainer_mod

    class FrozenClock:  # every run starts in the same second
        @staticmethod
        def now():
            import datetime

            return datetime.datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(trainer_mod, "datetime", FrozenClock)
    cfg = load_config(None, [*RUN, f"trainer.out_dir={tmp_path}"])
    dirs = [make_run_dir(cfg) for _ in range(3)]
    assert [d.name for d in dirs] == ["simclr-20260102-030405", "simclr-20260102-030405-2",
                                      "simclr-20260102-030405-3"]
    assert all(d.is_dir() for d in dirs)


def test_failed_start_leaves_no_run_directory(tmp_path, capsys):
    assert main(["pretrain", *RUN, f"trainer.out_dir={tmp_path}", "data.batch_size=4096"]) == 2
    one_error_line(capsys)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------
# kill -9: the checkpoint always loads, the resume logs each step once


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path):
    cfg = load_config(None, [*RUN, "trainer.epochs=2", "trainer.max_steps=6"])
    run = tmp_path / "run"
    trainer = Trainer(cfg, run_dir=run)
    trainer.fit(until_step=3)
    at_3 = load_checkpoint(run)
    trainer.fit()  # logs steps 4..6; then the run "dies" and is resumed from the checkpoint at step 3
    with (run / "metrics.csv").open("a") as fh:
        fh.write("7,1,2.2")  # and a row cut short by the kill
    first = metric_rows(run)
    Trainer(cfg, run_dir=run, resume=at_3).fit()

    again = metric_rows(run)
    assert [r["step"] for r in again] == ["1", "2", "3", "4", "5", "6"]
    # rows 1-3 kept, 4-6 logged again by the resumed run, which trained exactly what the first did
    assert [r["loss"] for r in again] == [r["loss"] for r in first[:6]]


def metric_rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_stale_temp_files_are_removed_at_start_live_ones_kept(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = run / f".last.ckpt.{dead.pid}-abc123.tmp"
    legacy = run / ".summary.json.tmp"  # the name the old writer used, without a pid
    live = run / f".last.ckpt.{os.getppid()}-xyz789.tmp"
    for p in (orphan, legacy, live):
        p.write_bytes(b"half a checkpoint")
    cfg = load_config(None, [*RUN, "trainer.epochs=2"])
    Trainer(cfg, run_dir=run, resume=load_checkpoint(run)).fit(until_step=5)
    assert not orphan.exists() and not legacy.exists() and live.exists()
    assert remove_stale_temp_files(run) == []  # the run's own writes left nothing behind


def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint_and_a_clean_log(tmp_path):
    """The real thing: ``selfsup pretrain`` in a subprocess, SIGKILLed twice (mid-epoch, after
    rows past its checkpoint were logged; then during the next checkpoint's write when the poll
    catches one) and resumed each time: three starts of a few steps each."""
    run = tmp_path / "k"
    base = [sys.executable, "-m", "selfsup", "pretrain"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def start(args):
        return subprocess.Popen([*base, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def kill_when(proc, ready, timeout=120):
        deadline = time.monotonic() + timeout
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def logged_up_to(step):
        def ready():
            try:
                return any(s >= step for s in steps_logged(run))
            except (OSError, ValueError, TypeError):  # not there yet, or a row being written
                return False
        return ready

    def saving():  # a checkpoint write under way while an earlier checkpoint exists
        return (run / "last.ckpt").exists() and any(run.glob(".*.tmp"))

    first = start([*RUN, "trainer.epochs=3", "trainer.ckpt_every=1", f"trainer.out_dir={tmp_path}",
                   "trainer.run_name=k"])
    kill_when(first, logged_up_to(6))  # mid-epoch 2: steps 5, 6 were logged after the checkpoint at 4
    assert load_checkpoint(run)["position"]["step"] == 4
    second = start(["--resume", str(run)])
    kill_when(second, lambda: saving() or logged_up_to(10)())  # mid-save at step 8 when the poll catches it
    assert load_checkpoint(run)["position"]["step"] in (4, 8)
    third = subprocess.run([*base, "--resume", str(run)], env=env, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr
    assert load_checkpoint(run)["position"]["step"] == 12
    assert steps_logged(run) == list(range(1, 13))
    assert not list(run.glob(".*.tmp"))


# --------------------------------------------------------------------------------------
# full disks: one line, nothing half-written


class _Quota:
    """A file that takes ``budget[0]`` more bytes, then fails as a full disk does."""

    def __init__(self, fh, budget):
        self.fh, self.budget = fh, budget

    def write(self, data):
        if len(data) > self.budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget[0] -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """``make(free)``: a folder where about ``free`` more bytes fit. A real tmpfs when this process
    may mount one (root); elsewhere the atomic writer's files are given that budget instead."""
    mounted = []

    def make(free: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        ok = shutil.which("mount") and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True).returncode == 0
        if ok:
            mounted.append(folder)
            filler = shutil.disk_usage(folder).free - free
            (folder / ".filler").write_bytes(b"\0" * max(filler, 0))
        else:
            budget = [free]
            real = os.fdopen
            monkeypatch.setattr(ckpt_mod.os, "fdopen", lambda fd, *a, **k: _Quota(real(fd, *a, **k), budget))
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_full_disk_mid_run_is_one_line_and_keeps_the_checkpoint(trained, small_disk, capsys):
    disk = small_disk(128 * 1024)  # room for config.yaml and metrics, not for a checkpoint
    run = disk / "run"
    assert main(["pretrain", *RUN, "trainer.epochs=1", f"trainer.out_dir={disk}", "trainer.run_name=run"]) == 2
    err = one_error_line(capsys)
    assert f"could not write {run / 'last.ckpt'}: no space left on device" in err and "free in" in err
    assert not list(run.glob(".*.tmp")) and not (run / "last.ckpt").exists()
    assert (run / "config.yaml").stat().st_size > 0

    # a checkpoint already there stays whole when the next one does not fit
    path = disk / "kept.ckpt"
    small = {"model": {"w": torch.zeros(8)}, "position": {"step": 1}}
    save_atomic(small, path)
    with pytest.raises(WriteError, match="the previous kept.ckpt is unchanged"):
        save_atomic({**small, "position": {"step": 2}, "pad": torch.zeros(1 << 20)}, path)
    assert torch.load(path, weights_only=True)["position"] == {"step": 1}
    assert not list(disk.glob(".*.tmp"))


def test_full_disk_at_start_leaves_no_empty_config(small_disk, capsys):
    disk = small_disk(0)
    assert main(["pretrain", *RUN, "trainer.epochs=1", f"trainer.out_dir={disk}", "trainer.run_name=run"]) == 2
    err = one_error_line(capsys)
    assert f"could not write {disk / 'run' / 'config.yaml'}: no space left on device" in err
    assert not (disk / "run" / "config.yaml").exists()


def test_full_disk_only_costs_the_feature_cache(trained, small_disk, tmp_path, capsys, caplog):
    disk = small_disk(4096)  # the checkpoint's folder, where features are cached, is full
    (disk / "last.ckpt").symlink_to(trained / "last.ckpt")
    data, out = tmp_path / "pets", tmp_path / "knn.json"
    write_folder(data, {"cat": 6, "dog": 6})
    assert main(["eval", "knn", "--checkpoint", str(disk / "last.ckpt"), "--data", str(data), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["test_samples"] == 12
    assert "features not cached" in caplog.text and "No space left on device" in caplog.text
    assert not [p for p in (disk / "features").iterdir()]
    capsys.readouterr()


def test_full_disk_in_report_leaves_no_empty_pngs(trained, small_disk, capsys):
    disk = small_disk(8 * 1024)
    run = disk / "run"
    run.mkdir()
    shutil.copyfile(trained / "metrics.csv", run / "metrics.csv")
    assert main(["report", str(run)]) == 2
    assert "no space left on device" in one_error_line(capsys)
    assert all(p.stat().st_size > 0 for p in (run / "report").iterdir())
    assert not list((run / "report").glob(".*.tmp"))


# --------------------------------------------------------------------------------------
# special files are not replaced; bad arguments are one line


def test_special_file_targets_are_refused(trained, tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args in (["eval", "knn", "--checkpoint", str(trained), "--out", str(fifo)],
                 ["export", str(trained), str(fifo)],
                 ["eval", "knn", "--checkpoint", str(trained), "--out", str(tmp_path)]):
        assert main(args) == 2
        assert "not a regular file" in one_error_line(capsys)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(WriteError, match="not a regular file"):
        write_text_atomic(fifo, "text")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    # a link to a regular file: the file is replaced, the link stays a link
    target, link = tmp_path / "real.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    write_text_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


@pytest.mark.parametrize("args, says", [
    (["eval", "linear", "--checkpoint", "RUN", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["eval", "finetune", "--checkpoint", "RUN", "--epochs", "-1"], "--epochs must be at least 1, got -1"),
    (["eval", "knn", "--checkpoint", "RUN", "--device", "bogus"], "device 'bogus' is not a device name"),
    (["report", "RUN", "--max-points", "0"], "must be at least 1, got 0"),
    (["report", "RUN", "--device", "bogus"], "device 'bogus' is not a device name"),
    (["report", "RUN", "--data", "/nonexistent/pets"], "--data /nonexistent/pets:"),
])
def test_bad_eval_and_report_arguments_are_one_line(trained, capsys, args, says):
    assert main([str(trained) if a == "RUN" else a for a in args]) == 2
    assert says in one_error_line(capsys)


# --------------------------------------------------------------------------------------
# a checkpoint that carries code runs none of it, through any verb


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls os.mkdir(marker): proof that code ran
        return os.mkdir, (str(self.marker),)


def test_malicious_checkpoint_runs_no_code_through_any_verb(trained, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "evil"
    run.mkdir()
    good = load_checkpoint(trained)
    torch.save({**good, "model": {**good["model"], "x": _Payload(marker)}}, run / "last.ckpt")
    verbs = [["pretrain", "--resume", str(run)], ["eval", "knn", "--checkpoint", str(run)],
             ["export", str(run), str(tmp_path / "enc.safetensors")], ["report", str(run)]]
    for args in verbs:
        rc = main(args)
        assert not marker.exists(), f"{args[0]} ran code from the checkpoint"
        assert rc == (0 if args[0] == "report" else 2), args
    capsys.readouterr()
    assert "checkpoint unavailable" in (run / "report" / "report.html").read_text()


def test_every_torch_load_is_weights_only():
    calls = []
    for path in (ROOT / "src" / "selfsup").rglob("*.py"):
        text = path.read_text()
        start = 0
        while (i := text.find("torch.load(", start)) >= 0:
            depth, j = 0, i + len("torch.load")
            while True:
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
                if depth == 0:
                    break
            calls.append((path.name, text[i:j]))
            start = j
    assert calls, "no torch.load found: the scan is broken"
    assert all("weights_only=True" in call for _, call in calls), [c for c in calls if "weights_only=True" not in c[1]]


def test_atomic_writes_make_files_as_open_does(tmp_path):
    (tmp_path / "plain").write_text("x")  # the umask's mode, as any program here makes files
    save_atomic({"w": torch.zeros(2)}, tmp_path / "last.ckpt")
    write_text_atomic(tmp_path / "summary.json", "{}")
    mode = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    assert [stat.S_IMODE(os.stat(tmp_path / n).st_mode) for n in ("last.ckpt", "summary.json")] == [mode, mode]
