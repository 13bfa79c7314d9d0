"""Video data: writing and reading clips with PyAV (frame counts, strides, offsets, centred clips, the stride that
fits a short video), frame folders, the stream's substitution and counting of unreadable and too-short videos,
labels from class folders and manifests, which sources are claimed as video, the embedded moving-CIFAR set
(determinism, balance, exact motion), and the NASA clip in ../shared when it is there."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from selfsup.data.loader import StreamLoader
from selfsup.data.video import (
    DIRECTIONS,
    EMBEDDED_VIDEO,
    SPEED_NAMES,
    VideoClips,
    VideoStream,
    _build_moving_clips,
    check_decoder,
    clip_indices,
    describe,
    frame_count,
    frame_files,
    is_video_source,
    make_moving_clips,
    open_video,
    read_clip,
    torchcodec_available,
    write_video,
)
from selfsup.errors import ConfigError, DataError

NASA = Path(__file__).resolve().parents[2] / "shared/data/video/nasa_13013.mp4"
FRAMES, HEIGHT, WIDTH, SIDE = 20, 48, 64, 8


def square_frames(count: int = FRAMES) -> np.ndarray:
    """(count, 48, 64, 3) uint8: a bright 8 x 8 square on a dark ground, one pixel down and right per frame."""
    frames = np.full((count, HEIGHT, WIDTH, 3), 20, dtype=np.uint8)
    for i in range(count):
        frames[i, 8 + i : 8 + i + SIDE, 12 + i : 12 + i + SIDE] = 235
    return frames


def square_centre(i: int) -> tuple[float, float]:
    """(y, x) of the square's centre in frame ``i`` of the full-size video."""
    return 8 + i + (SIDE - 1) / 2, 12 + i + (SIDE - 1) / 2


def centroid(frame: torch.Tensor) -> tuple[float, float]:
    """(y, x) of the bright pixels of one (3, H, W) uint8 frame."""
    ys, xs = torch.nonzero(frame.float().mean(0) > 128, as_tuple=True)
    return ys.float().mean().item(), xs.float().mean().item()


def assert_square_at(clip: torch.Tensor, indices: list[int], size: int) -> None:
    """Each frame of a clip read at ``size`` shows the square where frame ``indices[k]`` had it (lossy codec:
    within 0.75 pixel), after the resize of the shorter side (48 -> size) and the centre crop of the width."""
    scale = size / HEIGHT
    left = round((WIDTH * scale - size) / 2)
    assert clip.shape == (len(indices), 3, size, size) and clip.dtype == torch.uint8
    for frame, i in zip(clip, indices):
        y, x = square_centre(i)
        got = centroid(frame)
        assert abs(got[0] - ((y + 0.5) * scale - 0.5)) < 0.75
        assert abs(got[1] - ((x + 0.5) * scale - 0.5 - left)) < 0.75


@pytest.fixture(scope="module")
def square_video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "square.mp4", square_frames())


@pytest.fixture(scope="module")
def short_video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "short.mp4", square_frames(5))


# ----------------------------------------------------------------------------------- reading files


def test_written_video_reads_back(square_video, tmp_path):
    assert frame_count(square_video) == FRAMES
    assert_square_at(read_clip(square_video, 5, 4, 0, 48), [0, 4, 8, 12, 16], 48)
    assert_square_at(read_clip(square_video, 3, 2, 7, 24), [7, 9, 11], 24)  # downscaled by 2
    frames = torch.from_numpy(square_frames(6)[:, :47, :63]).permute(0, 3, 1, 2)  # a tensor, odd sides
    odd = write_video(tmp_path / "odd.mkv", frames, fps=25)
    assert frame_count(odd) == 6  # a Matroska header has no count: the packets are counted
    assert read_clip(odd, 6, 1, 0, 16).shape == (6, 3, 16, 16)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "bad.mp4", np.zeros((2, 8, 8, 3), dtype=np.float32))


