"""A head: the map from a chunk of features `[C, X]` to logits `[C, V]`, with its parameters explicit.

The kernels of `opd.kernels` take features and a head instead of logits, so they form logits a chunk
of rows at a time. Whatever the model's output layer is, it is one `Head` (chosen by `opd.forward`):

- `linear_head(W)`: `f @ W.T`, the plain bias-free output embedding; its vector-Jacobian product is
  two matmuls, accumulated in place (Liger-Kernel's fused linear cross-entropy does the same). With
  `grad_into=` a leaf weight, the weight's gradient is added straight into that leaf's `.grad[:V]`
  and autograd is handed none for it (`opd.grads`: the student's tied `[V, H]` weight).
- `softcapped_head(W, c)`: `c · tanh(f @ W.T / c)` (Gemma 2's `final_logit_softcapping`).
- `module_head(m, V)`: any differentiable module, e.g. a LoRA-adapted `lm_head`.
- `IDENTITY`: the features are already logits rows (a model that is not `lm_head(last_hidden_state)`).

A head that is neither linear nor the identity is differentiated per chunk by autograd on the
recomputed chunk, as `torch.utils.checkpoint` recomputes a segment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from opd.grads import grad_buffer


@dataclass(frozen=True)
class Head:
    """`logits_C_V = fn(features_C_X, *params)`; `kind` is "linear", "identity" or "function".

    `grad_into` (linear only): the leaf whose `.grad` takes the weight's gradient in place.
    """

    fn: Callable[..., Tensor]
    params: tuple[Tensor, ...] = ()
    kind: str = "function"
    grad_into: Tensor | None = None

    def __call__(self, features_C_X: Tensor) -> Tensor:
        return self.fn(features_C_X, *self.params)

    def chunk(self, features_C_X: Tensor, params: tuple[Tensor, ...], needs: tuple[bool, ...], logits: bool = True):
        """(logits_C_V, vjp): the chunk's logits and `vjp(grad_C_V, grad_features_C_X | None, grads_params)`,
        which writes the gradient of the features and adds those of the parameters into `grads_params`
        (an entry that is None and needed is set by the first chunk, in the parameter's dtype).

        `needs`: whether the features, then each parameter, want a gradient. `logits=False`: the caller
        kept this chunk's logits from the forward; a linear or identity head then returns (None, vjp)
        without the matmul (a function head recomputes them: its vjp needs them).
        """
        need_f, need_p = needs[0], needs[1:]
        if self.kind == "identity":
            def vjp(grad_C_V, grad_f_C_X, grads_p):
                if grad_f_C_X is not None:
                    grad_f_C_X.copy_(grad_C_V)
            return features_C_X if logits else None, vjp
        if self.kind == "linear":
            (weight_V_X,) = params

            def vjp(grad_C_V, grad_f_C_X, grads_p):
                grad_C_V = grad_C_V.to(features_C_X.dtype)
                if grad_f_C_X is not None:
                    torch.mm(grad_C_V, weight_V_X, out=grad_f_C_X)
                if need_p[0] and self.grad_into is not None:  # straight into the leaf's gradient, rows [:V]
                    grad_buffer(self.grad_into)[: weight_V_X.shape[0]].addmm_(grad_C_V.T, features_C_X)
                elif need_p[0]:  # the first chunk writes the product: no zero-filled [V, X] buffer to add it to
                    if grads_p[0] is None:
                        grads_p[0] = grad_C_V.T @ features_C_X
                    else:
                        grads_p[0].addmm_(grad_C_V.T, features_C_X)
            return features_C_X @ weight_V_X.T if logits else None, vjp
        if not (need_f or any(need_p)):
            return self.fn(features_C_X, *params), None
        with torch.enable_grad():
            f_d = features_C_X.detach().requires_grad_(need_f)
            p_d = tuple(p.detach().requires_grad_(n) for p, n in zip(params, need_p, strict=True))
            logits_C_V = self.fn(f_d, *p_d)

        def vjp(grad_C_V, grad_f_C_X, grads_p):
            wanted = [t for t in (f_d, *p_d) if t.requires_grad]
            grads = iter(torch.autograd.grad(logits_C_V, wanted, grad_C_V.to(logits_C_V.dtype)))
            if need_f:
                grad_f_C_X.copy_(next(grads))
            for i, n in enumerate(need_p):
                if n:
                    grad = next(grads)
                    if grads_p[i] is None:
                        grads_p[i] = grad.to(params[i].dtype, copy=True)
                    else:
                        grads_p[i].add_(grad)
        return logits_C_V.detach(), vjp

    def returned_grads(self, grads_p: list, params: tuple[Tensor, ...], needs_p: tuple[bool, ...]) -> list:
        """The parameters' gradients a kernel hands autograd: what the chunks' vjps accumulated, None for one
        added in place (`grad_into`), zeros for a needed one no chunk reached (no rows)."""
        if self.grad_into is not None:
            return [None] * len(params)
        return [torch.zeros_like(p) if n and g is None else g for g, p, n in zip(grads_p, params, needs_p, strict=True)]


def _linear(features_C_X: Tensor, weight_V_X: Tensor) -> Tensor:
    return features_C_X @ weight_V_X.T


def _softcapped(features_C_X: Tensor, weight_V_X: Tensor, cap: float) -> Tensor:
    return torch.tanh((features_C_X @ weight_V_X.T) / cap) * cap


def linear_head(weight_V_X: Tensor, grad_into: Tensor | None = None) -> Head:
    """`f @ W.T` (pass `W[:vocab_size]` to leave padded rows out); `grad_into`: the leaf `W` is (a slice of)
    whose `.grad` takes the weight gradient in place."""
    return Head(_linear, (weight_V_X,), "linear", grad_into)


def softcapped_head(weight_V_X: Tensor, cap: float) -> Head:
    """`cap · tanh(f @ W.T / cap)`, as Gemma 2 applies `final_logit_softcapping` after `lm_head`."""
    return Head(partial(_softcapped, cap=float(cap)), (weight_V_X,))


def module_head(module: torch.nn.Module, vocab_size: int | None = None) -> Head:
    """`module(f)[:, :vocab_size]` through `torch.func.functional_call`, so its parameters are the kernel's inputs."""
    names, params = zip(*module.named_parameters(), strict=True)

    def fn(features_C_X: Tensor, *values: Tensor) -> Tensor:
        logits_C_V = torch.func.functional_call(module, dict(zip(names, values, strict=True)), (features_C_X,))
        return logits_C_V if vocab_size is None else logits_C_V[..., :vocab_size]
    return Head(fn, tuple(params))


IDENTITY = Head(lambda features_C_X: features_C_X, (), "identity")
