"""Token masking for text pretraining: BERT/RoBERTa masked language modeling and T5 span
corruption, batched and on the tokens' device.

Like :mod:`selfsup.pretext.masking`, every function draws a whole batch at once from one
optional ``torch.Generator`` (else the global RNG): per-row choices come from ``rand`` noise
ranked with ``argsort``, spans from cumulative sums, and outputs are gathered or boolean-masked
in one go. No Python loop runs over rows or tokens.

Functions (paper, reference code the details follow):

* :func:`mlm_mask`: masked language modeling (Devlin, Chang, Lee, Toutanova, 2019, "BERT:
  Pre-training of Deep Bidirectional Transformers for Language Understanding", NAACL, sec. 3.1;
  Liu et al., 2019, "RoBERTa: A Robustly Optimized BERT Pretraining Approach", sec. 4.1,
  dynamic masking). Counts follow fairseq ``data/mask_tokens_dataset.py`` (MaskTokensDataset);
  the 80/10/10 replacement and whole word masking follow google-research/bert
  ``create_pretraining_data.py`` and Hugging Face ``DataCollatorForLanguageModeling`` /
  ``DataCollatorForWholeWordMask``.
* :func:`random_spans_noise_mask` and :func:`span_corruption`: T5's span corruption (Raffel,
  Shazeer, Roberts, Lee, Narang, Matena, Zhou, Li, Liu, 2020, "Exploring the Limits of Transfer
  Learning with a Unified Text-to-Text Transformer", JMLR, sec. 3.1.4 and Fig. 2),
  google-research/text-to-text-transfer-transformer ``t5/data/preprocessors.py``:
  ``random_spans_noise_mask``, ``noise_span_to_unique_sentinel`` (inputs) and
  ``nonnoise_span_to_unique_sentinel`` (targets).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from selfsup.pretext.masking import _device

__all__ = [
    "IGNORE_INDEX",
    "mlm_mask",
    "random_spans_noise_mask",
    "span_corruption",
]

IGNORE_INDEX = -100
"""Label of positions that are not predicted: ``torch.nn.functional.cross_entropy``'s default
``ignore_index``, the value Hugging Face's collators use."""

_INT_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------
# helpers


def _check_ids(name: str, ids: Tensor) -> None:
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in _INT_DTYPES:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an int64 (or int32) tensor of shape (B, L), got {got}")


def _choose(candidates: Tensor, prob: float, generator: torch.Generator | None) -> Tensor:
    """Per row of ``candidates`` (B, N) bool, ``floor(prob * n + U)`` of its n True entries,
    chosen uniformly without replacement (U ~ U[0, 1) per row).

    The count is fairseq MaskTokensDataset's probabilistic rounding: its expectation is exactly
    ``prob * n``, so short rows are masked at the same rate as long ones on average. One sort
    for the batch: non-candidates get +inf noise, so the first ``count`` ranks are candidates.
    """
    batch, n = candidates.shape
    device = candidates.device
    available = candidates.sum(dim=1)
    u = torch.rand(batch, generator=generator, device=device)
    count = (prob * available + u).floor().long().clamp_(max=available)
    noise = torch.rand((batch, n), generator=generator, device=device)
    order = noise.masked_fill_(~candidates, float("inf")).argsort(dim=1)
    ranks = torch.arange(n, device=device).expand(batch, n)
    return torch.zeros_like(candidates).scatter_(1, order, ranks < count.unsqueeze(1))


def _tf_round(x: float, y: float, *, divide: bool = False) -> int:
    """``tf.round(float32(x) * y)`` (or ``/ y``), T5's arithmetic for its counts: the product
    in float32, then the nearest integer with ties to even (``round(4.5) == 4``). Doing the
    same keeps our counts equal to T5's at the .5 boundaries (length 30 at density 0.15 gives
    4 noise tokens, not 5)."""
    a = torch.tensor(float(x), dtype=torch.float32)
    b = torch.tensor(float(y), dtype=torch.float32)
    return int((a / b if divide else a * b).round().item())


