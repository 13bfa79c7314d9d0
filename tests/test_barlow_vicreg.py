"""Barlow Twins and VICReg: losses against explicit loops and hand values, the properties the papers
state, the global-batch statistics across two processes, recipes, CLI training and exact resume."""

import math
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import TINY, resume_matches_straight, train_recipe_two_steps

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.core.build import build_method
from selfsup.errors import ConfigError
from selfsup.losses import (
    barlow_twins_loss,
    barlow_twins_terms,
    covariance_loss,
    cross_correlation,
    invariance_loss,
    variance_loss,
    vicreg_loss,
    vicreg_terms,
)

CONFIGS = Path(__file__).parents[1] / "configs"
BASE = [*(o for o in TINY if not o.startswith("method.")), "backbone.width=16"]
HEADS = ["method.proj_hidden_dim=32", "method.proj_dim=16"]
BT_TINY = [*BASE, "method.name=barlow_twins", *HEADS]
VIC_TINY = [*BASE, "method.name=vicreg", *HEADS]


def _hadamard8() -> torch.Tensor:
    """The 8x8 Sylvester Hadamard matrix: ±1 entries, mutually orthogonal columns."""
    h = torch.ones(1, 1)
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _decorrelated(d: int = 4) -> torch.Tensor:
    """(8, d): columns of ±1 with mean 0, biased variance 1 and zero cross-correlation."""
    return _hadamard8()[:, 1:1 + d]  # column 0 is all ones (not centred); the others sum to 0


# ---------------------------------------------------------------------------------------------
# Barlow Twins


def _bt_loops(z1, z2, lambd, eps=1e-5):
    """Barlow Twins by explicit loops over Python floats: BN-standardize each column (biased
    variance), C_ij = sum_b a_bi b_bj / N, then the two sums of eq. 1."""
    a, b = z1.tolist(), z2.tolist()
    n, d = len(a), len(a[0])

    def standardize(rows):
        cols = []
        for j in range(d):
            col = [rows[k][j] for k in range(n)]
            mu = sum(col) / n
            var = sum((x - mu) ** 2 for x in col) / n
            cols.append([(x - mu) / math.sqrt(var + eps) for x in col])
        return cols

    ca, cb = standardize(a), standardize(b)
    c = [[sum(ca[i][k] * cb[j][k] for k in range(n)) / n for j in range(d)] for i in range(d)]
    on = sum((1 - c[i][i]) ** 2 for i in range(d))
    off = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lambd * off, c


def test_barlow_twins_zero_for_identical_decorrelated_unit_variance_embeddings():
    z = _decorrelated(4)
    assert torch.allclose(z.mean(0), torch.zeros(4)) and torch.allclose(z.var(0, unbiased=False), torch.ones(4))
    assert barlow_twins_loss(z, z, eps=0.0).item() == pytest.approx(0.0, abs=1e-12)
    # with BatchNorm's eps C_ii = 1 / sqrt(1 + 1e-5)^2: the loss is d * (1 - 1/(1 + 1e-5))^2 ~ 4e-10
    assert barlow_twins_loss(z, z).item() == pytest.approx(4 * (1 - 1 / (1 + 1e-5)) ** 2, rel=0.05)
    # the standardization makes it blind to per-dimension scale and shift
    assert barlow_twins_loss(3 * z + 5, z * torch.tensor([1.0, 2.0, 0.5, 7.0]), eps=0.0).item() == pytest.approx(
        0.0, abs=1e-10)
    # opposite views: C = -I, so every diagonal term is (1 - (-1))^2 = 4 and nothing off the diagonal
    assert barlow_twins_loss(z, -z, eps=0.0).item() == pytest.approx(16.0, rel=1e-6)
    # collapse to one shared direction is penalized by the off-diagonal term only
    same = z[:, :1].repeat(1, 4)
    on, off = barlow_twins_terms(cross_correlation(same, same, eps=0.0))
    assert on.item() == pytest.approx(0.0, abs=1e-10) and off.item() == pytest.approx(12.0, rel=1e-6)


def test_barlow_twins_matches_explicit_loops_on_a_small_case():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    expect, c_loops = _bt_loops(z1, z2, lambd=0.0051)
    assert torch.allclose(cross_correlation(z1, z2), torch.tensor(c_loops), atol=1e-6)
    assert barlow_twins_loss(z1, z2, lambd=0.0051).item() == pytest.approx(expect, rel=1e-5)
    # a bigger random case, both directions of C
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert barlow_twins_loss(z1, z2, lambd=0.3).item() == pytest.approx(_bt_loops(z1, z2, 0.3)[0], rel=1e-5)


def test_barlow_twins_lambda_weights_only_the_off_diagonal_sum():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)
    on, off = barlow_twins_terms(cross_correlation(z1, z2))
    assert barlow_twins_loss(z1, z2, lambd=0.0).item() == pytest.approx(on.item(), rel=1e-6)
    for lam in (0.0051, 1 / 6, 2.0):
        assert barlow_twins_loss(z1, z2, lambd=lam).item() == pytest.approx(on.item() + lam * off.item(), rel=1e-6)
    with pytest.raises(ValueError):
        barlow_twins_loss(z1, z2, lambd=-1.0)


