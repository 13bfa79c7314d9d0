"""Two CPU processes (gloo) against one: the gathered-negatives loss must be the same objective."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from selfsup.losses import nt_xent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = z1.shape[0] // world
        a = z1[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        b = z2[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        loss = nt_xent(a, b, temperature=0.3)
        loss.backward()
        out[rank] = (loss.detach(), a.grad.clone(), b.grad.clone())
    finally:
        tdist.destroy_process_group()


def test_two_process_loss_and_gradients_equal_single_process():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    ref1, ref2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    ref = nt_xent(ref1, ref2, temperature=0.3)
    ref.backward()

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), z1, z2, out), nprocs=2, join=True)
        results = dict(out)
    # the global loss is the mean of the ranks' losses (equal local batches) ...
    assert torch.allclose((results[0][0] + results[1][0]) / 2, ref.detach(), atol=1e-6)
    # ... and DDP's gradient averaging (divide by world size) gives the single-process gradient
    grad1 = torch.cat([results[0][1], results[1][1]]) / 2
    grad2 = torch.cat([results[0][2], results[1][2]]) / 2
    assert torch.allclose(grad1, ref1.grad, atol=1e-6)
    assert torch.allclose(grad2, ref2.grad, atol=1e-6)


def test_torchrun_two_cpu_processes_train_and_checkpoint(tmp_path):
    from conftest import TINY

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "selfsup", "pretrain", *TINY, f"trainer.out_dir={tmp_path}",
           "trainer.run_name=ddp", "trainer.epochs=1", "eval.final_knn=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "last.ckpt", weights_only=True)
    # 64 samples, global batch 16 over 2 ranks -> 4 steps of 8 images per rank
    assert ckpt["position"] == {"step": 4, "epoch": 1, "batch": 0}
    assert "world size 2" in proc.stderr