def test_strides_offsets_and_centred_clips(square_video):
    assert clip_indices(20, 4, 3, None) == [5, 8, 11, 14]  # a span of 10 frames, centred
    assert clip_indices(20, 4, 3, 10) == [10, 13, 16, 19]
    assert clip_indices(20, 8, 4, None) == [2, 4, 6, 8, 10, 12, 14, 16]  # 29 frames do not fit: stride 2 does
    assert clip_indices(20, 20, 3, None) == list(range(20))
    assert clip_indices(20, 1, 5, None) == [9]
    torch.manual_seed(0)
    starts = {clip_indices(20, 4, 3, "random")[0] for _ in range(200)}
    assert starts == set(range(11))  # uniform over every start that fits
    assert_square_at(read_clip(square_video, 4, 3, None, 48), [5, 8, 11, 14], 48)
    assert_square_at(read_clip(square_video, 8, 4, None, 48), [2, 4, 6, 8, 10, 12, 14, 16], 48)
    with pytest.raises(DataError, match="offset 11"):
        read_clip(square_video, 4, 3, 11, 48)
    with pytest.raises(DataError, match="too short"):
        read_clip(square_video, 21, 1, None, 48)
    with pytest.raises(ConfigError, match="data.frame_stride"):
        read_clip(square_video, 4, 0, None, 48)