def _random_segmentation(batch: int, num_items: int, num_segments: int,
                         generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Lengths (B, num_segments) of a uniformly random split of ``num_items`` into
    ``num_segments`` non-empty segments, one split per row (T5's ``_random_segmentation``:
    ``num_segments - 1`` segment starts shuffled among the ``num_items - 1`` gaps)."""
    gaps = num_items - 1
    order = torch.rand((batch, gaps), generator=generator, device=device).argsort(dim=1)
    first_in_segment = torch.zeros((batch, num_items), dtype=torch.long, device=device)
    # Gap g sits before item g + 1, so a chosen gap marks item g + 1 as a segment start.
    first_in_segment.scatter_(1, order[:, : num_segments - 1] + 1, 1)
    segment_id = first_in_segment.cumsum(dim=1)
    lengths = torch.zeros((batch, num_segments), dtype=torch.long, device=device)
    return lengths.scatter_add_(1, segment_id, torch.ones_like(segment_id))


def _spans_to_sentinels(tokens: Tensor, mask: Tensor, sentinel_ids: Tensor, what: str) -> Tensor:
    """T5's ``noise_span_to_unique_sentinel``, batched: the k-th run of True in each row of
    ``mask`` becomes the single token ``sentinel_ids[k]``; tokens outside runs are kept.

    Rows must come out equally long (dense output); ``what`` names the output in errors.
    """
    batch = tokens.shape[0]
    prev = torch.cat([mask.new_zeros((batch, 1)), mask[:, :-1]], dim=1)
    first = mask & ~prev
    later = mask & prev
    runs = first.sum(dim=1)
    needed = int(runs.max()) if batch else 0
    if needed > sentinel_ids.numel():
        raise ValueError(
            f"{what} need {needed} sentinel ids (one per span) but sentinel_ids has "
            f"{sentinel_ids.numel()}"
        )
    # Run index k of each token (-1 before the first run); clamped only to keep the gather in
    # range where ``first`` is False and the gathered value is discarded.
    run_index = (first.cumsum(dim=1) - 1).clamp_(min=0)
    sentinels = sentinel_ids[run_index] if needed else torch.zeros_like(tokens)
    out = torch.where(first, sentinels, tokens)
    keep = ~later
    width = keep.sum(dim=1)
    if batch and bool((width != width[0]).any()):
        raise ValueError(
            f"{what} would have different lengths across rows ({sorted(set(width.tolist()))}); "
            "a dense batch needs the same number of noise tokens and of spans in every row, "
            "as random_spans_noise_mask gives"
        )
    return out[keep].reshape(batch, int(width[0]) if batch else 0)


# ----------------------------------------------------------------------------------------------
# BERT / RoBERTa masked language modeling


def mlm_mask(tokens: Tensor, *, vocab_size: int, mask_id: int, special_ids: Sequence[int] | Tensor,
             prob: float = 0.15, mask_frac: float = 0.8, random_frac: float = 0.1,
             word_ids: Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT's masked-language-model corruption with RoBERTa's per-row counts, batched.

    Selection: in each row, ``floor(prob * n + U)`` of its n eligible tokens (U ~ U[0, 1)),
    uniformly without replacement, as fairseq's MaskTokensDataset counts (RoBERTa, Liu et al.,
    2019). Tokens whose id is in ``special_ids`` (pad, cls, sep, mask, ...) are never eligible;
    unlike fairseq, which counts and may mask ``<s>``/``</s>``, n counts eligible tokens only, as
    Hugging Face's collator excludes special tokens.

    Whole word masking (``word_ids`` given): ``word_ids[b, i]`` is the index of token i's word
    in row b (unique per word within a row, in [0, L); -1 for special and pad tokens). Words,
    not tokens, are then drawn, ``floor(prob * n_words + U)`` of them (fairseq's
    ``mask_whole_words`` count), and every eligible token of a drawn word is selected (BERT's
    whole word masking, ``create_pretraining_data.py``).

    Replacement, decided per selected token independently (BERT and Hugging Face decide per
    token even under whole word masking; fairseq decides per word): with ``mask_frac`` (0.8)
    ``mask_id``, with ``random_frac`` (0.1) a uniform id in ``[0, vocab_size)`` (the whole
    vocabulary, as BERT and Hugging Face draw; fairseq excludes special symbols), otherwise
    the token is left unchanged.

    Returns ``(inputs, labels)``, both like ``tokens``: ``labels`` holds the original token at
    selected positions and :data:`IGNORE_INDEX` (-100) elsewhere.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> tokens = torch.randint(5, 1000, (8, 128), generator=g)
        >>> tokens[:, 0], tokens[:, -1] = 1, 2                      # cls, sep
        >>> inputs, labels = mlm_mask(tokens, vocab_size=1000, mask_id=3,
        ...                           special_ids=[0, 1, 2, 3], generator=g)
        >>> loss_positions = labels != IGNORE_INDEX                  # about 15% of each row
    """
    _check_ids("tokens", tokens)
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob must be in (0, 1), got {prob!r}")
    if mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1.0:
        raise ValueError(
            "mask_frac and random_frac must be >= 0 with mask_frac + random_frac <= 1 (the rest "
            f"is left unchanged), got mask_frac={mask_frac!r}, random_frac={random_frac!r}"
        )
    if int(vocab_size) < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size!r}")

    specials = torch.as_tensor(special_ids, dtype=tokens.dtype, device=tokens.device).reshape(-1)
    eligible = ~torch.isin(tokens, specials)

    if word_ids is None:
        selected = _choose(eligible, prob, generator)
    else:
        _check_ids("word_ids", word_ids)
        if word_ids.shape != tokens.shape:
            raise ValueError(
                f"word_ids must have the shape of tokens {tuple(tokens.shape)}, "
                f"got {tuple(word_ids.shape)}"
            )
        length = tokens.shape[1]
        if word_ids.numel() and int(word_ids.max()) >= length:
            raise ValueError(
                f"word_ids must be word indices within the row, in [-1, {length}), "
                f"got a maximum of {int(word_ids.max())}"
            )
        in_word = eligible & (word_ids >= 0)
        slot = word_ids.clamp(min=0)
        # Word slot w of a row is a candidate if some eligible token belongs to word w; a sum
        # rather than a scatter of booleans, whose result with repeated indices is unspecified.
        present = torch.zeros_like(slot).scatter_add_(1, slot, in_word.long()) > 0
        chosen_words = _choose(present, prob, generator)
        selected = chosen_words.gather(1, slot) & in_word

    action = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    to_mask = selected & (action < mask_frac)
    to_random = selected & (action >= mask_frac) & (action < mask_frac + random_frac)
    random_ids = torch.randint(0, int(vocab_size), tokens.shape, generator=generator,
                               device=tokens.device, dtype=tokens.dtype)

    inputs = torch.where(to_mask, torch.full_like(tokens, int(mask_id)), tokens)
    inputs = torch.where(to_random, random_ids, inputs)
    labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return inputs, labels


