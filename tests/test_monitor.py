"""Collapse monitor: the prediction-uniformity signal (DINO / SwAV heads gone uniform) and its alarm."""

import math

import pytest
import torch

from selfsup.nn.metrics import prediction_uniformity
from selfsup.train.monitor import UNIFORM_ALARM, CollapseMonitor, embedding_std


def test_prediction_uniformity_by_hand():
    assert float(prediction_uniformity(torch.zeros(4, 10))) == pytest.approx(1.0, abs=1e-6)  # uniform
    peaked = torch.full((3, 5), -1e4)
    peaked[:, 2] = 0.0
    assert float(prediction_uniformity(peaked)) == pytest.approx(0.0, abs=1e-6)
    # two outputs, logits (0, ln 3) at temperature 1: p = (1/4, 3/4), entropy / ln 2 by hand
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert float(prediction_uniformity(torch.tensor([[0.0, math.log(3)]]))) == pytest.approx(h, rel=1e-5)
    # the temperature divides the logits first: (0, 2 ln 3) at temperature 2 is the same prediction
    assert float(prediction_uniformity(torch.tensor([[0.0, 2 * math.log(3)]]), 2.0)) == pytest.approx(h, rel=1e-5)


def test_monitor_alarms_on_uniform_predictions_even_with_healthy_embeddings():
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    assert embedding_std(z) > 0.5  # no std alarm
    mon = CollapseMonitor(every=1)
    mon.update(z, 1, {"monitor/uniformity": 0.97})
    assert not mon.alarming and mon.alarm_reason is None
    mon.update(z, 2, {"monitor/uniformity": UNIFORM_ALARM + 0.004})
    assert mon.alarming and mon.alarm_reason.startswith("uniform predictions")
    mon.update(z, 3, None)  # methods without the metric leave the last value alone
    s = mon.summary()
    assert s["uniform_alarm_steps"] == 1 and s["alarm_steps"] == 0
    assert s["last_uniformity"] == pytest.approx(UNIFORM_ALARM + 0.004)
    mon.update(torch.ones(64, 16), 4)  # collapsed embeddings: the std alarm takes the progress line
    assert mon.alarm_reason.startswith("std")
