"""Audio: the log-mel front end against a frame-by-frame NumPy computation, resampling, the readers
(FSDD names, manifests, folders, archives, bad files), the time-span masks, Audio-MAE and data2vec
audio, and the CLI (pretrain, resume, probes for digit and speaker, export)."""

import hashlib
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch

from selfsup.config import load_config
from selfsup.data.audio import (
    EMBEDDED_AUDIO,
    EMBEDDED_AUDIO_FILE,
    audio_info,
    is_audio_source,
    layout_of,
    open_audio,
    resample,
)
from selfsup.errors import ConfigError, DataError
from selfsup.nn.spectrogram import LOG_FLOOR, fbank_frames, kaldi_fbank, kaldi_mel_banks
from selfsup.pretext.masking import wav2vec_span_masking

FSDD_SHA256 = "aebfe408075ee3c5136cac8eeecd91e8616c55e71bc5d86f022c3ad6e4834283"  # ../shared/data/audio/fsdd-recordings.tar.gz


def tiny_audio(tmp_path, *extra: str, method: str = "audio_mae") -> list[str]:
    """A tiny run on the embedded spoken digits: half-second clips, 8 x 8 patches of a 32-filter log-mel
    (a 6 x 4 grid), a 32-wide 2-block ViT, batch 8; Audio-MAE's decoder 2 x 32, data2vec's K = 2."""
    own = (["method.decoder_dim=32", "method.decoder_depth=2", "method.decoder_heads=2"] if method == "audio_mae"
           else ["method.top_k=2"])
    return [f"method.name={method}", *own, f"data.source={EMBEDDED_AUDIO}", "data.clip_seconds=0.5", "data.batch_size=8",
            "data.eval_batch_size=512", "backbone.name=audio_vit_tiny", "backbone.patch_size=8", "backbone.n_mels=32",
            "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2", "backbone.pool=mean", "optim.name=adamw",
            "optim.lr=1e-3", "optim.lr_scaling=none", "optim.warmup_epochs=0", "trainer.progress=false",
            "trainer.precision=32", "trainer.device=cpu", f"trainer.out_dir={tmp_path / 'runs'}",
            "eval.final_knn=false", *extra]


