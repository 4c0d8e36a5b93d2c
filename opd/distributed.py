"""`torchrun` data parallelism: ranks share the step's prompts, the token normalizer is global.

Each rank samples and scores its share of the step's prompts (whole GRPO groups stay on
one rank) and divides its loss by the step's active-token count summed over all ranks
(DESIGN.md §4). The rank losses then add up to the single-process loss, so gradients
are all-reduced with SUM, not averaged: no world-size factor to get right. One flat
all-reduce per step after the micro-batches; DDP's bucketed overlap of communication
with the backward pass is the optimization a GPU run would add.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init() -> Dist:
    """The process group from torchrun's environment (gloo on CPU, NCCL on GPU); a no-op alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size())


def shard(items: list, d: Dist) -> list:
    """This rank's share, strided so that every rank gets the same count when it divides evenly."""
    return items[d.rank :: d.world]


def all_sum(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def sum_gradients(model: torch.nn.Module, d: Dist) -> None:
    """Add up every rank's gradient in place (one flat all-reduce)."""
    if d.world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def weighted_mean_metrics(metrics: dict[str, float], weight: float, d: Dist) -> dict[str, float]:
    """Every rank's metrics averaged with weight (its active tokens); same keys on every rank."""
    if d.world == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] * weight for k in keys] + [weight], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def close(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
