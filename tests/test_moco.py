"""MoCo v2 (queue + InfoNCE) and MoCo v3 (symmetric in-batch contrast): losses against explicit
computations, the queue's FIFO arithmetic and checkpointing, EMA timing, CLI and resume."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, resume_matches_straight
from torch import nn

from selfsup.checkpoint import load_checkpoint
from selfsup.cli import main
from selfsup.config import load_config
from selfsup.core.build import build_method
from selfsup.core.method import Progress
from selfsup.errors import ConfigError
from selfsup.losses import moco_info_nce, moco_v3_ctr, moco_v3_loss
from selfsup.methods.moco_v2 import enqueue

BASE = [*(o for o in TINY if not o.startswith("method.")), "backbone.width=16"]  # a narrow ResNet-18: fast
V2 = [*BASE, "method.name=mocov2", "method.proj_hidden_dim=32", "method.proj_dim=16", "method.queue_size=64",
      "method.bn_splits=2"]
V3 = [*BASE, "method.name=mocov3", "method.proj_hidden_dim=32", "method.proj_dim=16", "method.pred_hidden_dim=32"]


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


# ---- losses ----------------------------------------------------------------------------


def test_info_nce_matches_explicit_loop():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    queue = F.normalize(torch.randn(4, 5, generator=g), dim=1)
    t = 0.2
    total = 0.0
    for i in range(3):
        qi, ki = _unit(q[i].tolist()), _unit(k[i].tolist())
        pos = math.exp(_dot(qi, ki) / t)
        neg = sum(math.exp(_dot(qi, queue[j].tolist()) / t) for j in range(4))
        total += -math.log(pos / (pos + neg))
    assert moco_info_nce(q, k, queue, t).item() == pytest.approx(total / 3, rel=1e-5)


def test_info_nce_falls_as_positive_aligns_and_sends_no_gradient_to_keys():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(8, 16, generator=g).requires_grad_(True)
    queue = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    k = torch.randn(8, 16, generator=g).requires_grad_(True)
    far = moco_info_nce(q, k, queue, 0.2)
    near = moco_info_nce(q, q + 0.1 * torch.randn(8, 16, generator=g), queue, 0.2)
    assert near < far
    far.backward()
    assert k.grad is None and q.grad is not None


def test_v3_ctr_matches_hand_computation_and_is_symmetric():
    q1, q2 = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 4.0], [1.0, -1.0]])
    k1, k2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [-1.0, 1.0]])
    t = 0.5

    def ctr(q, k):  # explicit: mean over i of -log softmax_j(q_i.k_j / t)[i], times 2t
        out = 0.0
        for i in range(2):
            qi = _unit(q[i].tolist())
            logits = [_dot(qi, _unit(k[j].tolist())) / t for j in range(2)]
            out += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
        return out / 2 * 2 * t

    expected = ctr(q1, k2) + ctr(q2, k1)
    assert moco_v3_ctr(q1, k2, t).item() == pytest.approx(ctr(q1, k2), rel=1e-6)
    assert moco_v3_loss(q1, q2, k1, k2, t).item() == pytest.approx(expected, rel=1e-6)
    # swapping the two views leaves the loss unchanged
    assert moco_v3_loss(q2, q1, k2, k1, t).item() == pytest.approx(expected, rel=1e-6)


# ---- the queue ---------------------------------------------------------------------------


def test_enqueue_is_fifo_with_wraparound():
    queue, ptr = torch.zeros(6, 1), torch.zeros(1, dtype=torch.long)
    enqueue(queue, ptr, torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
    assert ptr.item() == 4 and queue.squeeze(1).tolist() == [1, 2, 3, 4, 0, 0]
    enqueue(queue, ptr, torch.tensor([[5.0], [6.0], [7.0], [8.0]]))  # wraps: 7, 8 overwrite the oldest
    assert ptr.item() == 2 and queue.squeeze(1).tolist() == [7, 8, 3, 4, 5, 6]
    enqueue(queue, ptr, torch.tensor([[9.0], [10.0], [11.0], [12.0]]))
    assert ptr.item() == 0 and queue.squeeze(1).tolist() == [7, 8, 9, 10, 11, 12]

    # more keys than slots: same as enqueuing them one at a time
    ref_q, ref_p = queue.clone(), ptr.clone() + 3
    queue_b, ptr_b = queue.clone(), ptr.clone() + 3
    keys = torch.arange(20.0, 28.0).unsqueeze(1)
    for row in keys:
        enqueue(ref_q, ref_p, row[None])
    enqueue(queue_b, ptr_b, keys)
    assert torch.equal(queue_b, ref_q) and ptr_b.item() == ref_p.item()


def test_queue_is_checkpointed_and_restored():
    cfg = load_config(None, V2)
    method = build_method(cfg)
    sd = method.state_dict()
    assert {"queue", "queue_ptr"} <= sd.keys()
    assert sd["queue"].shape == (64, 16) and torch.allclose(sd["queue"].norm(dim=1), torch.ones(64))
    batch = {"images": torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)}
    method(batch).loss.backward()
    method.on_step_end(Progress(1, 10, 0, 1, 10))
    assert method.queue_ptr.item() == 16
    fresh = build_method(cfg)
    assert not torch.equal(fresh.queue, method.queue)
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.queue, method.queue) and fresh.queue_ptr.item() == 16


def test_queue_size_must_be_a_multiple_of_the_global_batch():
    method = build_method(load_config(None, [*V2, "method.queue_size=24"]))
    with pytest.raises(ConfigError, match="queue_size=24 must be a multiple of the global batch"):
        method({"images": torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)})


def test_shuffled_grouped_keys_come_back_in_order():
    method = build_method(load_config(None, [*V2, "method.bn_splits=4"]))
    # a BN-free key encoder: the groups then cannot matter, so this checks only the un-shuffling
    # (Shuffling BN's purpose is the test below)
    method.key_backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8))
    method.key_projector = nn.Linear(8, 16)
    x = torch.randn(16, 3, 16, 16)
    expected = F.normalize(method.key_projector(method.key_backbone(x)), dim=1)
    assert torch.allclose(method._keys(x), expected, atol=1e-6)


def _bn_groups(encode, x: torch.Tensor) -> list[set[int]]:
    """The sets of samples that share BatchNorm statistics in ``encode`` (train mode): moving one
    sample's input moves exactly the outputs of its group."""
    base, groups, seen = encode(x), [], set()
    for i in range(x.shape[0]):
        if i not in seen:
            moved = x.clone()
            moved[i] += 1.0
            out = encode(moved)
            groups.append({j for j in range(x.shape[0]) if not torch.equal(out[j], base[j])})
            seen |= groups[-1]
    return groups


