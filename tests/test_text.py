"""The text modality: tokenizers, the data (files, tables, splits, token blocks), the text encoder,
causal LM, masked LM and data2vec for text, evaluation (perplexity, probes), export to
transformers, and the CLI end to end on tiny settings."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from selfsup.backbones.text import TextEncoder
from selfsup.config import DataConfig, load_config
from selfsup.data.text import (
    EMBEDDED_TEXT_FILE,
    TokenBlocks,
    read_table,
    speaker_examples,
    split_files,
    text_examples,
)
from selfsup.errors import ConfigError, DataError
from selfsup.losses import data2vec_targets, token_cross_entropy
from selfsup.pretext.text_tokenizer import load_tokenizer, train_tokenizer

SHAKESPEARE = gzip.open(EMBEDDED_TEXT_FILE, "rb").read().decode()


@pytest.fixture(scope="module")
def char_tok():
    return train_tokenizer("char", [SHAKESPEARE[:100_000]])


@pytest.fixture(scope="module")
def wp_tok():
    return train_tokenizer("wordpiece", SHAKESPEARE[:200_000].split("\n\n"), vocab_size=500)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small plain-text corpus (40k characters of Shakespeare)."""
    path = tmp_path / "corpus.txt"
    path.write_text(SHAKESPEARE[:40_000])
    return path


def tiny_text(tmp_path, method: str, source, *extra: str) -> list[str]:
    """Overrides for a tiny text run: a 32-wide, 2-block encoder, blocks of 16 tokens, batch 8."""
    return [f"method.name={method}", f"data.source={source}", "data.seq_len=16", "data.batch_size=8",
            "data.eval_batch_size=64", "data.tokenizer_vocab=300", "backbone.name=text_tiny", "backbone.embed_dim=32",
            "backbone.depth=2", "backbone.num_heads=2", "backbone.pos_embed=learned", "optim.name=adamw", "optim.lr=3e-3",
            "optim.lr_scaling=none", "optim.warmup_epochs=0", "optim.weight_decay=0.0", "trainer.progress=false",
            "trainer.precision=32", "trainer.device=cpu", f"trainer.out_dir={tmp_path / 'runs'}",
            "eval.final_knn=false", *extra]


# --------------------------------------------------------------------------------------
# tokenizers


@pytest.mark.parametrize("kind", ["char", "bpe", "wordpiece"])
def test_tokenizer_round_trip_and_specials(kind, tmp_path):
    tok = train_tokenizer(kind, SHAKESPEARE[:50_000].split("\n\n"), vocab_size=400, sentinels=3)
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    ids = tok.encode(text)
    expected = text.lower() if kind == "wordpiece" else text  # BERT's normalizer lowercases
    decoded = tok.decode(ids)
    assert (decoded.replace(" ", "") if kind == "wordpiece" else decoded) == (
        expected.replace(" ", "").replace("\n", "") if kind == "wordpiece" else expected)
    assert (tok.pad_id, tok.sep_id, tok.mask_id) == (0, 3, 4)  # the specials come first, in order
    assert tok.sentinel_ids(3).tolist() == list(range(tok.vocab_size - 3, tok.vocab_size))
    assert not set(ids) & set(tok.special_ids)  # encode adds no special token
    again = load_tokenizer(tok.save(tmp_path / "tokenizer.json"))
    assert again.kind == kind and again.encode(text) == ids and again.vocab_size == tok.vocab_size
    with pytest.raises(ConfigError, match="sentinel"):
        tok.sentinel_ids(4)


def test_char_fast_path_matches_the_tokenizer(char_tok):
    text = SHAKESPEARE[:20_000] + "ünknown ☃"
    assert char_tok.encode(text) == char_tok.tokenizer.encode(text).ids


def test_word_starts_follow_wordpiece_continuations(wp_tok):
    starts = wp_tok.word_starts()
    for piece, i in wp_tok.tokenizer.get_vocab().items():
        if i not in wp_tok.special_ids:
            assert bool(starts[i]) == (not piece.startswith("##")), piece