# ----------------------------------------------------------------------------------------------
# T5 span corruption


def random_spans_noise_mask(batch: int, length: int, *, noise_density: float = 0.15,
                            mean_span: float = 3.0, generator: torch.Generator | None = None,
                            device: torch.device | str | None = None) -> Tensor:
    """T5's noise mask of random spans (Raffel et al., 2020, sec. 3.1.4), one per row: (B, L)
    bool, True = noise.

    As ``random_spans_noise_mask`` in T5's ``preprocessors.py``, the counts are the same in
    every row and deterministic:

        num_noise = round(length * noise_density), clipped to [1, length - 1]
        num_spans = max(1, round(num_noise / mean_span))

    (rounded in float32, ties to even, as ``tf.round``). The noise tokens and the
    ``length - num_noise`` non-noise tokens are each split into ``num_spans`` non-empty
    segments uniformly at random, and the spans alternate non-noise, noise, non-noise, ...:
    every row starts with non-noise and, as in T5, ends with noise. Given the counts, every
    such mask is equally likely; each row draws its own.

    Departure: where ``length - num_noise < num_spans`` (very high densities), T5's code has
    too few non-noise tokens to give every noise span a non-noise span before it and fails;
    here ``num_spans`` drops to ``length - num_noise`` so the mask is still well formed.

    Example::

        >>> mask = random_spans_noise_mask(4, 512, generator=torch.Generator().manual_seed(0))
        >>> mask.sum(1)                     # round(512 * 0.15) = 77 in every row, in 26 spans
        tensor([77, 77, 77, 77])
    """
    if int(batch) < 0 or int(length) < 1:
        raise ValueError(f"batch must be >= 0 and length >= 1, got batch={batch!r}, "
                         f"length={length!r}")
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density!r}")
    if not mean_span >= 1.0:
        raise ValueError(
            f"mean_span must be >= 1 (a span has at least one token), got {mean_span!r}")
    device = _device(device, generator)
    batch, orig_length = int(batch), int(length)
    # T5 builds masks of length >= 2 and truncates, so a 1-token row is one non-noise token.
    length = max(orig_length, 2)

    num_noise = min(max(_tf_round(length, noise_density), 1), length - 1)
    num_nonnoise = length - num_noise
    num_spans = max(_tf_round(num_noise, mean_span, divide=True), 1)
    # The departure above; mean_span >= 1 already keeps num_spans <= num_noise.
    num_spans = min(num_spans, num_nonnoise)

    noise_lengths = _random_segmentation(batch, num_noise, num_spans, generator, device)
    nonnoise_lengths = _random_segmentation(batch, num_nonnoise, num_spans, generator, device)
    interleaved = torch.stack([nonnoise_lengths, noise_lengths], dim=2).reshape(batch, -1)
    # Each span start flips noise on or off: odd-numbered spans (counting from 0) are noise.
    span_starts = interleaved.cumsum(dim=1)[:, :-1]
    start = torch.zeros((batch, length), dtype=torch.long, device=device)
    start.scatter_(1, span_starts, 1)
    is_noise = start.cumsum(dim=1) % 2 == 1
    return is_noise[:, :orig_length]


