"""`torchrun` data parallelism: ranks share the step's prompts, the token normalizer is global.

Each rank samples and scores its share of the step's prompts (whole GRPO groups stay on
one rank) and divides its loss by the step's active-token count summed over all ranks
(docs/design.md §4). The rank losses then add up to the single-process loss, so gradients
are all-reduced with SUM, not averaged: no world-size factor to get right. One flat
all-reduce per step after the micro-batches; DDP's bucketed overlap of communication
with the backward pass is the optimization a GPU run would add.

With `fsdp=true` the student is sharded by FSDP2 `fully_shard` (each decoder layer,
then the root) for students that do not fit one device; its reduce-scatter is set to
SUM for the same reason. Every forward of a sharded model is a collective, so ranks
must run the same number of them: generation uses `synced_gpus`, the loop requires
equal rows per rank, and evaluation and checkpoints use an unsharded copy on rank 0
built from the gathered state (`unsharded`).
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


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 in place: every decoder layer (the model's `_no_split_modules`), then the root."""
    from torch.distributed.fsdp import fully_shard

    from opd.grads import plain_gradients

    plain_gradients(model)  # FSDP reduce-scatters the gradients autograd delivers: none may bypass it
    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise ValueError(f"fsdp=true: found no decoder layers ({sorted(layer_types)}) in {type(model).__name__} to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    for module in [*layers, model]:  # each FSDP module reduces its own parameter group
        module.set_gradient_divide_factor(1.0)  # losses already divide by the global token count: sum, not mean
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM reduce-scatter (gloo has no PREMUL_SUM)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unsharded(model: torch.nn.Module, d: Dist) -> torch.nn.Module | None:
    """The model itself, or under FSDP an unsharded copy on rank 0 (None elsewhere): a collective then."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return None
    plain = AutoModelForCausalLM.from_config(model.config, dtype=next(iter(state.values())).dtype)
    plain.load_state_dict(state)
    from opd.precision import compute_dtype_of, set_compute_dtype

    return set_compute_dtype(plain, str(compute_dtype_of(model)).removeprefix("torch."))  # evaluate as it trains


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state keyed by parameter name (a collective under FSDP; empty off rank 0 there).

    The same format with or without FSDP, so a checkpoint resumes either way.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sum_gradients(model: torch.nn.Module, d: Dist) -> None:
    """Add up every rank's gradient in place (one flat all-reduce; FSDP already reduce-scattered them)."""
    if d.world == 1 or is_sharded(model):
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
