"""Text masking: BERT/RoBERTa MLM corruption and T5 span corruption (selfsup.pretext.text_masking)."""

import math

import pytest
import torch

from selfsup.pretext.text_masking import (
    IGNORE_INDEX,
    mlm_mask,
    random_spans_noise_mask,
    span_corruption,
)

PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIALS = [PAD, CLS, SEP, MASK]
VOCAB = 30522


def _batch(b, length, seed=0, min_len=None):
    """Token rows ``[CLS] w ... w [SEP] [PAD] ...`` of random lengths, ids >= 4."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, VOCAB, (b, length), generator=g)
    lengths = torch.randint(min_len or 3, length + 1, (b,), generator=g)
    pos = torch.arange(length)
    tokens[:, 0] = CLS
    tokens[pos >= lengths[:, None]] = PAD
    tokens[pos == (lengths[:, None] - 1)] = SEP
    return tokens


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def _span_starts(mask):
    prev = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
    return mask & ~prev


# ------------------------------------------------------------------------------------ mlm_mask


def test_selected_fraction_and_per_row_count():
    tokens = _batch(1024, 256)
    eligible = ~torch.isin(tokens, torch.tensor(SPECIALS))
    _, labels = mlm_mask(tokens, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS,
                         generator=_gen())
    selected = labels != IGNORE_INDEX
    frac = selected.sum().item() / eligible.sum().item()
    assert abs(frac - 0.15) < 0.005
    # Probabilistic rounding: every row gets floor(0.15 n) or floor(0.15 n) + 1.
    n = eligible.sum(1).double()
    count = selected.sum(1).double()
    assert ((count - (0.15 * n).floor()).abs() <= 1).all()
    assert (count >= (0.15 * n).floor()).all()


def test_count_uses_probabilistic_rounding():
    # 10 eligible tokens at p = 0.15: 1.5 expected, so half the rows pick 1 and half pick 2
    # (fairseq's floor(p n + U)), where plain rounding would always pick 2.
    tokens = torch.full((4000, 12), 50)
    tokens[:, 0], tokens[:, -1] = CLS, SEP
    _, labels = mlm_mask(tokens, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS,
                         generator=_gen())
    count = (labels != IGNORE_INDEX).sum(1)
    assert set(count.tolist()) == {1, 2}
    assert (count == 2).float().mean().item() == pytest.approx(0.5, abs=0.03)
    # Each eligible position is equally likely.
    rate = (labels[:, 1:-1] != IGNORE_INDEX).float().mean(0)
    assert (rate - 0.15).abs().max() < 0.025


def test_replacement_split_80_10_10():
    tokens = _batch(2048, 512, min_len=400)
    inputs, labels = mlm_mask(tokens, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS,
                              generator=_gen())
    selected = labels != IGNORE_INDEX
    total = selected.sum().item()
    assert total >= 100_000
    masked = (selected & (inputs == MASK)).sum().item() / total
    unchanged = (selected & (inputs == tokens)).sum().item() / total
    randomized = (selected & (inputs != MASK) & (inputs != tokens)).sum().item() / total
    assert abs(masked - 0.8) < 0.005
    assert abs(unchanged - 0.1) < 0.005
    assert abs(randomized - 0.1) < 0.005
    # Random ids come from the whole vocabulary.
    rand_ids = inputs[selected & (inputs != MASK) & (inputs != tokens)]
    assert rand_ids.min() >= 0 and rand_ids.max() < VOCAB
    assert rand_ids.float().mean().item() == pytest.approx(VOCAB / 2, rel=0.02)


def test_specials_never_selected_or_changed_and_labels():
    tokens = _batch(256, 64)
    special = torch.isin(tokens, torch.tensor(SPECIALS))
    inputs, labels = mlm_mask(tokens, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS,
                              prob=0.5, generator=_gen())
    selected = labels != IGNORE_INDEX
    assert not (selected & special).any()
    assert torch.equal(inputs[special], tokens[special])
    # Labels: the original token exactly where selected, -100 exactly elsewhere.
    assert torch.equal(labels[selected], tokens[selected])
    assert (labels[~selected] == IGNORE_INDEX).all()
    # Nothing outside the selection changes.
    assert torch.equal(inputs[~selected], tokens[~selected])
    assert inputs.shape == labels.shape == tokens.shape
    assert inputs.dtype == labels.dtype == tokens.dtype


def test_special_ids_as_tensor_and_only_specials_row():
    tokens = torch.tensor([[CLS, SEP, PAD, PAD], [CLS, 10, 11, SEP]])
    inputs, labels = mlm_mask(tokens, vocab_size=100, mask_id=MASK,
                              special_ids=torch.tensor(SPECIALS), prob=0.99, generator=_gen())
    assert torch.equal(inputs[0], tokens[0]) and (labels[0] == IGNORE_INDEX).all()
    assert (labels[1, [0, 3]] == IGNORE_INDEX).all()


def _word_batch(b, seed=0):
    """Rows [CLS] words... [SEP] [PAD]...: word 0 has 10 tokens, the others 1 to 3."""
    g = torch.Generator().manual_seed(seed)
    length = 64
    word_lengths = torch.randint(1, 4, (b, length), generator=g)
    word_lengths[:, 0] = 10
    num_words = torch.randint(5, 20, (b,), generator=g)
    # Token i (from position 1) belongs to word searchsorted(cumsum(lengths), i, right).
    ends = word_lengths.cumsum(1)
    pos = torch.arange(length - 2).expand(b, -1).contiguous()
    wid = torch.searchsorted(ends, pos, right=True)
    words_len = ends.gather(1, (num_words - 1)[:, None])  # tokens in the row's words
    inside = pos < words_len
    word_ids = torch.full((b, length), -1)
    word_ids[:, 1:-1] = torch.where(inside, wid, torch.full_like(wid, -1))
    tokens = torch.randint(4, VOCAB, (b, length), generator=g)
    tokens[word_ids < 0] = PAD
    tokens[:, 0] = CLS
    sep_at = (words_len + 1).squeeze(1)
    tokens[torch.arange(b), sep_at] = SEP
    return tokens, word_ids, num_words


def test_whole_word_masking_selects_words_together():
    tokens, word_ids, num_words = _word_batch(2000)
    prob = 0.3
    inputs, labels = mlm_mask(tokens, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS,
                              prob=prob, word_ids=word_ids, generator=_gen())
    selected = labels != IGNORE_INDEX
    assert not (selected & (word_ids < 0)).any()
    # Per word: all of its tokens selected or none.
    slot = word_ids.clamp(min=0)
    in_word = (word_ids >= 0).long()
    tokens_per_word = torch.zeros_like(slot).scatter_add_(1, slot, in_word)
    selected_per_word = torch.zeros_like(slot).scatter_add_(1, slot, (selected & (word_ids >= 0)).long())
    assert ((selected_per_word == 0) | (selected_per_word == tokens_per_word)).all()
    # Words are the unit: floor(p * n_words + U) words per row, whatever their lengths.
    words_chosen = ((selected_per_word > 0) & (tokens_per_word > 0)).sum(1)
    low = (prob * num_words).floor().long()
    assert ((words_chosen == low) | (words_chosen == low + 1)).all()
    assert words_chosen.float().mean().item() == pytest.approx(prob * num_words.float().mean().item(),
                                                               rel=0.02)
    # The 10-token word 0 is drawn as often as any other word, not 10 times as often.
    first_word_rate = (selected_per_word[:, 0] > 0).float().mean().item()
    assert abs(first_word_rate - words_chosen.sum().item() / num_words.sum().item()) < 0.03
    # Replacement stays per token: some selected words mix [MASK] with kept tokens.
    is_mask = torch.zeros_like(slot).scatter_add_(1, slot, (selected & (inputs == MASK)).long())
    mixed = (selected_per_word > 1) & (is_mask > 0) & (is_mask < selected_per_word)
    assert mixed.any()


def test_whole_word_bad_word_ids():
    tokens = _batch(2, 8)
    with pytest.raises(ValueError, match="word_ids"):
        mlm_mask(tokens, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS,
                 word_ids=torch.full((2, 8), 8))
    with pytest.raises(ValueError, match="shape"):
        mlm_mask(tokens, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS,
                 word_ids=torch.zeros((2, 7), dtype=torch.long))


def test_mlm_generator_determinism():
    tokens = _batch(32, 64)
    kwargs = {"vocab_size": VOCAB, "mask_id": MASK, "special_ids": SPECIALS}
    a = mlm_mask(tokens, **kwargs, generator=_gen(7))
    b = mlm_mask(tokens, **kwargs, generator=_gen(7))
    c = mlm_mask(tokens, **kwargs, generator=_gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    torch.manual_seed(3)
    d = mlm_mask(tokens, **kwargs)
    torch.manual_seed(3)
    e = mlm_mask(tokens, **kwargs)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


@pytest.mark.parametrize("kwargs", [
    {"prob": 0.0}, {"prob": 1.0}, {"prob": -0.1},
    {"mask_frac": 0.8, "random_frac": 0.3}, {"mask_frac": -0.1}, {"random_frac": -0.1},
    {"vocab_size": 0},
])
def test_mlm_bad_args(kwargs):
    args = {"vocab_size": VOCAB, "mask_id": MASK, "special_ids": SPECIALS} | kwargs
    with pytest.raises(ValueError):
        mlm_mask(_batch(2, 8), **args)


def test_mlm_bad_tokens():
    with pytest.raises(ValueError, match="tokens"):
        mlm_mask(torch.zeros(8, dtype=torch.long), vocab_size=VOCAB, mask_id=MASK,
                 special_ids=SPECIALS)
    with pytest.raises(ValueError, match="tokens"):
        mlm_mask(torch.zeros(2, 8), vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS)


# ------------------------------------------------------------------------ random spans (T5)


def test_random_spans_counts_and_shape():
    b, length = 4000, 512
    mask = random_spans_noise_mask(b, length, generator=_gen())
    assert mask.shape == (b, length) and mask.dtype == torch.bool
    num_noise, num_spans = round(512 * 0.15), round(77 / 3)  # 77, 26
    assert (mask.sum(1) == num_noise).all()
    starts = _span_starts(mask)
    assert (starts.sum(1) == num_spans).all()
    assert not mask[:, 0].any()  # starts with non-noise
    assert mask[:, -1].all()     # T5 interleaves (non-noise, noise) pairs: ends with noise
    # Rows draw their own spans.
    assert len({tuple(r) for r in mask[:50].int().tolist()}) == 50


def test_random_spans_lengths_follow_uniform_segmentation():
    mask = random_spans_noise_mask(4000, 512, generator=_gen())
    # Span lengths: run ends minus run starts, over all rows.
    nxt = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    ends = (mask & ~nxt).nonzero()[:, 1]
    starts = _span_starts(mask).nonzero()[:, 1]
    lengths = (ends - starts + 1).float()
    assert lengths.min() >= 1
    assert lengths.mean().item() == pytest.approx(3.0, abs=0.05)
    # A uniform split of 77 tokens into 26 spans: P(a span has 1 token) = 25 / 76.
    assert (lengths == 1).float().mean().item() == pytest.approx(25 / 76, abs=0.01)
    assert lengths.max() > 8  # not equal spans


def test_random_spans_match_t5_rounding_and_short_lengths():
    # T5 (float32, ties to even): length 30 -> round(4.5) = 4 noise tokens in round(4/3) = 1
    # span, which must end the row; length 31 -> 5 tokens in 2 spans.
    mask = random_spans_noise_mask(20, 30, generator=_gen())
    expected = torch.tensor([False] * 26 + [True] * 4)
    assert (mask == expected).all()
    mask = random_spans_noise_mask(200, 31, generator=_gen())
    assert (mask.sum(1) == 5).all() and (_span_starts(mask).sum(1) == 2).all()
    assert torch.equal(random_spans_noise_mask(3, 1), torch.zeros(3, 1, dtype=torch.bool))
    assert torch.equal(random_spans_noise_mask(2, 2), torch.tensor([[False, True]] * 2))


def test_random_spans_high_density_reduces_spans():
    # 20 tokens at density 0.9: 18 noise, round(18 / 1) = 18 spans but only 2 non-noise tokens.
    mask = random_spans_noise_mask(50, 20, noise_density=0.9, mean_span=1.0, generator=_gen())
    assert (mask.sum(1) == 18).all()
    assert (_span_starts(mask).sum(1) == 2).all()
    assert not mask[:, 0].any()


def test_random_spans_determinism_and_device():
    a = random_spans_noise_mask(8, 100, generator=_gen(5))
    b = random_spans_noise_mask(8, 100, generator=_gen(5))
    assert torch.equal(a, b)
    assert a.device == torch.device("cpu")


@pytest.mark.parametrize("kwargs", [
    {"noise_density": 0.0}, {"noise_density": 1.0}, {"mean_span": 0.5},
    {"length": 0}, {"batch": -1},
])
def test_random_spans_bad_args(kwargs):
    args = {"batch": 2, "length": 10} | kwargs
    with pytest.raises(ValueError):
        random_spans_noise_mask(args.pop("batch"), args.pop("length"), **args)


# --------------------------------------------------------------------------- span corruption

WORDS = ["Thank", "you", "for", "inviting", "me", "to", "your", "party", "last", "week", "."]
ID = {w: 10 + i for i, w in enumerate(WORDS)}
X, Y, Z = 100, 99, 98  # <extra_id_0>, <extra_id_1>, <extra_id_2>, decreasing as in T5
SENTINELS = torch.tensor([X, Y, Z, 97])
EOS = 1


def _ids(text):
    return [ID.get(w, {"<X>": X, "<Y>": Y, "<Z>": Z, "</s>": EOS}.get(w)) for w in text.split()]


def test_span_corruption_paper_example():
    tokens = torch.tensor([_ids(" ".join(WORDS))])
    noisy = {"for", "inviting", "last"}
    mask = torch.tensor([[w in noisy for w in WORDS]])
    inputs, targets = span_corruption(tokens, mask, SENTINELS, EOS)
    assert inputs.tolist() == [_ids("Thank you <X> me to your party <Y> week . </s>")]
    assert targets.tolist() == [_ids("<X> for inviting <Y> last <Z> </s>")]


def test_span_corruption_follows_t5_code_when_row_starts_with_noise():
    # T5's targets come from the inverted mask: non-noise span k -> sentinel k. A leading
    # noise span therefore opens the targets with its tokens, and no sentinel follows a
    # trailing noise span.
    tokens = torch.tensor([_ids("Thank you for inviting me")])
    mask = torch.tensor([[True, False, False, True, True]])
    inputs, targets = span_corruption(tokens, mask, SENTINELS, EOS)
    assert inputs.tolist() == [[X, ID["you"], ID["for"], Y, EOS]]
    assert targets.tolist() == [[ID["Thank"], X, ID["inviting"], ID["me"], EOS]]


def test_span_corruption_batch_shapes_and_content():
    b, length = 64, 568
    g = _gen()
    tokens = torch.randint(200, 32000, (b, length), generator=g)
    mask = random_spans_noise_mask(b, length, generator=g)
    extra_ids = 32099 - torch.arange(100)
    inputs, targets = span_corruption(tokens, mask, extra_ids, eos_id=EOS)
    # T5's random_spans_helper(512, 0.15, 3, 1, 1) -> tokens_length 568, targets_length 114.
    assert inputs.shape == (b, 512) and targets.shape == (b, 114)
    assert (inputs[:, -1] == EOS).all() and (targets[:, -1] == EOS).all()
    # Inputs keep exactly the non-noise tokens; targets exactly the noise tokens, in order.
    is_sentinel_in = inputs[:, :-1] >= 32000
    is_sentinel_tg = targets[:, :-1] >= 32000
    assert torch.equal(inputs[:, :-1][~is_sentinel_in], tokens[~mask])
    assert torch.equal(targets[:, :-1][~is_sentinel_tg], tokens[mask])
    # Sentinels come in order <extra_id_0>, <extra_id_1>, ... and targets start with one.
    num_spans = 28
    expected = extra_ids[:num_spans].expand(b, -1)
    assert torch.equal(inputs[:, :-1][is_sentinel_in].view(b, -1), expected)
    assert torch.equal(targets[:, :-1][is_sentinel_tg].view(b, -1), expected)
    assert (targets[:, 0] == extra_ids[0]).all()


def test_span_corruption_bad_args():
    tokens = torch.tensor([_ids("Thank you for inviting me"), _ids("to your party last week")])
    ragged = torch.tensor([[False, True, False, False, False], [False, True, True, False, False]])
    with pytest.raises(ValueError, match="lengths"):
        span_corruption(tokens, ragged, SENTINELS, EOS)
    alternating = torch.tensor([[False, True, False, True, False]] * 2)
    with pytest.raises(ValueError, match="sentinel"):
        span_corruption(tokens, alternating, SENTINELS[:2], EOS)
    with pytest.raises(ValueError, match="noise_mask"):
        span_corruption(tokens, alternating.long(), SENTINELS, EOS)
    with pytest.raises(ValueError, match="noise_mask"):
        span_corruption(tokens, alternating[:, :4], SENTINELS, EOS)
    with pytest.raises(ValueError, match="sentinel_ids"):
        span_corruption(tokens, alternating, SENTINELS.float(), EOS)


def test_mean_span_close_to_three_for_default_density():
    # Over many lengths the realized mean span is num_noise / num_spans, near mean_span.
    means = []
    for length in range(100, 1100, 100):
        mask = random_spans_noise_mask(2, length, generator=_gen())
        means.append(mask.sum().item() / _span_starts(mask).sum().item())
    assert all(math.isclose(m, 3.0, abs_tol=0.25) for m in means)