def test_unreadable_and_too_short_videos_are_replaced_and_counted(square_video, short_video, tmp_path):
    root = tmp_path / "clips"
    for name in ("train/up/a.mp4", "train/up/b.mp4", "train/down/c.mp4", "test/up/d.mp4", "test/down/e.mp4"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(square_video, root / name)
    shutil.copy(short_video, root / "train/down/short.mp4")
    (root / "train/down/bad.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    assert is_video_source(str(root))
    stream = open_video(str(root), "train", frames=8, stride=2, size=32)
    assert isinstance(stream, VideoStream) and len(stream) == 5 and stream.skipped == 0  # listing opens no file
    assert stream.classes == ["down", "up"] and stream.has_labels
    assert stream.labels.tolist() == [0, 0, 0, 1, 1]  # bad, c, short (down); a, b (up)
    for epoch in range(2):  # each bad video is counted once, however often it is met
        loader = StreamLoader(stream, 5, shuffle=False, drop_last=False, workers=1 if epoch == 0 else 0)
        (batch,) = list(loader)
        loader.close()
        assert batch["video"].shape == (5, 8, 3, 32, 32) and batch["video"].dtype == torch.uint8
        assert batch["labels"].dtype == torch.int64 and batch["index"].tolist() == [1, 1, 3, 3, 4]
    assert stream.skipped == 2 and stream.skip_reasons == {"unreadable": 1, "too short": 1}
    assert any("bad.mp4" in path for path in stream.skipped_examples)
    assert "skipped 1 too short, 1 unreadable" in describe(stream)

    test = open_video(str(root), "test", frames=8, stride=2, size=32, evaluation=True)
    assert len(test) == 2 and test.classes == ["down", "up"]
    first, again = test[0], test[0]
    assert torch.equal(first["video"], again["video"])  # evaluation clips are centred
    assert_square_at(first["video"], [2, 4, 6, 8, 10, 12, 14, 16], 32)  # 20 frames: stride 2 fits
    assert test.fingerprint != stream.fingerprint
    assert test.subset(torch.tensor([1]), "one").path(0).endswith("test/up/d.mp4")
    with pytest.raises(DataError, match="no videos in the val split"):
        open_video(str(root), "val", frames=8, stride=2, size=32)


def test_manifest_labels_and_splits(square_video, tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    for name in "abcd":
        shutil.copy(square_video, root / f"{name}.mp4")
    (root / "labels.csv").write_text("file,label,split,camera\na.mp4,cat,train,x\nb.mp4,dog,train,y\n"
                                     "c.mp4,cat,test,x\n")
    train = open_video(str(root), "train", frames=4, stride=1, size=16)
    assert train.classes == ["cat", "dog"] and train.labels.tolist() == [0, 1]
    assert train.skip_reasons == {"not in the manifest": 1}
    test = open_video(str(root), "test", frames=4, stride=1, size=16)
    assert len(test) == 1 and test.classes == ["cat", "dog"] and test.labels.tolist() == [0]
    by_camera = open_video(str(root), "train", frames=4, stride=1, size=16, label_column="camera")
    assert by_camera.classes == ["x", "y"]
    with pytest.raises(ConfigError, match="not a column"):
        open_video(str(root), "train", frames=4, stride=1, size=16, label_column="speaker")


def test_frame_folders(tmp_path):
    root = tmp_path / "frames"
    frames = torch.from_numpy(square_frames(12)).permute(0, 3, 1, 2)
    for clip in ("walk/clip_a", "walk/clip_b", "run/clip_c"):
        (root / clip).mkdir(parents=True)
        for i, frame in enumerate(frames):
            write_png(frame, str(root / clip / f"frame_{i + 1}.png"))  # frame_10 sorts after frame_9
    assert frame_files(root / "walk/clip_a")[:3] == ["frame_1.png", "frame_2.png", "frame_3.png"]
    assert frame_count(root / "walk/clip_a") == 12
    assert_square_at(read_clip(root / "walk/clip_a", 4, 3, 0, 48), [0, 3, 6, 9], 48)  # lossless: exact
    assert not is_video_source(str(root))  # frame folders alone look like an image folder: not claimed
    (root / "videos.csv").write_text("folder,label\nwalk/clip_a/,walk\nwalk/clip_b,walk\nrun/clip_c,run\n")
    assert is_video_source(str(root))  # a manifest that names folders claims them
    stream = open_video(str(root), "train", frames=4, stride=3, size=24, evaluation=True)
    test = open_video(str(root), "test", frames=4, stride=3, size=24)
    assert len(stream) + len(test) == 3 and stream.classes == ["run", "walk"]  # no split column: hashed fifth
    assert "by name hash" in describe(stream)
    assert_square_at(stream[0]["video"], [1, 4, 7, 10], 24)  # 12 frames, a span of 10, centred


def test_which_sources_are_video(square_video, tmp_path):
    assert is_video_source(EMBEDDED_VIDEO) and is_video_source(f" {EMBEDDED_VIDEO.upper()} ")
    assert is_video_source(str(square_video))
    deep = tmp_path / "deep/a/b"
    deep.mkdir(parents=True)
    shutil.copy(square_video, deep / "clip.MOV")
    assert is_video_source(str(tmp_path / "deep"))
    images = tmp_path / "images"
    for cls in ("cat", "dog"):
        (images / cls).mkdir(parents=True)
        for i in range(3):
            write_png(torch.full((3, 8, 8), 40 * i, dtype=torch.uint8), str(images / cls / f"{i}.png"))
    assert not is_video_source(str(images))  # an image folder of class folders stays images
    (tmp_path / "notes.txt").write_text("x")
    assert not is_video_source(str(tmp_path / "notes.txt")) and not is_video_source(str(tmp_path / "missing"))
    single = open_video(str(square_video), "test", frames=4, stride=2, size=16)
    assert len(single) == 1 and not single.has_labels and single[0]["labels"].item() == -1
    with pytest.raises(DataError, match="no such"):
        open_video(str(tmp_path / "missing"), "train", frames=4, stride=2, size=16)


def test_decoder_choice():
    assert check_decoder("PyAV") == "pyav"
    with pytest.raises(ConfigError, match="use one of"):
        check_decoder("opencv")
    if torchcodec_available():  # the reason it cannot load; empty where it can
        with pytest.raises(ConfigError, match="torchcodec cannot be used"):
            check_decoder("torchcodec")
    else:
        assert check_decoder("torchcodec") == "torchcodec"


# ----------------------------------------------------------------------------------- the embedded set


def best_shift(before: torch.Tensor, after: torch.Tensor, reach: int = 2) -> tuple[int, int]:
    """The whole-pixel (dy, dx) that carries the most changed pixels of ``before`` exactly onto ``after``
    (the background is still, so only the moving object's pixels change)."""
    changed = (before != after).any(0)
    scores = {}
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if (dy, dx) != (0, 0):
                moved = torch.roll(before, (dy, dx), dims=(1, 2))
                scores[(dy, dx)] = int(((moved == after).all(0) & changed).sum())
    return max(scores, key=scores.get)


def test_embedded_moving_clips():
    train = make_moving_clips("train")
    assert isinstance(train, VideoClips) and train.video.shape == (2000, 8, 3, 32, 32)
    assert train.video.dtype == torch.uint8 and train.motion.shape == (2000, 7, 2)
    assert train.motion.dtype == torch.float32 and train.classes == list(DIRECTIONS)
    assert torch.bincount(train.labels).tolist() == [250] * 8
    _build_moving_clips.cache_clear()
    again = make_moving_clips("train")
    assert again.video is not train.video and torch.equal(again.video, train.video)  # rebuilt: identical
    assert torch.equal(again.motion, train.motion) and again.fingerprint == train.fingerprint
    other = make_moving_clips("train", seed=1)
    assert not torch.equal(other.video, train.video) and other.fingerprint != train.fingerprint

    test = open_video(EMBEDDED_VIDEO, "test", frames=8, stride=4, size=32)
    assert isinstance(test, VideoClips) and len(test) == 512 and torch.bincount(test.labels).tolist() == [64] * 8
    speed = make_moving_clips("test", label_column="speed")
    assert speed.classes == list(SPEED_NAMES) and torch.bincount(speed.labels).tolist() == [256, 256]
    objects = make_moving_clips("test", label_column="object")
    assert len(objects.classes) == 10 and objects.labels.min() >= 0 and objects.labels.max() < 10
    steps = test.motion[:, 0]  # per-axis pixels a frame: the direction's unit step times the speed
    assert torch.equal(steps.abs().amax(1), speed.labels.float() + 1)
    assert (test.motion == test.motion[:, :1]).all()  # constant velocity
    for clip in range(6):
        for t in range(7):
            motion = tuple(test.motion[clip, t].int().tolist())
            assert best_shift(test.video[clip, t], test.video[clip, t + 1]) == motion

    batch = test.gather(torch.tensor([3, 1]))
    assert set(batch) == {"video", "labels", "index", "motion"} and batch["video"].shape == (2, 8, 3, 32, 32)
    assert torch.equal(batch["motion"], test.motion[[3, 1]]) and batch["labels"].dtype == torch.int64
    small = test.subset(torch.arange(16), "small")
    assert len(small) == 16 and small.skipped == 0 and small.skip_reasons == {} and small.skipped_examples == []
    assert describe(test).startswith("512 clips of 8 frames at 32x32 from embedded moving CIFAR (test), 8 classes")
    assert make_moving_clips("test", frames=4, size=16).video.shape == (512, 4, 3, 16, 16)
    with pytest.raises(ConfigError, match="data.frame_size >= 60"):
        make_moving_clips("test", frames=16, size=32)
    with pytest.raises(DataError, match="splits train, test"):
        open_video(EMBEDDED_VIDEO, "val", frames=8, stride=1, size=32)
    with pytest.raises(ConfigError, match="direction, speed, object"):
        make_moving_clips("test", label_column="colour")


# ----------------------------------------------------------------------------------- a real video


def test_nasa_clip():
    if not NASA.is_file():
        pytest.skip(f"{NASA} is not here")
    assert frame_count(NASA) == 325
    clip = read_clip(NASA, 16, 4, None, 112)
    assert clip.shape == (16, 3, 112, 112) and clip.dtype == torch.uint8 and clip.float().std() > 5
    stream = open_video(str(NASA), "train", frames=16, stride=4, size=112)
    sample = stream[0]
    assert sample["video"].shape == (16, 3, 112, 112) and stream.skipped == 0
