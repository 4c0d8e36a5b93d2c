"""Token log-probabilities, chunked logsumexp, masks and masked reductions.

Pure tensor helpers for the data contract of docs/design.md §3-4. Shapes: `B` sequences, `T` target
positions, `V` vocabulary, `K` gathered ids per position, `N` flattened rows, `C` rows in one chunk.

Memory rule: a full-vocabulary logsumexp is computed in fp32 one chunk of rows at a time, and the
backward recomputes the softmax chunk by chunk into one preallocated gradient of the logits' dtype,
so no fp32 `[B, T, V]` copy of the logits is ever alive (the idea of Liger-Kernel's chunked losses).
Default chunks are small (64 rows): on CPU a chunk that stays in cache is fastest (bench/bench_losses.py),
and 64 rows of a 150k vocabulary are still ~10M elements per kernel on a GPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _compute_dtype(x: Tensor) -> torch.dtype:
    # fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 so gradcheck can run in double precision.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_chunk_size(chunk_size: int, name: str = "chunk_size") -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name} must be a positive int, got {chunk_size!r}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _rows(x_lead_V: Tensor) -> Tensor:
    """`x` as a `[N, V]` view when its layout allows one, else `x` itself (never a copy).

    A slice such as `logits_B_L_V[:, :-1]` cannot be flattened without copying; it is then
    iterated per leading index by `_row_blocks` instead.
    """
    if x_lead_V.dim() < 2 or x_lead_V.shape[-1] < 1:
        raise ValueError(f"expected logits of shape [..., V] with >= 2 dims and V >= 1, got {tuple(x_lead_V.shape)}")
    try:
        return x_lead_V.view(-1, x_lead_V.shape[-1])
    except RuntimeError:
        return x_lead_V


def _row_blocks(lead_shape: torch.Size, chunk_size: int) -> Iterator[tuple]:
    """Index tuples over the leading dims, each selecting at most `chunk_size` rows as a view."""
    *outer, n = lead_shape
    for prefix in itertools.product(*(range(s) for s in outer)):
        for start in range(0, n, chunk_size):
            yield (*prefix, slice(start, min(start + chunk_size, n)))


def _scaled_chunk(x_C_V: Tensor, temperature: float, dtype: torch.dtype, threshold_C: Tensor | None) -> Tensor:
    """`x / temperature` in `dtype` (always a fresh tensor), entries below the row threshold set to -inf."""
    z_C_V = x_C_V.to(dtype) / temperature
    if threshold_C is not None:
        z_C_V.masked_fill_(z_C_V < threshold_C[..., None], float("-inf"))
    return z_C_V


class _ChunkedLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_lead_V: Tensor, chunk_size: int, temperature: float) -> Tensor:
        dtype = _compute_dtype(x_lead_V)
        lse_lead = torch.empty(x_lead_V.shape[:-1], dtype=dtype, device=x_lead_V.device)
        for idx in _row_blocks(x_lead_V.shape[:-1], chunk_size):
            lse_lead[idx] = torch.logsumexp(_scaled_chunk(x_lead_V[idx], temperature, dtype, None), dim=-1)
        ctx.save_for_backward(x_lead_V, lse_lead)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return lse_lead

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse_lead: Tensor):
        x_lead_V, lse_lead = ctx.saved_tensors
        grad_x = torch.empty(x_lead_V.shape, dtype=x_lead_V.dtype, device=x_lead_V.device)
        for idx in _row_blocks(x_lead_V.shape[:-1], ctx.chunk_size):
            g_C = grad_lse_lead[idx].to(lse_lead.dtype)
            probs_C_V = torch.softmax(_scaled_chunk(x_lead_V[idx], ctx.temperature, lse_lead.dtype, None), dim=-1)
            probs_C_V.mul_(g_C[..., None] / ctx.temperature)
            # Rows with zero upstream gradient (masked positions) get an exact 0, even if they hold NaN.
            probs_C_V.masked_fill_((g_C == 0)[..., None], 0.0)
            grad_x[idx] = probs_C_V
        return grad_x, None, None


class _ChunkedLogSoftmaxGather(torch.autograd.Function):
    """log-softmax(x / temperature) at `ids`, optionally restricted to entries >= a per-row threshold.

    The fused gather matters: `gather`'s own backward would allocate a second `[N, V]` gradient.
    """

    @staticmethod
    def forward(ctx, x_lead_V, ids_lead_K, threshold_lead, chunk_size, temperature):
        dtype = _compute_dtype(x_lead_V)
        out_lead_K = torch.empty(ids_lead_K.shape, dtype=dtype, device=x_lead_V.device)
        lse_lead = torch.empty(x_lead_V.shape[:-1], dtype=dtype, device=x_lead_V.device)
        for idx in _row_blocks(x_lead_V.shape[:-1], chunk_size):
            thr_C = None if threshold_lead is None else threshold_lead[idx]
            z_C_V = _scaled_chunk(x_lead_V[idx], temperature, dtype, thr_C)
            lse_lead[idx] = torch.logsumexp(z_C_V, dim=-1)
            out_lead_K[idx] = z_C_V.gather(-1, ids_lead_K[idx]) - lse_lead[idx][..., None]
        ctx.save_for_backward(x_lead_V, ids_lead_K, lse_lead, threshold_lead)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out_lead_K

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out_lead_K: Tensor):
        x_lead_V, ids_lead_K, lse_lead, threshold_lead = ctx.saved_tensors
        grad_x = torch.empty(x_lead_V.shape, dtype=x_lead_V.dtype, device=x_lead_V.device)
        for idx in _row_blocks(x_lead_V.shape[:-1], ctx.chunk_size):
            thr_C = None if threshold_lead is None else threshold_lead[idx]
            z_C_V = _scaled_chunk(x_lead_V[idx], ctx.temperature, lse_lead.dtype, thr_C)
            ids_C_K, g_C_K = ids_lead_K[idx], grad_out_lead_K[idx].to(lse_lead.dtype) / ctx.temperature
            if thr_C is not None:
                # A target outside the truncated support has logprob -inf, constant under small changes.
                g_C_K = g_C_K.masked_fill(z_C_V.gather(-1, ids_C_K) == float("-inf"), 0.0)
            # d(z_k - lse)/dz = onehot(k) - softmax(z), times 1/temperature (folded into g).
            probs_C_V = torch.softmax(z_C_V, dim=-1).mul_(-g_C_K.sum(-1, keepdim=True))
            probs_C_V.scatter_add_(-1, ids_C_K, g_C_K)
            probs_C_V.masked_fill_((g_C_K == 0).all(-1, keepdim=True), 0.0)
            grad_x[idx] = probs_C_V
        return grad_x, None, None, None, None


def chunked_logsumexp(x_N_V: Tensor, chunk_size: int = 64, temperature: float = 1.0) -> Tensor:
    """logsumexp over the last dim of `x / temperature`, in fp32, `chunk_size` rows at a time.

    Shapes: `x_N_V` is `[N, V]` or any `[..., V]` (leading dims are iterated without copying);
    returns `x.shape[:-1]`, fp32 (fp64 for an fp64 input). Equals `torch.logsumexp(x.float() / t, -1)`
    in value and gradient. The backward recomputes `softmax` per chunk and writes into one gradient
    tensor of `x`'s dtype. Rows whose upstream gradient is exactly 0 get an exact 0 gradient, so
    NaN/inf garbage in masked rows never reaches the gradient (docs/design.md §3).
    """
    _check_chunk_size(chunk_size)
    _check_temperature(temperature)
    rows = _rows(x_N_V)
    return _ChunkedLogSumExp.apply(rows, chunk_size, float(temperature)).reshape(x_N_V.shape[:-1])


@torch.no_grad()
def _truncation_threshold(rows_lead_V: Tensor, temperature: float, top_k: int, top_p: float, chunk_size: int) -> Tensor:
    """Per-row smallest scaled logit kept by top-k then top-p, as transformers' warpers compute it."""
    dtype = _compute_dtype(rows_lead_V)
    V = rows_lead_V.shape[-1]
    thr_lead = torch.full(rows_lead_V.shape[:-1], float("-inf"), dtype=dtype, device=rows_lead_V.device)
    for idx in _row_blocks(rows_lead_V.shape[:-1], chunk_size):
        z_C_V = _scaled_chunk(rows_lead_V[idx], temperature, dtype, None)
        if 0 < top_k < V:
            # TopKLogitsWarper: remove scores < k-th largest (ties with it are kept).
            kth_C = torch.topk(z_C_V, top_k, dim=-1).values[..., -1]
            z_C_V.masked_fill_(z_C_V < kth_C[..., None], float("-inf"))
            thr_lead[idx] = kth_C
        if top_p < 1.0:
            # TopPLogitsWarper: ascending sort, drop while cumulative prob <= 1 - p, always keep the top one.
            sorted_C_V = torch.sort(z_C_V, dim=-1).values
            removed_C_V = sorted_C_V.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
            removed_C_V[..., -1] = False
            first_kept_C = removed_C_V.sum(-1, keepdim=True)  # cumsum is monotone, so removed is a prefix
            thr_lead[idx] = sorted_C_V.gather(-1, first_kept_C)[..., 0]
    return thr_lead