@torch.no_grad()
def test_shuffling_bn_normalizes_each_key_with_other_samples_than_its_query():
    # He et al. 2020 sec. 3.3: BN statistics of one sub-batch let the model find the positive key by its
    # sub-batch's "signature"; Shuffling BN normalizes a query and its key with different subsets. One
    # process with bn_splits=4 emulates 4 GPUs: the real BatchNorm ResNet, groups of 4 of 16 samples.
    method = build_method(load_config(None, [*V2, "method.bn_splits=4", "trainer.channels_last=false"]))
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def keys(v):
        torch.manual_seed(7)  # the same shuffle for every call
        return method._keys(v)

    query_groups = _bn_groups(lambda v: method._grouped(method.backbone, method.projector, v), x)
    key_groups = _bn_groups(keys, x)
    assert query_groups == [{0, 1, 2, 3}, {4, 5, 6, 7}, {8, 9, 10, 11}, {12, 13, 14, 15}]  # unshuffled
    assert sorted(len(g) for g in key_groups) == [4, 4, 4, 4] and set().union(*key_groups) == set(range(16))
    # no key is normalized with the sub-batch of its query
    assert not any(g in query_groups for g in key_groups), key_groups


# ---- EMA timing and frozen teachers --------------------------------------------------------


@pytest.mark.parametrize("overrides,teacher,student", [(V2, "key_backbone", "backbone"),
                                                      (V3, "momentum_backbone", "backbone")])