def test_a_bad_tokenizer_file_is_one_line(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a tokenizers JSON"):
        load_tokenizer(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")


# --------------------------------------------------------------------------------------
# data


def test_split_files_of_files_folders_and_embedded(tmp_path, corpus):
    assert split_files(str(corpus), "train").part == "train"
    assert split_files(str(corpus), "test").part == "held"
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\nbad\t0\n")
    assert split_files(str(folder), "val").files[0].name == "dev.tsv"  # val / valid / validation / dev
    with pytest.raises(DataError, match="no 'test' split"):
        split_files(str(folder), "test")
    assert split_files("embedded-text", "train").files == (EMBEDDED_TEXT_FILE,)
    with pytest.raises(DataError, match="not found"):
        split_files(str(tmp_path / "nope.txt"), "train")


def test_read_table_finds_headers_and_columns(tmp_path):
    sst = tmp_path / "sst.tsv"
    sst.write_text("sentence\tlabel\nit 's a charming journey\t1\nflat\t0\n")
    assert [(r.text, r.label) for r in read_table(sst)] == [("it 's a charming journey", "1"), ("flat", "0")]
    ag = tmp_path / "ag.tsv"  # AG News: no header, label last
    ag.write_text("Stocks rose today\tBusiness\nA late goal won it\tSports\n")
    assert [r.label for r in read_table(ag)] == ["Business", "Sports"]
    jl = tmp_path / "x.jsonl"
    jl.write_text(json.dumps({"text": "hello", "label": 2}) + "\n\n" + json.dumps({"text": "bye"}) + "\n")
    assert [(r.text, r.label) for r in read_table(jl)] == [("hello", "2"), ("bye", None)]
    jl.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="data.text_column"):
        read_table(jl)


def test_token_blocks_partition_the_array_and_shift_each_epoch():
    tokens = np.arange(1000, dtype=np.uint16)
    blocks = TokenBlocks(tokens, seq_len=10)
    assert len(blocks) == 1000 // 10 - 1
    batch = blocks.gather(torch.tensor([0, 1]))["tokens"]
    assert batch[0].tolist() == list(range(11)) and batch[1, 0] == 10  # blocks share their boundary token
    g = torch.Generator().manual_seed(3)
    order = blocks.epoch_order(g)
    phase = int(order[0]) // len(blocks)
    assert 0 <= phase < 10 and sorted((order % len(blocks)).tolist()) == list(range(len(blocks)))
    rows = blocks.gather(order)["tokens"]
    assert int(rows.max()) <= 999 and set((rows[:, 0] % 10).tolist()) == {phase}
    with pytest.raises(DataError, match="no block"):
        TokenBlocks(np.arange(15, dtype=np.uint16), seq_len=10)


def test_speaker_task_is_ten_speakers_with_disjoint_splits():
    train, test = speaker_examples(SHAKESPEARE, "train"), speaker_examples(SHAKESPEARE, "test")
    assert len({r.label for r in train}) == 10 == len({r.label for r in test})
    assert not {r.text for r in train} & {r.text for r in test}
    assert 0.18 < len(test) / (len(train) + len(test)) < 0.22  # every 5th speech


def test_text_examples_pad_and_mask(tmp_path, wp_tok):
    table = tmp_path / "t.tsv"
    table.write_text("text\tlabel\n" + "".join(f"{'word ' * (i + 1)}\t{i % 2}\n" for i in range(6)))
    ex = text_examples(str(table), "train", DataConfig(seq_len=4), wp_tok)
    assert ex.has_labels and ex.classes == ["0", "1"]
    b = ex.gather(torch.arange(len(ex)))
    want = [min(4, len(wp_tok.encode("word " * (i + 1)))) for i in range(len(ex))]  # the first 90% of the rows
    assert len(ex) == 5 and b["tokens"].shape[1] == 4 and b["attention_mask"].sum(1).tolist() == want
    assert (b["tokens"][b["attention_mask"] == 0] == wp_tok.pad_id).all()


# --------------------------------------------------------------------------------------
# the encoder and the losses


def _encoder(tok, **kw) -> TextEncoder:
    torch.manual_seed(0)
    args = dict(vocab_size=tok.vocab_size, max_len=32, embed_dim=32, depth=2, num_heads=2, tokenizer=tok)
    return TextEncoder(**{**args, **kw})


@pytest.mark.parametrize("pos", ["learned", "sincos", "rotary"])
def test_causal_encoder_has_no_leakage(char_tok, pos):
    """Changing a future token changes no earlier position's output."""
    enc = _encoder(char_tok, pos_embed=pos).eval()
    ids = torch.randint(5, char_tok.vocab_size, (2, 20))
    later = ids.clone()
    later[:, 12] = (later[:, 12] + 1 - 5) % (char_tok.vocab_size - 5) + 5
    a, b = enc.tokens(ids, causal=True), enc.tokens(later, causal=True)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-4)
    bidirectional = enc.tokens(ids), enc.tokens(later)
    assert not torch.allclose(bidirectional[0][:, :12], bidirectional[1][:, :12], atol=1e-4)


