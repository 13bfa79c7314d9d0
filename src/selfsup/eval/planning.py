"""Planning with an action-conditioned world model: V-JEPA 2-AC's cross-entropy method (Assran et al. 2025, sec. 4.2;
official ``notebooks/utils/mpc_utils.py`` with ``world_model_wrapper.py``), and its score on the embedded clips.

:func:`cem_plan`: to go from the current frame (its tokens h_0 and state s_0) to a goal frame (tokens g), sample
``samples`` action sequences of ``horizon`` steps from N(μ, σ) (μ = 0, σ = ``max_norm`` at first), clip them to
±``max_norm``, integrate the states (s_{t+1} = s_t + a_t: the state is the accumulated action), roll the predictor
out over each (``VJEPA2AC.rollout``) and score it by the energy E = mean |ẑ_horizon - g| over the last predicted
frame's tokens and features; the ``top_k`` lowest-energy sequences give the new mean and standard deviation, mixed
with the old ones by momentum (μ <- (1 - m) μ_top + m μ; the official ``momentum_mean`` / ``momentum_std`` 0.15);
after ``iterations`` rounds the plan is μ. Official defaults (the robot's ``WorldModel``): horizon 2, 400 samples,
10 iterations, top 10, max norm 0.05 m (xyz; the gripper ±0.75, the rotation fixed at 0). Departures: every action
dimension is sampled and clipped alike (the embedded clips' actions are 2-D pixel displacements); the state update
is the sum above (the robot's ``compute_new_pose`` composes poses).

:func:`plan_directions`: the embedded clips' test: plan from frame 0 to frame ``horizon`` of each test clip; the
plan's mean displacement names one of the 8 directions (its angle's nearest multiple of 45 degrees), scored against
the clip's true direction (chance 12.5%), with the plan's mean error in pixels per frame.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cem_plan", "direction_of", "plan_directions"]


@torch.no_grad()
def cem_plan(model, first: Tensor, state: Tensor, goal: Tensor, *, horizon: int = 2, samples: int = 400,
             iterations: int = 10, top_k: int = 10, max_norm: float = 0.05, momentum_mean: float = 0.15,
             momentum_std: float = 0.15, generator: torch.Generator | None = None) -> Tensor:
    """Plans (B, horizon, A) from tokens ``first`` (B, N, D) at ``state`` (B, S) toward ``goal`` tokens (B, N, D);
    ``model`` is a ``VJEPA2AC`` (its ``rollout`` and ``cfg.action_dim``). Sample counts are per plan."""
    if min(horizon, samples, iterations, top_k) < 1 or top_k > samples or max_norm <= 0:
        raise ValueError(f"cem_plan: horizon, samples, iterations, top_k must be >= 1, top_k <= samples and max_norm > 0; "
                         f"got {horizon}, {samples}, {iterations}, {top_k}, {max_norm}")
    b, n, d = first.shape
    a = model.cfg.action_dim
    device = first.device
    mean = torch.zeros(b, horizon, a, device=device)
    std = torch.full((b, horizon, a), float(max_norm), device=device)
    firsts = first.repeat_interleave(samples, 0)
    goals = goal.repeat_interleave(samples, 0)
    for _ in range(iterations):
        noise = torch.randn(b, samples, horizon, a, generator=generator, device=device)
        actions = (mean.unsqueeze(1) + std.unsqueeze(1) * noise).clamp(-max_norm, max_norm)  # (B, K, H, A)
        flat = actions.flatten(0, 1)
        states = state.repeat_interleave(samples, 0).unsqueeze(1) + torch.cat(
            [flat.new_zeros(flat.shape[0], 1, a), flat.cumsum(1)[:, :-1]], dim=1)[..., : state.shape[-1]]
        last = model.rollout(firsts, flat, states)[:, -1]  # (B·K, N, D)
        energy = (last.float() - goals.float()).abs().mean(dim=(1, 2)).view(b, samples)
        best = energy.topk(top_k, dim=1, largest=False).indices  # (B, k)
        elite = torch.gather(actions, 1, best[:, :, None, None].expand(-1, -1, horizon, a))
        mean = (1 - momentum_mean) * elite.mean(1) + momentum_mean * mean
        std = (1 - momentum_std) * elite.std(1) + momentum_std * std
    return mean


def direction_of(displacement: Tensor) -> Tensor:
    """(…, 2) displacements (dy, dx), y down -> (…) direction index in the embedded set's order (E, NE, N, NW, W,
    SW, S, SE): the angle's nearest multiple of 45 degrees, counter-clockwise from east."""
    angle = torch.atan2(-displacement[..., 0], displacement[..., 1])  # up is north
    return torch.round(angle / (math.pi / 4)).long() % 8


@torch.no_grad()
def plan_directions(model, dataset, *, horizon: int = 2, samples: int = 100, iterations: int = 5, top_k: int = 10,
                    max_norm: float = 2.5, batch_size: int = 16, limit: int | None = None, seed: int = 0,
                    device: torch.device | str = "cpu") -> dict:
    """Success rate (%) of planning the motion of the embedded test clips: from frame 0 to frame ``horizon``, the
    plan's mean displacement against the true one (``motion``), over ``limit`` clips (all without)."""
    device = torch.device(device)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    generator = torch.Generator(device=device).manual_seed(seed)
    hits, errors, count = 0, 0.0, 0
    model.eval()
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(n, start + batch_size))
        batch = {k: v.to(device) for k, v in dataset.gather(index).items()}
        actions, states = model.actions_states(batch)
        tokens = model.frame_tokens(model.preprocess(batch))
        plan = cem_plan(model, tokens[:, 0], states[:, 0], tokens[:, horizon], horizon=horizon, samples=samples,
                        iterations=iterations, top_k=top_k, max_norm=max_norm, generator=generator)
        truth = actions[:, :horizon].mean(1)
        planned = plan.mean(1)
        hits += int((direction_of(planned) == direction_of(truth)).sum())
        errors += float((planned - truth).norm(dim=-1).sum())
        count += len(index)
    return {"success": 100.0 * hits / count, "mean_action_error_px": errors / count, "clips": count, "horizon": horizon,
            "samples": samples, "iterations": iterations, "top_k": top_k, "max_norm": max_norm, "chance": 12.5}