def test_ema_updates_only_in_on_step_end(overrides, teacher, student):
    method = build_method(load_config(None, overrides))
    t_mod, s_mod = getattr(method, teacher), getattr(method, student)
    assert all(not p.requires_grad for p in t_mod.parameters())
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    before = [p.clone() for p in t_mod.parameters()]
    queue_before = method.queue.clone() if hasattr(method, "queue") else None
    captured = {name: [] for name in ("predictor", "momentum_projector")}
    hooks = [getattr(method, name).register_forward_hook(lambda m, i, o, name=name: captured[name].append(o.detach()))
             for name in captured if hasattr(method, name)]
    out = method({"images": torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)})
    for hook in hooks:
        hook.remove()
    cos = float(out.metrics["monitor/student_teacher_cos"])
    out.loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, t_mod.parameters())), "teacher moved before on_step_end"
    if queue_before is not None:
        assert torch.equal(queue_before, method.queue), "queue changed before on_step_end"
    method.on_step_end(Progress(step=3, total_steps=10, epoch=0, epochs=1, steps_per_epoch=10))
    if queue_before is not None:
        m = 0.999
    else:  # MoCo v3: 1 - (1 - 0.99)(1 + cos(pi t / T)) / 2 at t = 3 of 10
        m = 1 - (1 - 0.99) * (1 + math.cos(math.pi * 3 / 10)) / 2
    w_t, w_s, w_0 = t_mod.model.conv1.weight, s_mod.model.conv1.weight, before[0]
    assert torch.allclose(w_t, m * w_0 + (1 - m) * w_s, atol=1e-7)
    assert not torch.equal(w_t, w_0)
    if queue_before is not None:
        assert method.queue_ptr.item() == 16 and not torch.equal(queue_before, method.queue)
        # MoCo v2: mean cosine of each query (the embeddings) with its key, now queue rows 0-15
        pairs = [(out.embeddings[i], method.queue[i]) for i in range(16)]
    else:  # MoCo v3: each view's prediction against the momentum encoder's output for the other view
        (q1, q2), (k1, k2) = captured["predictor"], captured["momentum_projector"]
        pairs = [(q1[i], k2[i]) for i in range(16)] + [(q2[i], k1[i]) for i in range(16)]
    expected = sum(_dot(_unit(a.tolist()), _unit(b.tolist())) for a, b in pairs) / len(pairs)
    assert cos == pytest.approx(expected, abs=1e-5)


def test_mocov3_vit_freezes_patch_projection():
    cfg = load_config(None, [*V3, "backbone.name=timm:vit_tiny_patch16_224", "backbone.img_size=16",
                             "backbone.patch_size=8"])
    method = build_method(cfg)
    patch = method.backbone.model.patch_embed.proj
    assert not patch.weight.requires_grad and not patch.bias.requires_grad
    out = method({"images": torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)})
    out.loss.backward()
    assert torch.isfinite(out.loss) and patch.weight.grad is None
    assert method.backbone.model.blocks[0].attn.qkv.weight.grad is not None


# ---- end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [V2, V3], ids=["mocov2", "mocov3"])
def test_cli_pretrain_few_steps(tmp_path, overrides):
    rc = main(["pretrain", *overrides, f"trainer.out_dir={tmp_path}", "trainer.run_name=run",
               "trainer.max_steps=2", "eval.final_knn=false"])
    assert rc == 0
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["position"]["step"] == 2
    with (tmp_path / "run" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert math.isfinite(float(rows[-1]["loss"])) and "monitor/student_teacher_cos" in rows[-1]


def test_mocov2_resume_equals_uninterrupted(tmp_path):
    # 24 images in batches of 8: 3 steps; a queue of 24 keys makes exactly one lap
    cfg = load_config(None, [*V2, "data.limit=24", "data.batch_size=8", "method.queue_size=24",
                             "trainer.epochs=1", "optim.name=sgd", "optim.lr=0.5"])
    ck, a = resume_matches_straight(cfg, tmp_path, until_step=2)
    assert ck["model"]["queue_ptr"].item() == 16 and "queue" in a
    assert a["queue_ptr"].item() == 0  # 3 steps x 8 keys = one lap of 24 (and equal after resume)