def test_padding_changes_nothing_but_padding(char_tok):
    enc = _encoder(char_tok, norm="post").eval()
    ids = torch.randint(5, char_tok.vocab_size, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], 1).long()
    assert torch.allclose(enc(ids), enc(padded, mask), atol=1e-5)
    assert torch.allclose(enc.tokens(ids), enc.tokens(padded, mask)[:, :10], atol=1e-5)


def test_token_cross_entropy_hand_case():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    loss, acc = token_cross_entropy(logits, torch.tensor([[0, 2, -100]]))
    want = (-(2 - math.log(math.e**2 + 2)) - (0 - math.log(math.e + 2))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6) and acc.item() == pytest.approx(0.5)
    none, _ = token_cross_entropy(logits, torch.full((1, 3), -100))
    assert none.item() == 0.0


def test_data2vec_text_targets_two_layer_hand_case():
    """Average of the top-2 layers, each instance-normalized over the sequence, no final norm."""
    a = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])  # (B=1, T=2, D=2)
    b = torch.tensor([[[0.0, 1.0], [4.0, 1.0]]])
    # IN per channel over T=2: values x -> (x - mean) / sqrt(var + 1e-5), var the biased variance
    def inorm(x):
        m, v = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
        return (x - m) / torch.sqrt(v + 1e-5)
    want = (inorm(a) + inorm(b)) / 2
    # hand values: channel 0 of a is (1, 3) -> (-1, 1); of b (0, 4) -> (-1, 1); channel 1 of b is constant -> 0
    assert torch.allclose(want[0, :, 0], torch.tensor([-1.0, 1.0]), atol=1e-4)
    got = data2vec_targets([torch.randn(1, 2, 2), a, b], top_k=2, instance_norm_layers=True, layer_norm_targets=False)
    assert torch.allclose(got, want, atol=1e-6)


# --------------------------------------------------------------------------------------
# methods, end to end


def _build(tmp_path, method: str, source, *extra: str):
    from selfsup.core.build import build_method

    cfg = load_config(None, tiny_text(tmp_path, method, source, *extra))
    return build_method(cfg), cfg


def test_clm_trains_and_scores(tmp_path, corpus):
    from selfsup.train.trainer import Trainer

    cfg = load_config(None, tiny_text(tmp_path, "clm", corpus, "data.tokenizer=char", "trainer.max_steps=30"))
    trainer = Trainer(cfg)
    assert trainer.cfg.backbone.vocab_size == trainer.method.tokenizer.vocab_size  # fixed before the build
    batch = next(iter(trainer.loader))
    before = trainer.method.lm_scores(batch)["nll"]
    summary = trainer.fit()
    assert summary["finished"] and summary["timings"]["tokens_per_second"] > 0
    assert trainer.method.lm_scores(batch)["nll"] < 0.9 * before
    from selfsup.evaluate import language_model_scores

    scores = language_model_scores(trainer.method, trainer.cfg, device=torch.device("cpu"))
    assert scores["tokens"] > 1000 and scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))
    assert scores["loss"] < math.log(trainer.method.tokenizer.vocab_size)  # better than uniform


@pytest.mark.parametrize("method", ["clm", "mlm", "t5", "data2vec_text"])
def test_text_methods_resume_exactly(tmp_path, corpus, method):
    """Stopped at step 3 and resumed, every text method ends where the straight run does (the masks,
    spans, EMA teacher and the epoch's block grid all replay)."""
    from tests.conftest import resume_matches_straight

    extra = {"clm": ["data.tokenizer=char"], "mlm": [], "t5": ["method.max_sentinels=8"],
             "data2vec_text": ["method.top_k=2"]}[method]
    cfg = load_config(None, tiny_text(tmp_path, method, corpus, "trainer.max_steps=6", *extra))
    resume_matches_straight(cfg, tmp_path, until_step=3)


