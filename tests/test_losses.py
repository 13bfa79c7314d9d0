import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses import nt_xent


def test_nt_xent_hand_computed_aligned_orthogonal():
    # three samples, both views identical one-hot vectors: for every anchor the positive has
    # cosine 1 and the 4 negatives cosine 0, so l = -log(e^(1/t) / (e^(1/t) + 4)) for all 6 anchors
    z = torch.eye(3)
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 4 * math.exp(0)))
    assert nt_xent(z, z.clone(), temperature=t).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(math.log(1 + 4 * math.exp(-2)))


def test_nt_xent_matches_explicit_sum_on_three_samples():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    t = 0.2
    z = F.normalize(torch.cat([z1, z2]), dim=1).tolist()
    n = 3
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sim = lambda a, b: sum(x * y for x, y in zip(z[a], z[b]))  # noqa: E731
        denom = sum(math.exp(sim(i, k) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim(i, j) / t) / denom)
    assert nt_xent(z1, z2, temperature=t).item() == pytest.approx(total / (2 * n), rel=1e-5)


def test_nt_xent_falls_as_positives_align():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(16, 8, generator=g)
    noise = torch.randn(16, 8, generator=g)
    losses = [nt_xent(z1, z1 + s * noise, 0.5).item() for s in (2.0, 0.5, 0.1, 0.0)]
    assert losses == sorted(losses, reverse=True)


def test_nt_xent_rejects_bad_temperature():
    with pytest.raises(ValueError):
        nt_xent(torch.randn(2, 3), torch.randn(2, 3), temperature=0.0)