def token_logprobs(
    logits_B_T_V: Tensor,
    targets_B_T: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    chunk_size: int = 64,
) -> Tensor:
    """Log-prob of each target under the distribution a sampler would draw it from.

    logits_B_T_V: `[..., V]` any float dtype; targets_B_T: `[...]` integer ids in `[0, V)`.
    Returns `logprobs_B_T` in fp32 (fp64 for fp64 logits):
        z = logits / temperature; keep = top_p(top_k(z)); logprob = z[y] - logsumexp(z[keep])
    The order temperature -> top_k -> top_p is the order of transformers' logits processors (and
    vLLM's sampler); top_k = 0 and top_p = 1 disable truncation. A target outside the truncated
    support gets -inf. Ties: top-k keeps every token tied with the k-th (as transformers does);
    top-p keeps every token tied with the last kept one (a sampler's pick among exact ties depends
    on its sort order; we keep the superset). The result is differentiable on both paths, with
    the support treated as constant (it is piecewise constant in the logits); memory stays
    O(chunk_size * V) besides the gradient.
    """
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables), got {top_p!r}")
    if logits_B_T_V.shape[:-1] != targets_B_T.shape:
        raise ValueError(f"logits {tuple(logits_B_T_V.shape)} and targets {tuple(targets_B_T.shape)} "
                         "disagree on leading dims")
    if targets_B_T.is_floating_point() or targets_B_T.is_complex():
        raise ValueError(f"targets must be integer ids, got dtype {targets_B_T.dtype}")
    V = logits_B_T_V.shape[-1]
    if targets_B_T.numel() > 0 and (targets_B_T.min() < 0 or targets_B_T.max() >= V):
        bad = targets_B_T[(targets_B_T < 0) | (targets_B_T >= V)][0].item()
        raise ValueError(f"target id {bad} is outside the vocabulary [0, {V})")
    rows = _rows(logits_B_T_V)
    ids_lead_1 = targets_B_T.reshape(*rows.shape[:-1], 1).long()
    truncated = (0 < top_k < V) or top_p < 1.0
    threshold = _truncation_threshold(rows, float(temperature), top_k, top_p, chunk_size) if truncated else None
    out = _ChunkedLogSoftmaxGather.apply(rows, ids_lead_1, threshold, chunk_size, float(temperature))
    return out.reshape(targets_B_T.shape)