# ---------------------------------------------------------------------------------------------
# VICReg


def test_vicreg_variance_hinge():
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(64, 8, generator=g) * 3  # every dimension's std is well above γ = 1
    assert (wide.std(0) >= 1).all()
    assert variance_loss(wide).item() == 0.0
    # collapsed: every dimension constant -> std = sqrt(0 + eps) -> γ - sqrt(ε) per dimension
    flat = torch.full((10, 5), 0.7)
    assert variance_loss(flat).item() == pytest.approx(1.0 - math.sqrt(1e-4), rel=1e-6)
    assert variance_loss(flat, gamma=2.0, eps=1e-2).item() == pytest.approx(2.0 - 0.1, rel=1e-6)
    # hand value: columns [0, 1] and [0, 4] (unbiased var 0.5 and 8) -> mean of relu(1 - sqrt(var + ε))
    z = torch.tensor([[0.0, 0.0], [1.0, 4.0]])
    assert variance_loss(z).item() == pytest.approx((1 - math.sqrt(0.5 + 1e-4) + 0.0) / 2, rel=1e-6)


def test_vicreg_covariance_term():
    # decorrelated columns: the covariance matrix is diagonal
    assert covariance_loss(_decorrelated(4)).item() == pytest.approx(0.0, abs=1e-12)
    # hand case, d = 2: x = [1, 2, 3], y = [2, 4, 9]; deviations (-1, 0, 1) and (-3, -1, 4),
    # cov_xy = (3 + 0 + 4) / (3 - 1) = 3.5; c = (3.5^2 + 3.5^2) / 2 = 12.25
    z = torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 9.0]])
    assert covariance_loss(z).item() == pytest.approx(12.25, rel=1e-6)
    # variances on the diagonal are not penalized: scaling one column alone scales c linearly
    assert covariance_loss(z * torch.tensor([1.0, 2.0])).item() == pytest.approx(4 * 12.25, rel=1e-6)


def test_vicreg_invariance_is_mse_and_loss_combines_the_terms():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    mse = sum((a - b) ** 2 for ra, rb in zip(z1.tolist(), z2.tolist()) for a, b in zip(ra, rb)) / 12
    assert invariance_loss(z1, z2).item() == pytest.approx(mse, rel=1e-6)
    assert invariance_loss(z1, z1).item() == 0.0

    def var_loop(z):
        cols = list(zip(*z.tolist()))
        out = 0.0
        for col in cols:
            mu = sum(col) / len(col)
            var = sum((x - mu) ** 2 for x in col) / (len(col) - 1)
            out += max(0.0, 1.0 - math.sqrt(var + 1e-4))
        return out / len(cols)

    def cov_loop(z):
        cols = list(zip(*z.tolist()))
        n, d = len(cols[0]), len(cols)
        mus = [sum(c) / n for c in cols]
        total = 0.0
        for i in range(d):
            for j in range(d):
                if i != j:
                    cij = sum((cols[i][k] - mus[i]) * (cols[j][k] - mus[j]) for k in range(n)) / (n - 1)
                    total += cij**2
        return total / d

    inv, var, cov = vicreg_terms(z1, z2)
    assert var.item() == pytest.approx((var_loop(z1) + var_loop(z2)) / 2, rel=1e-5)  # mean of branches
    assert cov.item() == pytest.approx(cov_loop(z1) + cov_loop(z2), rel=1e-5)  # sum of branches
    expect = 25 * mse + 25 * (var_loop(z1) + var_loop(z2)) / 2 + 1 * (cov_loop(z1) + cov_loop(z2))
    assert vicreg_loss(z1, z2).item() == pytest.approx(expect, rel=1e-5)
    assert vicreg_loss(z1, z2, 1.0, 0.0, 0.0).item() == pytest.approx(mse, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# two processes: the statistics are those of the global batch, and so are the gradients


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(z1, z2):
    return {"bt": barlow_twins_loss(z1, z2, lambd=0.1), "vic": vicreg_loss(z1, z2)}


def _worker(rank, world, port, z1, z2, out):
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = z1.shape[0] // world
        res = {}
        for name in ("bt", "vic"):
            a = z1[rank * n:(rank + 1) * n].clone().requires_grad_(True)
            b = z2[rank * n:(rank + 1) * n].clone().requires_grad_(True)
            loss = _losses(a, b)[name]
            loss.backward()
            res[name] = (loss.detach(), a.grad.clone(), b.grad.clone())
        out[rank] = res
    finally:
        tdist.destroy_process_group()


def test_two_processes_give_the_global_batch_loss_and_gradients():
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), z1, z2, out), nprocs=2, join=True)
        results = dict(out)
    for name in ("bt", "vic"):
        r1, r2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        ref = _losses(r1, r2)[name]
        ref.backward()
        # Barlow Twins' loss is global on every rank; VICReg's invariance part is each rank's mean
        mean_loss = (results[0][name][0] + results[1][name][0]) / 2
        assert torch.allclose(mean_loss, ref.detach(), atol=1e-5), name
        if name == "bt":
            assert torch.allclose(results[0][name][0], results[1][name][0], atol=1e-6)
        # DDP averages the ranks' gradients: the result must be the one-process gradient
        grad1 = torch.cat([results[0][name][1], results[1][name][1]]) / 2
        grad2 = torch.cat([results[0][name][2], results[1][name][2]]) / 2
        assert torch.allclose(grad1, r1.grad, atol=1e-5), name
        assert torch.allclose(grad2, r2.grad, atol=1e-5), name


