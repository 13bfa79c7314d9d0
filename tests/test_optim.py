"""LARS against steps computed by hand (trust ratio, weight decay folded in, clip mode, exclusions), and
the warm-up start of the lr schedule."""

from pathlib import Path

import pytest
import torch

from selfsup.errors import ConfigError
from selfsup.train.optim import LARS


def _one_step(w, g, **kw):
    p = torch.nn.Parameter(torch.tensor(w))
    opt = LARS([{"params": [p]}], momentum=0.9, **kw)
    p.grad = torch.tensor(g)
    opt.step()
    return p.detach()


def test_lars_trust_ratio_step_by_hand():
    # w = (3, 4): |w| = 5; g = (0, 0.5): |g| = 0.5; trust = 0.02 * 5 / 0.5 = 0.2; step = lr * trust * g
    out = _one_step([3.0, 4.0], [0.0, 0.5], lr=0.1, eta=0.02)
    assert out.tolist() == pytest.approx([3.0, 4.0 - 0.1 * 0.2 * 0.5])


def test_lars_folds_weight_decay_in_before_the_norm():
    # g + wd w = (0, 0.5) + 0.1 * (3, 4) = (0.3, 0.9): |.| = sqrt(0.9); trust = 0.02 * 5 / sqrt(0.9)
    trust = 0.02 * 5 / 0.9**0.5
    out = _one_step([3.0, 4.0], [0.0, 0.5], lr=0.1, eta=0.02, weight_decay=0.1)
    assert out.tolist() == pytest.approx([3.0 - 0.1 * trust * 0.3, 4.0 - 0.1 * trust * 0.9])


def test_lars_clip_caps_a_layer_rate_at_the_scheduled_lr():
    # trust 0.2 > lr 0.1: clipped multiplier min(0.2 / 0.1, 1) = 1 -> a plain SGD step of lr * g
    out = _one_step([3.0, 4.0], [0.0, 0.5], lr=0.1, eta=0.02, clip=True)
    assert out.tolist() == pytest.approx([3.0, 4.0 - 0.1 * 0.5])
    # trust 0.2 < lr 1.0: multiplier 0.2 / 1.0 -> the layer moves at rate 0.2, below the lr
    out = _one_step([3.0, 4.0], [0.0, 0.5], lr=1.0, eta=0.02, clip=True)
    assert out.tolist() == pytest.approx([3.0, 4.0 - 0.2 * 0.5])


def test_lars_excluded_groups_take_plain_momentum_sgd_steps():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = LARS([{"params": [p], "lars_exclude": True, "weight_decay": 0.0}], lr=0.1, eta=0.02, momentum=0.9)
    for _ in range(2):
        p.grad = torch.tensor([0.0, 0.5])
        opt.step()
    # v1 = g, v2 = 0.9 g + g = 1.9 g; w = w0 - lr (v1 + v2) = 4 - 0.1 * 2.9 * 0.5
    assert p.detach().tolist() == pytest.approx([3.0, 4.0 - 0.1 * 2.9 * 0.5])


def test_warmup_starts_at_warmup_start_lr_and_reaches_the_base_rate(tmp_path, tiny_overrides):
    from selfsup.config import load_config
    from selfsup.train.trainer import Trainer

    cfg = load_config(None, [*tiny_overrides, "optim.warmup_epochs=1", "optim.warmup_start_lr=0.1",
                             "optim.lr_scaling=none", "optim.lr=0.5", "trainer.epochs=2"])
    trainer = Trainer(cfg)
    warmup = trainer.steps_per_epoch
    lrs = []
    for step in (0, warmup // 2, warmup):
        trainer.step = step
        lrs.append(trainer._set_schedules()[0])
    assert lrs[0] == pytest.approx(0.1)  # unscaled start
    assert lrs[1] == pytest.approx(0.1 + 0.4 * (warmup // 2) / warmup)
    assert lrs[2] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="optim.warmup_start_lr"):
        load_config(None, [*tiny_overrides, "optim.warmup_start_lr=-1"])
    imagenet = load_config(Path(__file__).parents[1] / "configs" / "ijepa" / "imagenet.yaml")
    assert (imagenet.optim.lr, imagenet.optim.warmup_start_lr, imagenet.optim.min_lr) == (1e-3, 2e-4, 1e-6)