def gather_logprobs(logits_B_T_V: Tensor, ids_B_T_K: Tensor, temperature: float = 1.0, chunk_size: int = 64) -> Tensor:
    """Untruncated log-softmax(logits / temperature) gathered at `ids_B_T_K`, fp32, shape `ids_B_T_K.shape`.

    Same chunked memory profile as `token_logprobs`; ids must already be valid (`[0, V)`), the
    caller validates them (see `losses.topk_forward_kl_loss`).
    """
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    if logits_B_T_V.shape[:-1] != ids_B_T_K.shape[:-1]:
        raise ValueError(f"logits {tuple(logits_B_T_V.shape)} and ids {tuple(ids_B_T_K.shape)} "
                         "disagree on leading dims")
    rows = _rows(logits_B_T_V)
    ids_lead_K = ids_B_T_K.reshape(*rows.shape[:-1], ids_B_T_K.shape[-1]).long()
    out = _ChunkedLogSoftmaxGather.apply(rows, ids_lead_K, None, chunk_size, float(temperature))
    return out.reshape(ids_B_T_K.shape)


def completion_mask(prompt_lens_B: Tensor, completion_lens_B: Tensor, num_targets: int) -> Tensor:
    """`loss_mask_B_T`, float32 0/1: mask[b, t] = 1 iff p_b - 1 <= t < p_b - 1 + c_b.

    Target position t predicts token t + 1 (docs/design.md §3), so the first completion token of a
    sequence with prompt length p_b is target p_b - 1. Built from lengths, never from token ids.
    """
    if prompt_lens_B.dim() != 1 or prompt_lens_B.shape != completion_lens_B.shape:
        raise ValueError(f"prompt_lens {tuple(prompt_lens_B.shape)} and completion_lens "
                         f"{tuple(completion_lens_B.shape)} must be equal 1-d shapes")
    if (prompt_lens_B < 1).any():
        row = int((prompt_lens_B < 1).nonzero()[0])
        raise ValueError(f"row {row}: prompt length {int(prompt_lens_B[row])} < 1")
    if (completion_lens_B < 0).any():
        row = int((completion_lens_B < 0).nonzero()[0])
        raise ValueError(f"row {row}: completion length {int(completion_lens_B[row])} < 0")
    start_B = prompt_lens_B.long() - 1
    end_B = start_B + completion_lens_B.long()
    if (end_B > num_targets).any():
        row = int((end_B > num_targets).nonzero()[0])
        raise ValueError(f"row {row}: prompt {int(prompt_lens_B[row])} + completion {int(completion_lens_B[row])} "
                         f"tokens need {int(end_B[row])} target positions, only {num_targets} exist")
    t_T = torch.arange(num_targets, device=prompt_lens_B.device)
    return ((t_T >= start_B[:, None]) & (t_T < end_B[:, None])).float()


