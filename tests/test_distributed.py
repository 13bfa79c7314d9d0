"""Two CPU processes (gloo) against one: losses on gathered batches, and methods whose state
spans ranks (MoCo v2's Shuffle-BN and queue, SwAV's queue and Sinkhorn, DINO's centre), must be
the same objective and take the same steps as one process on the same global batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

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


# ---------------------------------------------------------------------------------------------
# methods whose state spans ranks: two gloo ranks against one process over the same global batch
#
# Each run goes through the trainer's sequence for every step: seed (``step_seed``), forward on the
# rank's slice of the global batch, backward (DDP averages the gradients), an optimizer step, then
# ``on_step_end``. The views are fixed functions of the pixels, so both runs see the same inputs
# whatever the augmentation RNG would draw per rank. Where BatchNorm would make one process differ
# from two ranks it is either absent (a ViT backbone, BN-free heads) or is the point: MoCo v2's
# one process emulates the two ranks' per-GPU BN with ``bn_splits=2``.

GLOBAL_BATCH, STEPS = 8, 4
COMMON = ["data.batch_size=8", "augment.views.0.size=16", "augment.views.1.size=16", "trainer.precision=32",
          "trainer.device=cpu", "trainer.channels_last=false"]
VIT = ["backbone.name=vit_tiny", "backbone.img_size=16", "backbone.patch_size=4", "backbone.depth=1",
       "backbone.embed_dim=16", "backbone.num_heads=2", "augment.n_local=2", "augment.local.size=8"]
RECIPES = {
    # a BatchNorm ResNet: the key encoder's BN statistics are per rank, as in the paper's 8-GPU runs
    "mocov2": [*COMMON, "method.name=mocov2", "backbone.width=8", "method.proj_hidden_dim=16", "method.proj_dim=8",
               "method.queue_size=16", "method.momentum=0.9"],
    # a 16-long queue of global crops, on from the first step: full after 2 steps, used by Sinkhorn in steps 3-4
    "swav": [*COMMON, *VIT, "method.name=swav", "method.proj_hidden_dim=16", "method.proj_dim=8",
             "method.n_prototypes=10", "method.queue_length=16", "method.queue_start_epoch=0",
             "method.freeze_prototypes_epochs=0"],
    "dino": [*COMMON, *VIT, "method.name=dino", "method.hidden_dim=16", "method.bottleneck_dim=8",
             "method.out_dim=12", "method.freeze_last_layer_epochs=0", "method.momentum_teacher=0.9"],
}


class FixedView(nn.Module):
    """A view without randomness: the image scaled to [-1, 1], optionally mirrored or average-pooled
    (the 'local crop')."""

    def __init__(self, flip: bool = False, pool: int = 1) -> None:
        super().__init__()
        self.flip, self.pool = flip, pool

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0  # (the test's images all have the canvas size: no image_sizes)
        x = x.flip(-1) if self.flip else x
        return F.avg_pool2d(x, self.pool) if self.pool > 1 else x


def _global_batches() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (STEPS, GLOBAL_BATCH, 3, 16, 16), dtype=torch.uint8, generator=g)


def _build(name: str, world: int, extra: tuple[str, ...] = ()):
    from selfsup.config import load_config
    from selfsup.core.build import build_method
    from selfsup.heads import mlp

    overrides = [*RECIPES[name], *extra]
    if name == "mocov2" and world == 1:  # one process, two BN groups: the two ranks' per-GPU BN
        overrides = [*overrides, "method.bn_splits=2"]
    method = build_method(load_config(None, overrides))
    method.views = nn.ModuleList([FixedView(), FixedView(flip=True)])
    method.local_views = nn.ModuleList([FixedView(pool=2), FixedView(flip=True, pool=2)][:len(method.local_views)])
    if name == "swav":  # SwAV's projector has BN: the same MLP without it
        torch.manual_seed(1)
        method.projector = mlp(method.backbone.out_dim, 16, 8, 2, bn_hidden=False)
    return method


def _train(name: str, rank: int, world: int, extra: tuple[str, ...] = ()) -> dict:
    """STEPS trainer-like steps of ``name`` on this rank's slice of each global batch. Returns the
    loss of this rank's slice and the (DDP-averaged) gradients of every step, and the final state
    without BN running statistics (those are per rank by design)."""
    from torch.nn.parallel import DistributedDataParallel

    from selfsup.core.method import Progress
    from selfsup.core.runtime import step_seed

    method = _build(name, world, extra)
    model = DistributedDataParallel(method) if world > 1 else method
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    n = GLOBAL_BATCH // world
    losses, grads = [], []
    for step, images in enumerate(_global_batches()):
        torch.manual_seed(step_seed(0, step, 0, rank))  # as the trainer: rank 0 draws what one process draws
        opt.zero_grad(set_to_none=True)
        out = model({"images": images[rank * n:(rank + 1) * n]})
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in params]))
        opt.step()
        method.on_step_end(Progress(step + 1, STEPS, 0, 1, STEPS))
    state = {k: v.clone() for k, v in method.state_dict().items()
             if "running_" not in k and "num_batches_tracked" not in k}
    return {"loss": torch.stack(losses), "grads": torch.stack(grads), "state": state}


def _method_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name in RECIPES:
            torch.save(_train(name, rank, world), Path(out_dir) / f"{name}-{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every method of RECIPES trained on 2 gloo ranks, in one spawn (starting processes is the slow part)."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_method_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return {name: [torch.load(out / f"{name}-{r}.pt", weights_only=True) for r in range(2)] for name in RECIPES}


def _one_process(name: str, extra: tuple[str, ...] = ()) -> dict:
    """``_train`` in this process, with the ranks' single thread: the same kernels round the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(name, rank=0, world=1, extra=extra)
    finally:
        torch.set_num_threads(threads)