def span_corruption(tokens: Tensor, noise_mask: Tensor, sentinel_ids: Tensor,
                    eos_id: int) -> tuple[Tensor, Tensor]:
    """T5's span-corruption inputs and targets for a batch (Raffel et al., 2020, Fig. 2).

    inputs:  ``noise_span_to_unique_sentinel``: the k-th noise span of a row is replaced by the
             single token ``sentinel_ids[k]``, non-noise tokens are kept;
    targets: ``nonnoise_span_to_unique_sentinel``: the same with the mask inverted, so the k-th
             non-noise span becomes ``sentinel_ids[k]`` and the noise tokens are kept;
    then ``eos_id`` is appended to both, as T5 appends EOS to inputs and targets.

    ``sentinel_ids`` lists T5's ``<extra_id_0>, <extra_id_1>, ...`` in that order (in T5's
    SentencePiece vocabulary these are ``vocab_size - 1, vocab_size - 2, ...``); it needs at
    least as many ids as the most spans of either kind in a row (num_spans + 1 always
    suffices). Every row must give outputs of the same length, which holds when every row has
    the same numbers of noise tokens and spans, as :func:`random_spans_noise_mask` guarantees.
    Returns ``inputs`` (B, L - num_noise + num_noise_spans + 1) and ``targets``
    (B, num_noise + num_nonnoise_spans + 1).

    The paper's example: "Thank you for inviting me to your party last week ." with the noise
    "for inviting" and "last" gives

        inputs:  Thank you <X> me to your party <Y> week . </s>
        targets: <X> for inviting <Y> last <Z> </s>

    with <X>, <Y>, <Z> = ``sentinel_ids[0], [1], [2]``; this function gives exactly these ids.
    Figure and code agree because of how the code reads the targets: the paper calls each
    target sentinel the marker of the dropped span that follows it, while the code makes
    target sentinel k the replacement of the k-th non-noise span ("Thank you" -> <X>,
    "me to your party" -> <Y>, "week ." -> <Z>). When a row starts with non-noise, non-noise
    span k comes right before noise span k and the two readings give the same ids. They part
    only for masks T5 never draws: a row that starts with noise gets targets that start with
    its noise tokens, one sentinel off from the inputs' (we keep the code's ids), and a row that
    ends with noise, as every :func:`random_spans_noise_mask` row does, gets no final sentinel
    (the <Z> above exists only because "week ." is not noise).

    Example::

        >>> tokens = torch.randint(200, 32000, (8, 568))              # 568 -> 512 inputs
        >>> mask = random_spans_noise_mask(8, 568)                    # 85 noise, 28 spans
        >>> extra_ids = 32099 - torch.arange(100)                     # <extra_id_0> ... 99
        >>> inputs, targets = span_corruption(tokens, mask, extra_ids, eos_id=1)
        >>> inputs.shape, targets.shape
        (torch.Size([8, 512]), torch.Size([8, 114]))
    """
    _check_ids("tokens", tokens)
    if not isinstance(noise_mask, Tensor) or noise_mask.dtype != torch.bool \
            or noise_mask.shape != tokens.shape:
        got = (f"{noise_mask.dtype} {tuple(noise_mask.shape)}" if isinstance(noise_mask, Tensor)
               else type(noise_mask).__name__)
        raise ValueError(f"noise_mask must be a bool tensor of the shape of tokens "
                         f"{tuple(tokens.shape)}, got {got}")
    sentinel_ids = torch.as_tensor(sentinel_ids, device=tokens.device)
    if sentinel_ids.dim() != 1 or sentinel_ids.dtype not in _INT_DTYPES:
        raise ValueError(f"sentinel_ids must be a 1-D integer tensor, got {sentinel_ids.dtype} "
                         f"{tuple(sentinel_ids.shape)}")
    sentinel_ids = sentinel_ids.to(tokens.dtype)
    inputs = _spans_to_sentinels(tokens, noise_mask, sentinel_ids, "inputs")
    targets = _spans_to_sentinels(tokens, ~noise_mask, sentinel_ids, "targets")
    eos = tokens.new_full((tokens.shape[0], 1), int(eos_id))
    return torch.cat([inputs, eos], dim=1), torch.cat([targets, eos], dim=1)
