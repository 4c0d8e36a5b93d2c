"""The student's `[V, H]` embedding and head gradients, added in place into the weight's `.grad`.

A tied embedding is one `[V, H]` weight used twice per forward: the input lookup and the output head.
Through autograd, each micro-batch's backward makes dense `[V, H]` gradients for it: the lookup's
zero-filled one (once per pass: the shared-prompt forward makes two), the head kernel's product,
their sum, and the add into `.grad`, each a fresh 113 MB at V = 49,152, H = 576 (SmolLM2), whose
first touch costs page faults (30 ms a buffer against 4 ms to refill a reused one, measured here).
Megatron-LM's `gradient_accumulation_fusion` takes the same way out: the gradient goes straight into
the weight's own fp32 gradient buffer, and autograd is handed none.

`accumulate_in_place(model)` makes the student do that:
- its input lookup (`_LookupInto`) adds each row's gradient with `index_add_` (a padding id's row gets
  none, as `nn.Embedding(padding_idx=...)` does);
- `opd.forward.model_head` gives its linear head `grad_into=` the weight (`opd.heads`), so the kernel's
  chunks add `grad.T @ features` into `.grad[:V]` with `addmm_`.
The first writer of a step allocates `.grad` (zeros); the values equal autograd's up to the order of
additions (tests/test_grads.py). Only a plain `nn.Embedding` lookup is replaced (a scaled or renormed
one keeps its own), and a sharded student keeps autograd's path (`plain_gradients`, before FSDP: its
reduce-scatter reads gradients autograd delivers). Anything that asks autograd for this weight's
gradient (`torch.autograd.grad`) would get none: it is for `loss.backward()` into `.grad` only, as the
training loop does.
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import Tensor

_IN_PLACE: weakref.WeakSet = weakref.WeakSet()  # models whose [V, H] gradients go straight into .grad


def grad_buffer(weight: Tensor) -> Tensor:
    """`weight.grad`, made (zeros) by the first writer of a step."""
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    return weight.grad


class _LookupInto(torch.autograd.Function):
    """`F.embedding(ids, weight)` whose backward adds into `weight.grad` and hands autograd None."""

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, padding_idx: int | None) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (ids,) = ctx.saved_tensors
        ids_N, grad_N_H = ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.padding_idx is not None:
            grad_N_H = grad_N_H.masked_fill((ids_N == ctx.padding_idx)[:, None], 0.0)
        grad_buffer(ctx.weight).index_add_(0, ids_N, grad_N_H.to(ctx.weight.dtype))
        return None, None, None


def _lookup_forward(self, ids: Tensor) -> Tensor:
    """A plain `nn.Embedding`'s forward, its weight's gradient added in place when it is wanted."""
    if self.weight.requires_grad and torch.is_grad_enabled():
        return _LookupInto.apply(ids, self.weight, self.padding_idx)
    return type(self).forward(self, ids)


def accumulate_in_place(model: torch.nn.Module) -> torch.nn.Module:
    """Route `model`'s input-embedding and linear-head weight gradients straight into `.grad`; returns `model`.

    A bound method on the embedding module (not a closure), so `copy.deepcopy` (a frozen self-teacher)
    rebinds it to the copy's own weight.
    """
    embedding = model.get_input_embeddings()
    if (type(embedding) is torch.nn.Embedding and embedding.max_norm is None and not embedding.scale_grad_by_freq
            and not embedding.sparse):
        embedding.forward = types.MethodType(_lookup_forward, embedding)
    _IN_PLACE.add(model)
    return model


def plain_gradients(model: torch.nn.Module) -> None:
    """Undo `accumulate_in_place`: autograd delivers every gradient again (before sharding with FSDP)."""
    embedding = model.get_input_embeddings()
    if embedding is not None:
        embedding.__dict__.pop("forward", None)
    _IN_PLACE.discard(model)


def in_place_weight(model: torch.nn.Module) -> Tensor | None:
    """The output layer's weight when `model` adds its gradient in place and it wants one, else None."""
    if model not in _IN_PLACE:
        return None
    weight = model.get_output_embeddings().weight
    return weight if weight.requires_grad and weight.is_leaf else None