def _assert_same_run(name: str, ranks: list[dict], one: dict, buffers: tuple[str, ...]) -> None:
    """Two ranks and one process took the same steps: the mean of the ranks' losses is the global
    loss, the averaged gradients are the global ones, every parameter and the method's global
    ``buffers`` (queues, centres) end equal, and equal on both ranks."""
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, one["loss"], atol=1e-5), name
    for r in ranks:
        assert torch.allclose(r["grads"], one["grads"], atol=1e-5, rtol=1e-4), name
    assert ranks[0]["state"].keys() == one["state"].keys()
    for key, value in one["state"].items():
        for r in ranks:
            assert torch.allclose(r["state"][key].float(), value.float(), atol=1e-5, rtol=1e-4), f"{name}: {key}"
    for key in buffers:
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), f"{name}: {key} differs between ranks"


def test_mocov2_shuffle_bn_on_two_ranks_equals_one_process_with_two_bn_groups(two_ranks):
    one = _one_process("mocov2")
    _assert_same_run("mocov2", two_ranks["mocov2"], one, ("queue", "queue_ptr"))
    # 4 steps x 8 keys through a queue of 16: the pointer went round twice
    assert one["state"]["queue_ptr"].item() == 0


def test_swav_queue_and_sinkhorn_on_two_ranks_equal_one_process(two_ranks):
    one = _one_process("swav")
    _assert_same_run("swav", two_ranks["swav"], one, ("queue",))
    queue = one["state"]["queue"]  # (2 global crops, 16, 8): the last two global batches, newest first
    assert queue.shape == (2, 16, 8) and bool((queue.norm(dim=-1) > 0.99).all())
    # the queue took part: without it the first two steps are the same and the last two are not
    no_queue = _one_process("swav", extra=("method.queue_length=0",))
    assert torch.equal(no_queue["loss"][:2], one["loss"][:2]) and not torch.allclose(no_queue["loss"][2:], one["loss"][2:])


def test_dino_centre_on_two_ranks_equals_one_process(two_ranks):
    one = _one_process("dino")
    _assert_same_run("dino", two_ranks["dino"], one, ("center",))
    assert one["state"]["center"].abs().sum() > 0