# ---------------------------------------------------------------------------------------------
# methods, configs, recipes


def _images(n=8, side=20):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tiny", [BT_TINY, VIC_TINY])
def test_projector_follows_the_official_code(tiny):
    method = build_method(load_config(None, [*tiny, "trainer.channels_last=false"]))
    kinds = [type(m).__name__ for m in method.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert method.projector[-1].bias is None and method.projector[-1].out_features == 16
    out = method({"images": _images()})
    assert math.isfinite(out.loss.item()) and out.embeddings.shape == (8, 16)
    out.loss.backward()
    assert method.backbone.model.conv1.weight.grad.abs().sum() > 0
    prefix = "bt/" if tiny is BT_TINY else "vicreg/"
    assert any(k.startswith(prefix) for k in out.metrics)


def test_config_options_and_validation():
    assert build_method(load_config(None, [*BT_TINY, "method.lambd=1/d"])).lambd == pytest.approx(1 / 16)
    assert build_method(load_config(None, BT_TINY)).lambd == pytest.approx(0.0051)
    with pytest.raises(ConfigError, match="lambd"):
        load_config(None, [*BT_TINY, "method.lambd=2/d"])
    with pytest.raises(ConfigError, match="lambd"):
        load_config(None, [*BT_TINY, "method.lambd=-0.1"])
    with pytest.raises(ConfigError, match="gamma"):
        load_config(None, [*VIC_TINY, "method.gamma=0"])
    with pytest.raises(ConfigError, match="std_coeff"):
        load_config(None, [*VIC_TINY, "method.std_coeff=-1"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, [*VIC_TINY, "data.batch_size=1"])


def test_recipes_carry_the_papers_numbers():
    bt = load_config(CONFIGS / "barlow_twins" / "imagenet.yaml")
    assert (bt.optim.name, bt.optim.lr, bt.optim.weight_decay, bt.data.batch_size) == ("lars", 0.2, 1.5e-6, 2048)
    assert (bt.method.lambd, bt.method.proj_hidden_dim, bt.method.proj_dim, bt.method.proj_layers) == (
        0.0051, 8192, 8192, 3)
    assert (bt.trainer.epochs, bt.optim.warmup_epochs, bt.trainer.sync_bn) == (1000, 10, True)
    assert bt.optim.min_lr == pytest.approx(bt.optim.scaled_lr(2048) / 1000)
    assert bt.optim.bias_norm_lr_scale == pytest.approx(0.0048 / 0.2)  # the paper's bias/BN lr
    v1, v2 = bt.augment.views
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    vic = load_config(CONFIGS / "vicreg" / "imagenet.yaml")
    assert (vic.optim.name, vic.optim.lr, vic.optim.weight_decay, vic.data.batch_size) == ("lars", 0.2, 1e-6, 2048)
    m = vic.method
    assert (m.sim_coeff, m.std_coeff, m.cov_coeff, m.gamma, m.eps, m.proj_dim) == (25, 25, 1, 1, 1e-4, 8192)
    assert (vic.trainer.epochs, vic.optim.warmup_epochs) == (1000, 10)
    for name in ("barlow_twins", "vicreg"):
        c = load_config(CONFIGS / name / "cifar10.yaml")
        assert c.backbone.cifar_stem and c.method.proj_dim == 2048 and c.augment.views[0].size == 32


# ---------------------------------------------------------------------------------------------
# training end to end


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_cli_trains_a_few_steps_from_the_recipe(tmp_path, name):
    tiny = BT_TINY if name == "barlow_twins" else VIC_TINY
    overrides = [o for o in tiny if o.startswith("method.proj") or not o.startswith("method.")]
    train_recipe_two_steps(name, tmp_path, overrides)
    metric = "bt/off_diag" if name == "barlow_twins" else "vicreg/variance"
    assert metric in (tmp_path / "r" / "metrics.csv").read_text()


def test_barlow_twins_resume_equals_uninterrupted(tmp_path):
    cfg = load_config(None, [*BT_TINY, "trainer.max_steps=3"])
    resume_matches_straight(cfg, tmp_path, until_step=2)


def test_methods_lists_barlow_twins_and_vicreg(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "barlow_twins" in out and "Zbontar et al. 2021" in out
    assert "vicreg" in out and "Bardes, Ponce & LeCun 2022" in out