def test_mlm_predicts_only_selected_tokens(tmp_path, corpus):
    method, _ = _build(tmp_path, "mlm", corpus, "method.whole_word=true")
    assert method.tokenizer.kind == "wordpiece"  # the method's default
    tokens = torch.tensor([method.tokenizer.encode(SHAKESPEARE[:2000])[:17]] * 4)
    out = method({"tokens": tokens})
    assert torch.isfinite(out.loss) and 0 <= float(out.metrics["mlm_acc"]) <= 1
    out.loss.backward()
    assert method.backbone.model.blocks[0].qkv.weight.grad is not None
    words = method.word_ids(tokens[:, :-1])
    assert (words[:, 1:] >= words[:, :-1]).all()  # word indices never go back
    a, b = method.lm_scores({"tokens": tokens}), method.lm_scores({"tokens": tokens})
    assert a == b and a["count"] > 0  # held-out masks come from a fixed seed


def test_data2vec_text_teacher_follows_blocks_only(tmp_path, corpus):
    from selfsup.core.method import Progress

    method, _ = _build(tmp_path, "data2vec_text", corpus, "method.top_k=2", "method.ema_decay=0.5",
                       "method.ema_end_decay=0.5")
    tokens = torch.tensor([method.tokenizer.encode(SHAKESPEARE[:3000])[:17]] * 4)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    out = method({"tokens": tokens})
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    teacher_embed = method.teacher.model.tok_embed.weight.clone()
    opt.step()
    method.on_step_end(Progress(1, 10, 0, 1, 10))
    s, t = method.backbone.model.blocks[0].fc1.weight, method.teacher.model.blocks[0].fc1.weight
    assert not torch.equal(s, t)  # EMA at 0.5: halfway, not a copy
    assert torch.equal(method.teacher.model.tok_embed.weight, teacher_embed)  # the teacher reads the student's


def test_text_method_refuses_image_data_and_image_method_text_data(tmp_path, corpus):
    with pytest.raises(ConfigError, match="clm trains on text data; data.source=embedded is image data"):
        load_config(None, ["method.name=clm", "data.source=embedded", "backbone.name=text_tiny"])
    with pytest.raises(ConfigError, match="is an text encoder|is a text encoder"):
        load_config(None, ["method.name=simclr", "backbone.name=text_tiny"])
    with pytest.raises(ConfigError, match="simclr trains on image or series data; data.source=.* is text data"):
        load_config(None, ["method.name=simclr", f"data.source={corpus}"])


# --------------------------------------------------------------------------------------
# CLI and export


def test_cli_pretrain_eval_and_export_gpt2(tmp_path, corpus, capsys):
    pytest.importorskip("transformers")
    from transformers import AutoModel

    from selfsup.cli import main
    from selfsup.evaluate import load_method

    args = tiny_text(tmp_path, "clm", corpus, "data.tokenizer=char", "trainer.max_steps=4", "backbone.bias=false")
    assert main(["pretrain", *args]) == 0
    run = next((tmp_path / "runs").iterdir())
    assert main(["eval", "perplexity", "--checkpoint", str(run)]) == 0
    result = json.loads((run / "eval_perplexity.json").read_text())
    assert result["tokens"] > 0 and result["perplexity"] > 1
    assert main(["report", str(run)]) == 0  # a plain corpus: no labels, but the held-out loss and predictions
    assert (run / "report" / "predictions.png").is_file() and "held-out loss" in (run / "report" / "report.html").read_text()
    assert main(["export", str(run), str(tmp_path / "gpt2")]) == 0
    hf = AutoModel.from_pretrained(tmp_path / "gpt2").eval()
    method, _, _ = load_method(run)
    ids = torch.randint(5, method.backbone.vocab_size, (2, 12))
    ours = method.backbone.tokens(ids, causal=True)
    assert torch.allclose(hf(input_ids=ids).last_hidden_state, ours, atol=1e-5)
    assert (tmp_path / "gpt2" / "tokenizer.json").is_file()