def _check_same_shape(values: Tensor, mask: Tensor) -> None:
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same shape")


def masked_sum(values_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """Σ values·m over positions with m != 0 (0/1 bool or float mask); masked NaN/inf never reach it."""
    _check_same_shape(values_B_T, mask_B_T)
    return torch.where(mask_B_T != 0, values_B_T * mask_B_T, torch.zeros_like(values_B_T)).sum()


def masked_mean(values_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """masked_sum / max(Σ m, 1): a per-call mean over active tokens, for metrics."""
    count = torch.where(mask_B_T != 0, mask_B_T, torch.zeros_like(mask_B_T)).sum()
    return masked_sum(values_B_T, mask_B_T) / count.to(torch.float32).clamp(min=1.0)


def normalized_sum(values_B_T: Tensor, mask_B_T: Tensor, num_tokens: float | Tensor) -> Tensor:
    """Σ values·m / N, N = active tokens of the whole optimizer step (docs/design.md §4 normalization).

    Using the step-global N makes the gradient independent of padding, micro-batching and ranks.
    N = 0 (nothing active anywhere) returns an exact 0 whose gradient is an exact 0.
    """
    total = masked_sum(values_B_T, mask_B_T)
    return total / step_token_count(num_tokens, mask_B_T, total.dtype).clamp(min=1.0)


def step_token_count(num_tokens: float | Tensor, mask_B_T: Tensor, dtype: torch.dtype) -> Tensor:
    """`num_tokens` as a detached scalar tensor, checked: >= 0, and >= this call's own active tokens."""
    n = torch.as_tensor(num_tokens, dtype=dtype, device=mask_B_T.device).detach()
    if n.numel() != 1 or not bool(n >= 0):
        raise ValueError(f"num_tokens must be a scalar >= 0, got {num_tokens!r}")
    local = (mask_B_T != 0).sum()
    if bool(local > n):
        raise ValueError(f"this micro-batch has {int(local)} active tokens but num_tokens (the step-global "
                         f"count) is {float(n)}: pass the count over all micro-batches and ranks")
    return n