def _wav_bytes(wave: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# the spectrogram


def _numpy_fbank(x: np.ndarray, rate: int, n_mels: int) -> np.ndarray:
    """Kaldi's fbank written out frame by frame in float64 (the reference ``kaldi_fbank`` must match)."""
    win, hop = int(rate * 0.025), int(rate * 0.010)
    n_fft = 1
    while n_fft < win:
        n_fft *= 2
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(rate / 2)
    edges = [lo + i * (hi - lo) / (n_mels + 1) for i in range(n_mels + 2)]
    bins = n_fft // 2 + 1
    fb = np.zeros((n_mels, bins))
    for m in range(n_mels):
        left, centre, right = edges[m], edges[m + 1], edges[m + 2]
        for k in range(bins - 1):  # Kaldi gives the Nyquist bin no weight
            z = mel(k * rate / n_fft)
            if left < z < right:
                fb[m, k] = (z - left) / (centre - left) if z <= centre else (right - z) / (right - centre)
    window = np.array([0.5 - 0.5 * math.cos(2 * math.pi * n / (win - 1)) for n in range(win)])
    out = []
    for t in range(1 + (len(x) - win) // hop):
        frame = x[t * hop : t * hop + win].astype(np.float64)
        frame = frame - frame.mean()
        emph = frame.copy()
        emph[1:] -= 0.97 * frame[:-1]
        emph[0] -= 0.97 * frame[0]
        spec = np.abs(np.fft.rfft(emph * window, n=n_fft)) ** 2
        out.append(np.log(np.maximum(fb @ spec, np.finfo(np.float32).eps)))
    return np.array(out)


@pytest.mark.parametrize("rate,n_mels", [(8000, 64), (16000, 128)])
def test_fbank_matches_a_frame_by_frame_numpy_reference(rate, n_mels):
    rng = np.random.default_rng(0)
    t = np.arange(int(0.3 * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    ref = _numpy_fbank(x, rate, n_mels)
    got = kaldi_fbank(torch.from_numpy(x)[None], rate, num_mel_bins=n_mels)[0].double().numpy()
    assert got.shape == ref.shape == (fbank_frames(len(x), rate), n_mels)
    assert np.abs(got - ref).max() < 2e-3  # log energies: float32 against float64
    # the 440 Hz tone lands in the filter whose centre is nearest to it
    centres = [700 * (math.exp(c / 1127) - 1) for c in np.linspace(1127 * math.log1p(20 / 700),
                                                                         1127 * math.log1p(rate / 2 / 700), n_mels + 2)[1:-1]]
    assert abs(centres[int(got.mean(0).argmax())] - 440) < 60


def test_fbank_batches_silence_and_short_input():
    waves = torch.randn(3, 2, 4000)
    batched = kaldi_fbank(waves, 8000, num_mel_bins=32)
    assert batched.shape == (3, 2, 48, 32)
    assert torch.allclose(batched[1, 0], kaldi_fbank(waves[1, 0], 8000, num_mel_bins=32), atol=1e-5)
    silent = kaldi_fbank(torch.zeros(1, 800), 8000, num_mel_bins=16)
    assert torch.allclose(silent, torch.full_like(silent, LOG_FLOOR))
    with pytest.raises(ValueError, match="shorter than one 25.0 ms frame"):
        kaldi_fbank(torch.zeros(1, 100), 8000)
    banks = kaldi_mel_banks(64, 256, 8000.0)
    assert banks.shape == (64, 129) and banks[:, -1].abs().sum() == 0 and (banks.sum(1) > 0).all()
    assert banks.max() <= 1.0 and ((banks > 0).sum(0) <= 2).all()  # triangles: at most two cover any bin


def test_resampling_keeps_the_tone_and_the_duration():
    rate = 8000
    t = np.arange(rate) / rate
    x = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    y = resample(x, rate, 16000)
    assert len(y) == 16000 and y.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(int(spectrum.argmax()) * 16000 / len(y) - 1000) < 2
    z = resample(resample(x, 8000, 22050), 22050, 8000)
    assert len(z) == 8000 and np.abs(z[200:-200] - x[200:-200]).max() < 0.02
    assert resample(x, 8000, 8000) is x


# --------------------------------------------------------------------------------------
# the readers


def test_embedded_set_is_the_original_archive_with_the_official_split():
    assert hashlib.sha256(EMBEDDED_AUDIO_FILE.read_bytes()).hexdigest() == FSDD_SHA256
    assert (EMBEDDED_AUDIO_FILE.parent / "FSDD-LICENSE").read_text().count("Attribution-ShareAlike 4.0") >= 2
    assert is_audio_source(EMBEDDED_AUDIO) and is_audio_source(str(EMBEDDED_AUDIO_FILE))
    info = audio_info(EMBEDDED_AUDIO)
    assert info.native_rate == 8000 and info.recordings == 3000 and info.default_clip_seconds == 0.75
    train = open_audio(EMBEDDED_AUDIO, "train", sample_rate=8000, clip_seconds=0.5)
    test = open_audio(EMBEDDED_AUDIO, "test", sample_rate=8000, clip_seconds=0.5)
    assert (len(train), len(test)) == (2700, 300) and train.classes == [str(d) for d in range(10)]
    assert torch.bincount(test.labels).tolist() == [30] * 10  # 6 speakers x indices 0-4 per digit
    assert train.audio.shape == (2700, 1, 4000) and (train.lengths <= 4000).all() and train.has_labels
    speakers = open_audio(EMBEDDED_AUDIO, "test", sample_rate=8000, clip_seconds=0.5, label_column="speaker")
    assert len(speakers.classes) == 6 and torch.bincount(speakers.labels).tolist() == [50] * 6
    with pytest.raises(ConfigError, match="labeled by digit or speaker"):
        open_audio(EMBEDDED_AUDIO, "test", sample_rate=8000, clip_seconds=0.5, label_column="gender")


def test_fsdd_names_give_digit_speaker_and_the_official_split():
    names = ["recordings/3_theo_4.wav", "recordings/3_theo_5.wav", "recordings/7_lucas_0.wav", "recordings/0_george_49.wav"]
    layout = layout_of(names, {}, None)
    assert layout.split == ["test", "train", "test", "train"] and layout.labels == ["3", "3", "7", "0"]
    assert layout_of(names, {}, "speaker").labels == ["theo", "theo", "lucas", "george"]


def test_a_folder_reads_any_format_and_rate_downmixes_resamples_and_counts_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    for cls, n in (("dog", 3), ("cat", 4)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            (tmp_path / cls / f"{i}.wav").write_bytes(_wav_bytes(0.1 * rng.standard_normal(3000).astype(np.float32), 16000))
    stereo = np.stack([np.full(22050, 0.5), np.full(22050, -0.1)], axis=1).astype(np.float32)  # 1 s at 22.05 kHz
    (tmp_path / "cat" / "long.flac").write_bytes(_wav_bytes(stereo, 22050, "FLAC"))
    (tmp_path / "cat" / "broken.wav").write_bytes(b"RIFF not a wave file")
    (tmp_path / "dog" / "empty.wav").write_bytes(_wav_bytes(np.zeros(0, np.float32), 16000))
    assert is_audio_source(str(tmp_path)) and not is_audio_source(str(tmp_path / "dog" / "0.wav"))
    info = audio_info(str(tmp_path))
    assert info.native_rate == 16000
    parts = {s: open_audio(str(tmp_path), s, sample_rate=16000, clip_seconds=0.25) for s in ("train", "test")}
    assert len(parts["train"]) + len(parts["test"]) == 8  # 7 wavs + the FLAC; 2 skipped
    for part in parts.values():
        assert part.classes == ["cat", "dog"] and part.skipped == 2
        assert part.skip_reasons == {"no samples": 1, "unreadable (LibsndfileError)": 1}
        assert part.audio.shape[1:] == (1, 4000)
    flac = [p for p in parts.values() if (p.lengths == 4000).sum() > 0]
    assert flac  # the 1 s FLAC, cut to 0.25 s; its two channels averaged (0.2), then its mean removed (0)
    again = open_audio(str(tmp_path), "train", sample_rate=16000, clip_seconds=0.25)
    assert torch.equal(again.audio, parts["train"].audio)  # the hashed split is fixed
    # a short clip is zero-padded at the end, its length says where the recording ends
    n = int(parts["train"].lengths.min())
    assert n == 3000 and parts["train"].audio[parts["train"].lengths.argmin(), 0, 3000:].abs().sum() == 0


def test_a_manifest_gives_labels_and_splits_and_leaves_out_what_it_does_not_list(tmp_path):
    wav = _wav_bytes(np.zeros(800, np.float32) + 0.01, 8000)
    for name in ("a.wav", "b.wav", "c.wav", "extra.wav"):
        (tmp_path / name).write_bytes(wav)
    (tmp_path / "labels.csv").write_text("filename,category,split\na.wav,x,train\nb.wav,y,train\nc.wav,x,test\n")
    train = open_audio(str(tmp_path), "train", sample_rate=8000, clip_seconds=0.1)
    test = open_audio(str(tmp_path), "test", sample_rate=8000, clip_seconds=0.1)
    assert (len(train), len(test), train.classes) == (2, 1, ["x", "y"])
    assert train.skip_reasons == {"not in the manifest": 1}
    with pytest.raises(ConfigError, match="not a column of labels.csv"):
        open_audio(str(tmp_path), "train", sample_rate=8000, clip_seconds=0.1, label_column="speaker")
    with pytest.raises(DataError, match="no recordings in the val split"):
        open_audio(str(tmp_path), "val", sample_rate=8000, clip_seconds=0.1)


def test_an_archive_with_split_folders_and_clear_errors(tmp_path):
    archive = tmp_path / "set.tar.gz"
    wav = _wav_bytes(np.full(1600, 0.2, np.float32), 8000)
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("train/up/1.wav", "train/down/2.wav", "test/up/3.wav", "test/down/4.wav"):
            info = tarfile.TarInfo(name)
            info.size = len(wav)
            tar.addfile(info, io.BytesIO(wav))
    test = open_audio(str(archive), "test", sample_rate=8000, clip_seconds=0.2)
    assert len(test) == 2 and test.classes == ["down", "up"] and test.labels.tolist() == [0, 1]
    with pytest.raises(DataError, match="no such folder or archive"):
        open_audio(str(tmp_path / "missing"), "train", sample_rate=8000, clip_seconds=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no audio files"):
        open_audio(str(tmp_path / "empty"), "train", sample_rate=8000, clip_seconds=1)
    with pytest.raises(DataError, match="audio is held in memory"):
        open_audio(str(archive), "train", sample_rate=8000, clip_seconds=1e6, memory_budget_gib=0.001)


# --------------------------------------------------------------------------------------
# masks and augmentation


def test_wav2vec_span_masks_follow_compute_mask_indices():
    g = torch.Generator().manual_seed(0)
    mask = wav2vec_span_masking(64, 200, 0.65, 10, generator=g)
    counts = mask.sum(1)
    assert (counts == counts[0]).all()  # require_same_masks
    assert 0.3 < mask.float().mean() < 0.55  # 13 overlapping spans of 10 in 200 steps, cut to the fewest
    # one span that cannot overlap: exactly `span` consecutive steps
    one = wav2vec_span_masking(32, 40, 0.05, 4, generator=g)  # int(0.05 * 40 / 4 + u) = 0 -> at least 1 span
    assert (one.sum(1) == 4).all()
    starts = one.int().argmax(1)
    assert all(one[i, s : s + 4].all() for i, s in enumerate(starts.tolist()))
    assert (starts < 36).all()  # starts drawn from [0, T - span)
    a = wav2vec_span_masking(4, 10, 0.65, 2, generator=torch.Generator().manual_seed(5))
    b = wav2vec_span_masking(4, 10, 0.65, 2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_roll_mag_rolls_inside_the_recording_and_scales():
    from selfsup.methods.audio_mae import roll_mag

    torch.manual_seed(0)
    wave = torch.arange(1, 11, dtype=torch.float32).repeat(64, 1, 1)
    wave[:, :, 6:] = 0  # 6 samples of recording, 4 of padding
    out = roll_mag(wave, torch.full((64,), 6))
    assert (out[:, :, 6:] == 0).all()
    gain = out[:, 0, :6].sum(1) / 21.0
    assert (gain > 0.5).all() and (gain < 1.5).all() and gain.std() > 0.01  # Beta(10, 10) + 0.5
    rolled = out[:, 0, :6] / gain[:, None]
    for row in rolled:
        shift = int((row.round() == 1).nonzero()[0])
        assert torch.allclose(row, torch.roll(torch.arange(1.0, 7.0), shift), atol=1e-4)


# --------------------------------------------------------------------------------------
# the encoder and the methods


def _method(tmp_path, *extra, method="audio_mae"):
    import selfsup

    return selfsup.create(load_config(None, tiny_audio(tmp_path, *extra, method=method)))


def test_the_run_fixes_rate_clip_and_spectrogram_statistics_from_the_training_recordings(tmp_path):
    from selfsup.core.build import resolve_config
    from selfsup.nn.spectrogram import kaldi_fbank

    cfg = resolve_config(load_config(None, tiny_audio(tmp_path)))
    assert (cfg.data.sample_rate, cfg.data.clip_seconds, cfg.backbone.sample_rate, cfg.backbone.max_len) == (8000, 0.5, 8000, 4000)
    train = open_audio(EMBEDDED_AUDIO, "train", sample_rate=8000, clip_seconds=0.5)
    values = []
    for wave, n in zip(train.audio[:, 0], train.lengths):
        values.append(kaldi_fbank(wave[None], 8000, num_mel_bins=32)[0, : fbank_frames(int(n), 8000)].double().flatten())
    values = torch.cat(values)
    mean, std = cfg.backbone.spec_norm
    assert abs(mean - float(values.mean())) < 1e-4 and abs(std - float(values.std(unbiased=False))) < 1e-4
    assert resolve_config(cfg) is cfg  # fixed once: a resumed or loaded run keeps them


def test_the_audio_vit_normalizes_pads_with_silence_and_encodes_waves_or_spectrograms(tmp_path):
    model = _method(tmp_path).eval()
    enc = model.encoder
    mean, std = enc.spec_mean, enc.spec_std
    wave = torch.zeros(2, 1, 4000)
    wave[0, 0, :2000] = 0.2 * torch.randn(2000)
    spec = model.preprocess({"audio": wave})
    assert spec.shape == (2, 1, 48, 32) and enc.grid_size == (6, 4)
    silence = (LOG_FLOOR - mean) / (2 * std)
    assert torch.allclose(spec[1], torch.full_like(spec[1], silence))
    raw = kaldi_fbank(wave[0, 0], 8000, num_mel_bins=32)
    assert torch.allclose(spec[0, 0], (raw - mean) / (2 * std), atol=1e-5)
    with torch.no_grad():
        assert torch.equal(enc(wave), enc(spec)) and enc(wave).shape == (2, 32)
    with pytest.raises(ConfigError, match="backbone.name=vit_tiny is an image encoder; audio_mae trains on audio"):
        load_config(None, tiny_audio(tmp_path, "backbone.name=vit_tiny"))


def test_audio_mae_loss_is_the_mae_loss_of_its_masked_patches(tmp_path):
    from selfsup.losses import mae_loss
    from selfsup.pretext.masking import random_masking

    model = _method(tmp_path, "method.roll_mag_aug=false")
    wave = 0.1 * torch.randn(4, 1, 4000, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    loss = model({"audio": wave}).loss
    torch.manual_seed(7)
    spec = model.preprocess({"audio": wave})
    masks = random_masking(4, 24, 0.8)
    assert int(masks.mask[0].sum()) == 24 - int(24 * 0.2)
    pred = model.decoder(model.backbone.tokens(spec, keep=masks.keep), masks.ids_restore, (6, 4))
    target = model.backbone.patchify(spec)
    assert target.shape == (4, 24, 64)
    assert torch.allclose(loss, mae_loss(pred, target, masks.mask), atol=1e-6)
    # by hand for one sample: per-patch normalized targets, squared error averaged over masked patches
    t = target[0]
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    m = masks.mask[0]
    by_hand = ((pred[0] - t) ** 2).mean(-1)[m].mean()
    assert torch.allclose(mae_loss(pred[:1], target[:1], masks.mask[:1]), by_hand, atol=1e-6)


def test_the_local_decoder_attends_within_its_windows(tmp_path):
    from selfsup.methods.audio_mae import LocalDecoder

    torch.manual_seed(0)
    dec = LocalDecoder(16, 8, (8, 4), dim=16, depth=1, num_heads=2, window=(4, 4)).eval()  # one unshifted block
    latent = torch.randn(1, 1 + 32, 16)
    ids = torch.arange(32)[None]
    out = dec(latent, ids)
    moved = latent.clone()
    moved[0, 1 + 20] += 5.0  # a token of the second window (time rows 4-7)
    out2 = dec(moved, ids)
    changed = (out2 - out).abs().sum(-1)[0] > 1e-6
    assert changed[16:].any() and not changed[:16].any()  # the first window (rows 0-3) does not see it
    shifted = LocalDecoder(16, 8, (8, 4), dim=16, depth=2, num_heads=2, window=(4, 4), shift=(2, 0)).eval()
    a, b = shifted(latent, ids), shifted(moved, ids)
    changed = (b - a).abs().sum(-1)[0] > 1e-6
    # the second block's windows are shifted 2 rows along time (rows 2-5, 6-7 + 0-1 masked apart): row 5's
    # token now reaches rows 2-3, and the cyclic wrap does not carry it to rows 0-1
    assert changed[8:16].any() and not changed[:8].any()


def test_data2vec_audio_masks_time_columns_and_regresses_instance_normed_ffn_outputs(tmp_path):
    import torch.nn.functional as F

    model = _method(tmp_path, "method.mask_span_ms=160", method="data2vec_audio")
    assert model.span == 2  # 160 ms over 80 ms columns
    spec = model.preprocess({"audio": 0.1 * torch.randn(3, 1, 4000)})
    mask = model.time_mask(spec).view(3, 6, 4)
    assert (mask == mask[:, :, :1]).all() and mask.any()  # whole time columns, every frequency patch
    assert (mask.sum((1, 2)) == mask[0].sum()).all()
    # the targets by hand: each block's FFN output (before its residual add), instance-normed over tokens, averaged
    teacher = model.teacher.model
    with torch.no_grad():
        m = teacher
        x = m.patch_embed.norm(m.patch_embed.proj(spec).flatten(2).transpose(1, 2)) + m.pos_embed[:, 1:]
        x = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(3, -1, -1), x], 1)
        ffn = []
        for blk in m.blocks:
            x = x + blk.attn(blk.norm1(x))
            out = blk.mlp(blk.norm2(x))
            ffn.append(out[:, 1:])
            x = x + out
        want = torch.stack([F.instance_norm(f.transpose(1, 2)).transpose(1, 2) for f in ffn]).mean(0)
    assert torch.allclose(model.targets(spec), want, atol=1e-5)
    # after a step the teacher's blocks moved by the EMA only, its input layers are the student's
    from selfsup.core.method import Progress

    loss = model({"audio": 0.1 * torch.randn(3, 1, 4000)}).loss
    loss.backward()
    with torch.no_grad():
        for p in model.backbone.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    before = [p.clone() for p in model.teacher.model.blocks.parameters()]
    model.on_step_end(Progress(step=1, total_steps=10, epoch=0, epochs=1, steps_per_epoch=10))
    tau = model.momentum(Progress(step=1, total_steps=10, epoch=0, epochs=1, steps_per_epoch=10))
    for t0, t1, s in zip(before, model.teacher.model.blocks.parameters(), model.backbone.model.blocks.parameters()):
        assert torch.allclose(t1, tau * t0 + (1 - tau) * s, atol=1e-6)
    assert torch.equal(model.teacher.model.patch_embed.proj.weight, model.backbone.model.patch_embed.proj.weight)


def test_an_audio_method_refuses_other_data_and_encoders(tmp_path):
    with pytest.raises(ConfigError, match="audio_mae trains on audio data; data.source=embedded is image data"):
        load_config(None, tiny_audio(tmp_path, "data.source=embedded"))
    with pytest.raises(ConfigError, match="backbone.name=resnet18 is an image encoder; audio_mae trains on audio"):
        load_config(None, tiny_audio(tmp_path, "backbone.name=resnet18"))
    with pytest.raises(ConfigError, match="simclr trains on image or series data; data.source=embedded-audio is audio data"):
        load_config(None, [f"data.source={EMBEDDED_AUDIO}"])


# --------------------------------------------------------------------------------------
# training, resuming, probing, exporting


@pytest.mark.parametrize("name", ["audio_mae", "data2vec_audio"])
def test_audio_methods_resume_exactly(tmp_path, name):
    from tests.conftest import resume_matches_straight

    cfg = load_config(None, tiny_audio(tmp_path, "data.limit=64", "trainer.max_steps=6", method=name))
    resume_matches_straight(cfg, tmp_path, until_step=3)


def test_pretrain_probe_digit_and_speaker_and_export_from_the_cli(tmp_path, capsys):
    from selfsup.cli import main
    from selfsup.evaluate import load_method
    from selfsup.export import load_encoder

    over = tiny_audio(tmp_path, "trainer.max_steps=4", "trainer.run_name=r", "eval.final_knn=true",
                      "eval.random_init_seeds=1", "eval.knn_k=[5]")
    assert main(["pretrain", *over]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "2,700 clips of 0.5 s at 8000 Hz" in out and "kNN top-1 (k5), random init" in out
    run = tmp_path / "runs" / "r"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["position"]["step"] == 4 and summary["method"] == "audio_mae"
    knn = summary["knn"]
    assert (knn["bank_samples"], knn["test_samples"]) == (2700, 300)
    assert 20 < knn["trained"]["k5"]["top1"] <= 100 and 20 < knn["random_init"]["k5"]["top1"]  # ten digits
    assert main(["eval", "linear", "--checkpoint", str(run), "--device", "cpu", "--solver", "lbfgs",
                 "data.label_column=speaker"]) == 0
    speaker = json.loads((run / "eval_linear.json").read_text())
    assert speaker["test_samples"] == 300 and speaker["top1"] > 50  # six speakers: chance is 16.7%
    assert main(["report", str(run)]) == 0  # with the spectrogram reconstructions of Audio-MAE
    assert (run / "report" / "reconstruction.png").stat().st_size > 20_000
    assert main(["export", str(run), str(tmp_path / "enc.safetensors")]) == 0
    assert "Kaldi log-mel" in capsys.readouterr().out
    enc = load_encoder(tmp_path / "enc.safetensors").eval()
    method, _, _ = load_method(run)
    wave = 0.1 * torch.randn(2, 1, 4000)
    with torch.no_grad():
        assert torch.allclose(enc(wave), method.embed({"audio": wave}), atol=1e-5)