def test_export_bert_matches_transformers(tmp_path, corpus):
    pytest.importorskip("transformers")
    from transformers import AutoModel

    from selfsup.train.trainer import Trainer

    cfg = load_config(None, tiny_text(tmp_path, "mlm", corpus, "backbone.norm=post", "trainer.max_steps=2"))
    trainer = Trainer(cfg)
    trainer.fit()
    from selfsup.export import export_encoder

    meta = export_encoder(trainer.run_dir, tmp_path / "bert")
    assert meta["library"] == "transformers"
    hf = AutoModel.from_pretrained(tmp_path / "bert").eval()
    ids = torch.randint(5, trainer.method.backbone.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ours = trainer.method.eval().backbone.tokens(ids, mask)
    theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(theirs[0], ours[0], atol=1e-5) and torch.allclose(theirs[1, :8], ours[1, :8], atol=1e-5)


def test_export_without_a_transformers_equivalent_reloads_in_selfsup(tmp_path, corpus):
    from selfsup.export import export_encoder, load_encoder
    from selfsup.train.trainer import Trainer

    cfg = load_config(None, tiny_text(tmp_path, "clm", corpus, "data.tokenizer=char", "backbone.pos_embed=rotary",
                                      "trainer.max_steps=1"))
    trainer = Trainer(cfg)
    trainer.fit()
    meta = export_encoder(trainer.run_dir, tmp_path / "rope")
    assert meta["library"] == "selfsup" and "rotary" in meta["note"]
    enc = load_encoder(tmp_path / "rope")
    ids = torch.randint(5, enc.vocab_size, (1, 9))
    assert torch.allclose(enc.tokens(ids, causal=True), trainer.method.backbone.eval().tokens(ids, causal=True), atol=1e-6)
    assert enc.tokenizer.encode("abc") == trainer.method.tokenizer.encode("abc")
    with pytest.raises(Exception, match="not an empty folder"):
        export_encoder(trainer.run_dir, tmp_path / "rope")


def test_knn_on_a_labeled_table(tmp_path):
    """A text run evaluated by kNN on a labeled TSV through the same verbs as images."""
    from selfsup.evaluate import labeled_features, run_knn
    from selfsup.train.trainer import Trainer

    folder = tmp_path / "sent"
    folder.mkdir()
    pos, neg = "a good fine great movie", "a bad awful dull movie"
    rows = [(pos if i % 2 else neg) + f" number {i}" for i in range(80)]
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{r}\t{i % 2}\n" for i, r in enumerate(rows)))
    (folder / "test.tsv").write_text("sentence\tlabel\n" + "".join(f"{r}\t{i % 2}\n" for i, r in enumerate(rows[:20])))
    cfg = load_config(None, tiny_text(tmp_path, "mlm", folder, "data.seq_len=8", "trainer.max_steps=2"))
    trainer = Trainer(cfg)
    trainer.fit()
    feats = labeled_features(trainer.method, trainer.cfg, device=torch.device("cpu"))
    assert feats[0].shape == (80, 32) and feats[4] == ["0", "1"]
    assert run_knn(feats, trainer.cfg)["k20"]["top1"] > 90  # the words tell the classes apart even at init


def test_finetune_a_text_encoder_from_the_cli_and_the_api(tmp_path, capsys):
    """`selfsup eval finetune` on a text run: BERT's recipe (AdamW, linear warm-up and decay,
    dropout 0.1) on tokenized examples; the pretrained method is left untouched."""
    import json

    from selfsup.cli import main
    from selfsup.eval.finetune import finetune
    from selfsup.evaluate import load_feature_split, load_method

    folder = tmp_path / "sent"
    folder.mkdir()
    # the class is which of two words comes *second*: a bag of words cannot tell, order can
    rows = [("red blue" if i % 2 else "blue red") + f" item {i % 7}" for i in range(96)]
    for split, part in (("train", rows), ("test", rows[:32])):
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{r}\t{i % 2}\n" for i, r in enumerate(part)))
    assert main(["pretrain", *tiny_text(tmp_path, "mlm", folder, "data.seq_len=8", "trainer.max_steps=2")]) == 0
    run = next((tmp_path / "runs").iterdir())
    assert main(["eval", "finetune", "--checkpoint", str(run), "--epochs", "1"]) == 0
    saved = json.loads((run / "eval_finetune.json").read_text())
    assert saved["recipe"]["optimizer"] == "adamw" and saved["recipe"]["schedule"] == "linear"
    assert saved["recipe"]["dropout"] == 0.1 and saved["recipe"]["batch_size"] == 32 and len(saved["curve"]) == 1

    method, cfg, _ = load_method(run, torch.device("cpu"))
    before = {k: v.clone() for k, v in method.named_parameters()}
    train, test = load_feature_split(cfg, "train"), load_feature_split(cfg, "test")
    res = finetune(method, train, test, epochs=15, lr=3e-3, progress=False, return_model=True)
    assert res["train_loss"][-1] < 0.5 * res["train_loss"][0] and res["last_top1"] == 100.0
    assert all(torch.equal(before[k], v) for k, v in method.named_parameters())
    with pytest.raises(ValueError, match="apply to images"):
        finetune(method, train, test, epochs=1, mixup=0.8)
