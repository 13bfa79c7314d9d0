"""T5 span corruption (selfsup.methods.t5): a tiny encoder-decoder on tiny-shakespeare BPE tokens."""

import gzip
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from selfsup.backbones.text import TextEncoder
from selfsup.config import load_config
from selfsup.data.text import EMBEDDED_TEXT_FILE
from selfsup.errors import ConfigError
from selfsup.methods.t5 import T5Config, T5SpanCorruption
from selfsup.pretext.text_masking import random_spans_noise_mask, span_corruption
from selfsup.pretext.text_tokenizer import train_tokenizer
from selfsup.registry import get_method

SEQ = 64  # round(0.15 * 64) = 10 noise tokens in round(10 / 3) = 3 spans
INPUTS, TARGETS = SEQ - 10 + 3 + 1, 10 + 3 + 1  # 58 encoder inputs, 14 targets


def _lines(n: int = 400) -> list[str]:
    with gzip.open(EMBEDDED_TEXT_FILE, "rt", encoding="utf-8") as f:
        return [next(f) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("bpe", _lines(), 512, sentinels=100)


def _model(tok, max_len: int = SEQ + 1, **cfg) -> T5SpanCorruption:
    enc = TextEncoder(vocab_size=tok.vocab_size, max_len=max_len, embed_dim=32, depth=2, num_heads=2, tokenizer=tok)
    return T5SpanCorruption(T5Config(**cfg), enc)


def _batch(tok, b: int = 4) -> dict[str, torch.Tensor]:
    """Training blocks of SEQ + 1 tokens, as the text data gives them."""
    ids = tok.encode("".join(_lines()))[: b * (SEQ + 1)]
    return {"tokens": torch.tensor(ids).view(b, SEQ + 1)}


def test_registered_with_its_sentinels():
    cls = get_method("t5")
    assert cls is T5SpanCorruption and cls.family == "masked" and cls.default_tokenizer == "bpe"
    assert cls.sentinels(T5Config()) == 100
    assert cls.sentinels(T5Config(max_sentinels=7)) == 7
    with pytest.raises(ConfigError, match="noise_density"):
        T5Config(noise_density=1.5).validate()


def test_forward_loss_and_gradients_reach_encoder_and_decoder(tok):
    model = _model(tok)
    out = model(_batch(tok))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert 0.0 <= float(out.metrics["span_acc"]) <= 1.0
    out.loss.backward()
    enc, dec = model.backbone.model, model.decoder
    for name, p in [("encoder qkv", enc.blocks[0].qkv.weight), ("encoder positions", enc.pos_embed),
                    ("shared embedding", enc.tok_embed.weight), ("decoder cross-attention", dec.blocks[0].kv.weight),
                    ("decoder self-attention", dec.blocks[-1].qkv.weight), ("decoder positions", dec.pos_embed)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_shared_embedding_and_optional_output_scale(tok):
    model = _model(tok)
    assert model.head.weight is model.backbone.model.tok_embed.weight
    assert model.out_scale == 1.0  # off by default: it pairs with T5's std-1 embeddings, not our 0.02
    assert _model(tok, scale_output=True).out_scale == pytest.approx(32**-0.5)
    untied = _model(tok, tie_weights=False, scale_output=True)
    assert untied.head.weight is not untied.backbone.model.tok_embed.weight and untied.out_scale == 1.0


def test_shapes_start_token_and_eos(tok):
    model = _model(tok)
    inputs, targets = model.corrupt(model.inputs(_batch(tok)))
    assert inputs.shape == (4, INPUTS) and targets.shape == (4, TARGETS)
    assert (inputs[:, -1] == tok.sep_id).all() and (targets[:, -1] == tok.sep_id).all()  # [SEP] as T5's EOS
    assert (targets[:, 0] == tok.sentinel_ids(1)[0]).all()  # rows start with non-noise: <extra_id_0> first
    dec_in = model.shift_right(targets)
    assert (dec_in[:, 0] == tok.pad_id).all() and torch.equal(dec_in[:, 1:], targets[:, :-1])


def test_decoder_is_causal_and_encoder_bidirectional(tok):
    model = _model(tok).eval()
    inputs, targets = model.corrupt(model.inputs(_batch(tok)))
    dec_in = model.shift_right(targets)
    base = model.logits(inputs, dec_in)
    k = TARGETS // 2
    changed = dec_in.clone()
    changed[:, k] = (changed[:, k] + 1) % tok.vocab_size
    after = model.logits(inputs, changed)
    assert torch.allclose(base[:, :k], after[:, :k], atol=1e-6)  # earlier positions never see a later input
    assert not torch.allclose(base[:, k:], after[:, k:], atol=1e-4)
    late = inputs.clone()
    late[:, -2] = (late[:, -2] + 1) % tok.vocab_size
    assert not torch.allclose(base[:, 0], model.logits(late, dec_in)[:, 0], atol=1e-4)  # the encoder sees it all


def test_loss_counts_only_target_tokens(tok):
    model = _model(tok)
    batch = _batch(tok)
    torch.manual_seed(5)
    loss = model(batch).loss
    torch.manual_seed(5)  # the same noise again
    inputs, targets = model.corrupt(model.inputs(batch))
    logits = model.logits(inputs, model.shift_right(targets))
    assert logits.shape[:2] == (4, TARGETS)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)
    assert model.eval().lm_scores(batch)["count"] == 4 * TARGETS  # not 4 * SEQ


def test_lm_scores_are_deterministic(tok):
    model = _model(tok).eval()
    batch = _batch(tok)
    torch.manual_seed(1)
    a = model.lm_scores(batch)
    torch.manual_seed(2)  # the global generator plays no part
    b = model.lm_scores(batch)
    assert a == b
    assert a["nll"] > 0 and 0 <= a["correct"] <= a["count"] == 4 * TARGETS


def test_too_short_encoder_or_decoder_is_a_config_error(tok):
    with pytest.raises(ConfigError, match="backbone.max_len"):
        _model(tok, max_len=INPUTS - 1)(_batch(tok))
    _model(tok, max_len=INPUTS)(_batch(tok))  # exactly enough
    with pytest.raises(ConfigError, match="max_target_len"):
        _model(tok, max_target_len=TARGETS - 1)(_batch(tok))


def test_too_few_sentinels_is_a_config_error():
    few = train_tokenizer("bpe", _lines(), 512, sentinels=2)  # 3 spans need 3
    with pytest.raises(ConfigError, match="sentinel") as err:
        _model(few)(_batch(few))
    assert "\n" not in str(err.value)
    enough = train_tokenizer("bpe", _lines(), 512, sentinels=3)
    assert torch.isfinite(_model(enough)(_batch(enough)).loss)


def test_encode_reads_the_encoder(tok):
    model = _model(tok).eval()
    tokens = _batch(tok)["tokens"][:, :SEQ]
    mask = torch.ones_like(tokens)
    feats = model.embed({"tokens": tokens, "attention_mask": mask})
    assert feats.shape == (4, 32)
    assert torch.allclose(feats, model.backbone(tokens, mask), atol=1e-6)


def test_training_reduces_the_loss(tok):
    model = _model(tok)
    batch = _batch(tok)
    before = model.eval().lm_scores(batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.eval().lm_scores(batch)
    # nats per target token: ln(612) = 6.42 at init, about 4.2 after these steps
    assert after["nll"] / after["count"] < before["nll"] / before["count"] - 1.0


def test_recipes_match_t5_lengths():
    root = Path(__file__).parents[1] / "configs" / "t5"
    for recipe in ("shakespeare_cpu.yaml", "t5_base.yaml"):
        cfg = load_config(root / recipe)
        assert cfg.method.name == "t5" and cfg.data.tokenizer == "bpe"
        seq = cfg.data.seq_len
        noise = random_spans_noise_mask(1, seq, noise_density=cfg.method.noise_density, mean_span=cfg.method.mean_span)
        inputs, targets = span_corruption(torch.zeros(1, seq, dtype=torch.long), noise, torch.arange(100) + 1, eos_id=0)
        assert inputs.shape[1] <= (cfg.backbone.max_len or seq + 1)
        assert targets.shape[1] <= cfg.method.max_target_len
    base = load_config(root / "t5_base.yaml")
    # T5's random_spans_helper(512, 0.15, 3, 1, 1): 568 raw tokens give 512 inputs and 114 targets
    assert (base.data.seq_len, base.backbone.max_len, base.method.max_target_len) == (568, 512, 114)
    assert (base.data.batch_size, base.trainer.max_steps) == (128, 2**19)
