"""The generalized JSD kernel: `losses.generalized_jsd_loss` from features and heads, no `[N, V]` logits alive.

The loss is a weighted sum whose weights are known in the forward, so each chunk's gradient is taken
there (Liger-Kernel's fused linear loss) and the backward only scales it. Conventions as in
`opd.kernels` (chunks of `chunk_rows(V, N)` rows, fp32, any `opd.heads.Head`); tests/test_kernels.py
checks value and gradient against the spec.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from opd.heads import IDENTITY, Head
from opd.kernels import _cut, _needs, check_beta, chunk_rows, head_vocab
from opd.logprobs import check_chunk_size, check_temperature, compute_dtype, masked_mean, step_token_count


def jsd_rows(s_C_V: Tensor, t_C_V: Tensor, beta: float, temperature: float) -> tuple[Tensor, Tensor]:
    """Per-row generalized JSD of logits `[C, V]` and its gradient w.r.t. the student's, fp32 (fp64 for fp64 input).

    With g = ∂JSD/∂P_S = (1-β) log(P_S/M) (log(P_S/P_T) + 1 at β=1), the softmax Jacobian gives
    ∂JSD/∂z_s = P_S (g - Σ P_S g) / τ; at β=0 it is (P_S - P_T) / τ. Log-probs are floored at
    -1e4 (exp underflows to 0 long before), so 0·log 0 terms are exactly 0 without extra passes.
    """
    dtype = compute_dtype(s_C_V)
    z_s_C_V, z_t_C_V = s_C_V.to(dtype) / temperature, t_C_V.to(dtype) / temperature
    log_ps_C_V = torch.log_softmax(z_s_C_V, dim=-1).clamp_(min=-1e4)
    log_pt_C_V = torch.log_softmax(z_t_C_V, dim=-1).clamp_(min=-1e4)
    ps_C_V = log_ps_C_V.exp()
    if beta == 0.0:
        pt_C_V = log_pt_C_V.exp()
        value_C = torch.linalg.vecdot(pt_C_V, log_pt_C_V.sub_(log_ps_C_V))
        return value_C.clamp(min=0.0), ps_C_V.sub_(pt_C_V).div_(temperature)
    if beta == 1.0:  # KL(P_S‖P_T) reads the teacher's log-probs only
        log_ref_C_V, weight_s, value_t_C = log_pt_C_V, 1.0, 0.0
    else:
        # log M = log(β P_T + (1-β) P_S), floored at the smallest normal float (M may underflow to 0).
        pt_C_V = log_pt_C_V.exp()
        log_ref_C_V = torch.add(pt_C_V * beta, ps_C_V, alpha=1.0 - beta).clamp_(min=torch.finfo(dtype).tiny).log_()
        value_t_C = beta * torch.linalg.vecdot(pt_C_V, log_pt_C_V.sub_(log_ref_C_V))
        weight_s = 1.0 - beta
    diff_C_V = log_ps_C_V.sub_(log_ref_C_V)
    kl_s_C = torch.linalg.vecdot(ps_C_V, diff_C_V)
    grad_C_V = ps_C_V.mul_(diff_C_V.sub_(kl_s_C[:, None])).mul_(weight_s / temperature)
    # A divergence is >= 0; fp32 rounding can leave ~-1e-7 for near-identical rows.
    return (value_t_C + weight_s * kl_s_C).clamp(min=0.0), grad_C_V


class _JSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features_N_X, teacher_N_Y, weights_N, head, teacher_head, beta, temperature, chunk_size, sub_rows,
                *params):
        needs = _needs(ctx, 9)
        N = features_N_X.shape[0]
        values_N = torch.empty(N, dtype=weights_N.dtype, device=features_N_X.device)
        grad_f_N_X = torch.empty_like(features_N_X) if needs[0] else None
        grads_p = [None] * len(params)
        teacher_device = teacher_head.params[0].device if teacher_head.params else teacher_N_Y.device
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            z_s_C_V, vjp = head.chunk(features_N_X[rows], tuple(params), needs)
            z_t_C_V = teacher_head(teacher_N_Y[rows].to(teacher_device)).to(z_s_C_V.device)
            # the gradient overwrites the student logits it came from, unless they are the input rows themselves
            grad_C_V = z_s_C_V if head.kind == "linear" else torch.empty_like(z_s_C_V)
            for sub in range(0, z_s_C_V.shape[0], sub_rows):
                part = slice(sub, sub + sub_rows)
                value_R, grad_R_V = jsd_rows(z_s_C_V[part], z_t_C_V[part], beta, temperature)
                values_N[start + sub : start + sub + value_R.shape[0]] = value_R
                grad_C_V[part] = grad_R_V.mul_(weights_N[rows][part, None])
            if vjp is not None:
                vjp(grad_C_V, None if grad_f_N_X is None else grad_f_N_X[rows], grads_p)
        ctx.save_for_backward(grad_f_N_X, *head.returned_grads(grads_p, params, needs[1:]))
        ctx.mark_non_differentiable(values_N)
        return torch.linalg.vecdot(values_N, weights_N), values_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_values_N: Tensor):
        # out of place: a second backward (retain_graph, gradcheck) must find the saved gradients intact
        grad_f, *grads_p = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (grad_f, None, None, None, None, None, None, None, None, *grads_p)


def jsd_loss(features_N_X: Tensor, head: Head, teacher_N_Y: Tensor, loss_mask_N: Tensor, num_tokens: float | Tensor,
             beta: float = 0.5, temperature: float = 1.0, teacher_head: Head = IDENTITY, chunk_size: int | None = None,
             sub_rows: int | None = None) -> tuple[Tensor, dict]:
    """`losses.generalized_jsd_loss(head(features), teacher_head(teacher), mask, num_tokens)` without `[N, V]` logits.

    Teacher: logits rows `[N, V']` (the default identity head) or hidden states with the teacher's head.
    Rows whose mask is 0 are never computed; both sides compare over the shared `V = min(V, V')` ids.
    `chunk_size` rows of logits exist at a time (default `chunk_rows(V)`); the divergence runs on `sub_rows`
    rows at a time (default: 64k entries, which stay in cache). Gradient to the student's features and head parameters only.
    """
    check_temperature(temperature)
    check_beta(beta)
    N = features_N_X.shape[0]
    heads_line_up = all(h.kind != "linear" or h.params[0].shape[1:] == x.shape[1:]
                        for h, x in ((head, features_N_X), (teacher_head, teacher_N_Y)))
    if (features_N_X.dim() != 2 or teacher_N_Y.dim() != 2 or teacher_N_Y.shape[0] != N
            or tuple(loss_mask_N.shape) != (N,) or not heads_line_up):
        shapes = [tuple(h.params[0].shape) for h in (head, teacher_head) if h.params]
        raise ValueError(f"shapes disagree: student features {tuple(features_N_X.shape)}, teacher "
                         f"{tuple(teacher_N_Y.shape)}, mask {tuple(loss_mask_N.shape)}, head / teacher head {shapes}")
    dtype = compute_dtype(features_N_X)
    n = step_token_count(num_tokens, loss_mask_N, dtype).clamp(min=1.0)
    active_N = loss_mask_N != 0
    weights_N = torch.where(active_N, loss_mask_N.to(dtype), 0.0) / n
    every_row = bool(active_N.all())  # training passes the active rows only: no gather
    pick = (lambda x: x) if every_row else (lambda x: x[active_N])
    features_A_X, teacher_A_Y = pick(features_N_X), pick(teacher_N_Y.detach())
    V = min(head_vocab(head, features_A_X), head_vocab(teacher_head, teacher_A_Y)) if features_A_X.shape[0] else 1
    # the head's gradient is made in this forward and scaled in the backward, so autograd delivers it
    head, features_A_X = _cut(dataclasses.replace(head, grad_into=None), features_A_X, V)
    teacher_head, teacher_A_Y = _cut(teacher_head, teacher_A_Y, V)
    teacher_head = Head(teacher_head.fn, tuple(p.detach() for p in teacher_head.params), teacher_head.kind)
    chunk_size = chunk_rows(V, features_A_X.shape[0]) if chunk_size is None else chunk_size
    check_chunk_size(chunk_size)
    sub_rows = max(1, 2**16 // V) if sub_rows is None else sub_rows
    check_chunk_size(sub_rows, "sub_rows")
    loss, values_A = _JSD.apply(features_A_X, teacher_A_Y, pick(weights_N), head, teacher_head, float(beta),
                                float(temperature), chunk_size, sub_rows, *head.params)
    values_N = values_A if every_row else torch.zeros_like(weights_N).masked_scatter(active_N, values_A)
    return loss, {"opd/jsd": masked_mean(values_N, loss_mask_N).float()}
