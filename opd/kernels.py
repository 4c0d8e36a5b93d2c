"""Chunked training kernels: each quantity from features `[N, X]` and a head, no `[N, V]` logits alive.

Logits exist `chunk_size` rows at a time, in fp32 (fp64 for fp64 input, so gradcheck can run); the
head is any `opd.heads.Head`, so logits rows (`IDENTITY`), a plain weight, a soft-capped or an adapted
head all take the same path. The specification of each quantity is the pure function of logits in
`opd.losses`; tests/test_kernels.py checks value and gradient against it.

- `gathered_logprobs`: `log softmax(head(f) / τ)[ids]` at K ids per row, optionally after the sampler's
  top-k / top-p truncation: the sampled-token logprobs (K = 1) and the student side of the top-k
  forward KL (the teacher's K ids). The backward reuses the forward's logits when they fit in
  `KEPT_LOGITS_BYTES` (64 MiB: 256 rows at V = 49,152 take 50 MB) and recomputes each chunk's otherwise.
- `jsd_loss` (opd/kernels_jsd.py): the generalized JSD of two heads' distributions, each chunk's gradient
  taken in the forward.
- `teacher_topk`: the teacher's sampled-token logprob and its own top-k at a temperature, no gradient.

The idea is Liger-Kernel's chunked losses and TRL's `_chunked_divergence_loss` (docs/design.md §3-4).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from opd.heads import IDENTITY, Head
from opd.logprobs import check_chunk_size, check_temperature, compute_dtype


@torch.no_grad()
def truncation_threshold(z_C_V: Tensor, top_k: int, top_p: float) -> Tensor:
    """Per-row smallest scaled logit kept by top-k then top-p, as transformers' warpers compute it (-inf: all)."""
    V = z_C_V.shape[-1]
    thr_C = torch.full(z_C_V.shape[:-1], float("-inf"), dtype=z_C_V.dtype, device=z_C_V.device)
    if 0 < top_k < V:
        # TopKLogitsWarper: remove scores < k-th largest (ties with it are kept).
        thr_C = torch.topk(z_C_V, top_k, dim=-1).values[..., -1]
        z_C_V = z_C_V.masked_fill(z_C_V < thr_C[..., None], float("-inf"))
    if top_p < 1.0:
        # TopPLogitsWarper: ascending sort, drop while cumulative prob <= 1 - p, always keep the top one.
        sorted_C_V = torch.sort(z_C_V, dim=-1).values
        removed_C_V = sorted_C_V.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
        removed_C_V[..., -1] = False
        first_kept_C = removed_C_V.sum(-1, keepdim=True)  # cumsum is monotone, so removed is a prefix
        thr_C = sorted_C_V.gather(-1, first_kept_C)[..., 0]
    return thr_C


def check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")


KEPT_LOGITS_BYTES = 64 * 2**20  # a differentiable gathered_logprobs keeps its forward's logits up to this size


CHUNK_ENTRIES = 2**24  # logits per chunk at most: 64 MiB in fp32, one [256, 49152] chunk


def chunk_rows(V: int, N: int | None = None) -> int:
    """Rows of logits per chunk: 256, fewer where 256 rows would pass `CHUNK_ENTRIES` (110 at V = 151,936),
    so the chunk's few `[C, V]` buffers stay bounded beside `[N, V]` at any V. Each chunk reads the whole
    `[V, H]` weight once per matmul, and on a CPU a head matmul of 64 rows runs at half the FLOP/s of one
    of 256 (docs/performance.md, 2026-12-04, third session), so chunks are as large as the budget allows.
    Given the row count N, the chunks split it evenly (300 rows: 2 x 150, not 256 + 44)."""
    rows = max(1, min(256, CHUNK_ENTRIES // max(V, 1)))
    if N:
        rows = -(-N // -(-N // rows))
    return rows


def _needs(ctx, first_param: int) -> tuple[bool, ...]:
    return (ctx.needs_input_grad[0], *ctx.needs_input_grad[first_param:])


def _scaled(z_C_V: Tensor, temperature: float, head: Head) -> Tensor:
    """`z / τ` as a tensor the caller may change in place: a linear head's logits are a fresh matmul's, kept at τ = 1."""
    return z_C_V if temperature == 1.0 and head.kind == "linear" else z_C_V / temperature


class _GatheredLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features_N_X, ids_N_K, head, temperature, top_k, top_p, chunk_size, *params):
        dtype = compute_dtype(features_N_X)
        N = features_N_X.shape[0]
        out_N_K = torch.empty(ids_N_K.shape, dtype=dtype, device=features_N_X.device)
        lse_N = torch.empty(N, dtype=dtype, device=features_N_X.device)
        truncated = top_k > 0 or top_p < 1.0
        thr_N = torch.empty_like(lse_N) if truncated else None
        # Small enough, the logits chunks are kept for the backward instead of recomputed there (one matmul less).
        keep = (any(ctx.needs_input_grad) and head.kind in ("linear", "identity")
                and N * head_vocab(head, features_N_X) * torch.finfo(dtype).bits // 8 <= KEPT_LOGITS_BYTES)
        ctx.kept = [] if keep else None
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            z_C_V = _scaled(head.fn(features_N_X[rows], *params).to(dtype), temperature, head)
            if truncated:
                thr_N[rows] = truncation_threshold(z_C_V, top_k, top_p)
                z_C_V.masked_fill_(z_C_V < thr_N[rows, None], float("-inf"))
            lse_N[rows] = torch.logsumexp(z_C_V, dim=-1)
            out_N_K[rows] = z_C_V.gather(-1, ids_N_K[rows]) - lse_N[rows, None]
            if keep:
                ctx.kept.append(z_C_V)
        ctx.save_for_backward(features_N_X, ids_N_K, lse_N, thr_N, *params)
        ctx.head, ctx.temperature, ctx.chunk_size = head, temperature, chunk_size
        return out_N_K

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out_N_K: Tensor):
        features_N_X, ids_N_K, lse_N, thr_N, *params = ctx.saved_tensors
        needs = _needs(ctx, 7)
        grad_f_N_X = torch.empty_like(features_N_X) if needs[0] else None
        grads_p, kept = [None] * len(params), ctx.kept is not None
        for i, start in enumerate(range(0, features_N_X.shape[0], ctx.chunk_size)):
            rows = slice(start, start + ctx.chunk_size)
            logits_C_V, vjp = ctx.head.chunk(features_N_X[rows], tuple(params), needs, logits=not kept)
            if kept:  # the forward's scaled, truncated logits; left intact for a second backward
                z_C_V = ctx.kept[i]
            else:
                z_C_V = _scaled(logits_C_V.to(lse_N.dtype), ctx.temperature, ctx.head)
                if thr_N is not None:
                    z_C_V.masked_fill_(z_C_V < thr_N[rows, None], float("-inf"))
            ids_C_K, g_C_K = ids_N_K[rows], grad_out_N_K[rows].to(lse_N.dtype) / ctx.temperature
            if thr_N is not None:
                # A target outside the truncated support has logprob -inf, constant under small changes.
                g_C_K = g_C_K.masked_fill(z_C_V.gather(-1, ids_C_K) == float("-inf"), 0.0)
            # d(z_k - lse)/dz = onehot(k) - softmax(z), times 1/τ (folded into g); one [C, V] buffer.
            shifted_C_V = torch.sub(z_C_V, lse_N[rows, None]) if kept else z_C_V.sub_(lse_N[rows, None])
            grad_C_V = shifted_C_V.exp_().mul_(-g_C_K.sum(-1, keepdim=True))
            grad_C_V.scatter_add_(-1, ids_C_K, g_C_K)
            # Rows with zero upstream gradient (masked positions) get an exact 0, even if they hold NaN.
            grad_C_V.masked_fill_((g_C_K == 0).all(-1, keepdim=True), 0.0)
            vjp(grad_C_V, None if grad_f_N_X is None else grad_f_N_X[rows], grads_p)
        return (grad_f_N_X, None, None, None, None, None, None, *ctx.head.returned_grads(grads_p, params, needs[1:]))


def gathered_logprobs(features_N_X: Tensor, head: Head, ids_N_K: Tensor, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """`logprobs_N_K`: log-softmax of `z = head(features) / τ` at `ids_N_K`, over the top-k/top-p support of z.

        keep = top_p(top_k(z)); logprob_k = z[ids_k] - logsumexp(z[keep])   (-inf for an id outside keep)
    The order τ -> top_k -> top_p is transformers' and vLLM's; top_k = 0 and top_p = 1 disable it, and the
    support is treated as constant in the gradient (it is piecewise constant in the logits). Ids must
    lie in `[0, V)` (callers validate them). fp32 result (fp64 for fp64 features). `chunk_size`: rows of
    logits at a time, `chunk_rows(V)` by default.
    """
    check_temperature(temperature)
    chunk_size = chunk_rows(head_vocab(head, features_N_X), features_N_X.shape[0]) if chunk_size is None else chunk_size
    check_chunk_size(chunk_size)
    if features_N_X.dim() != 2 or ids_N_K.dim() != 2 or ids_N_K.shape[0] != features_N_X.shape[0]:
        raise ValueError(f"features {tuple(features_N_X.shape)} and ids {tuple(ids_N_K.shape)} must be [N, X], [N, K]")
    return _GatheredLogprobs.apply(features_N_X, ids_N_K.long(), head, float(temperature), top_k, float(top_p),
                                   chunk_size, *head.params)


def _check_truncation(top_k: int, top_p: float) -> None:
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables), got {top_p!r}")


def token_logprobs(logits_B_T_V: Tensor, targets_B_T: Tensor, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, chunk_size: int = 64) -> Tensor:
    """Log-prob of each target under the distribution a sampler would draw it from: `gathered_logprobs` of logits.

    logits `[..., V]` any float dtype, targets `[...]` ids in `[0, V)`; returns `logprobs_B_T`, fp32 (fp64 for
    fp64 logits). Ties: top-k keeps every token tied with the k-th (as transformers does); top-p keeps every
    token tied with the last kept one (a sampler's pick among exact ties depends on its sort order).
    """
    check_temperature(temperature)
    _check_truncation(top_k, top_p)
    if logits_B_T_V.shape[:-1] != targets_B_T.shape:
        raise ValueError(f"logits {tuple(logits_B_T_V.shape)} and targets {tuple(targets_B_T.shape)} "
                         "disagree on leading dims")
    if targets_B_T.is_floating_point() or targets_B_T.is_complex():
        raise ValueError(f"targets must be integer ids, got dtype {targets_B_T.dtype}")
    V = logits_B_T_V.shape[-1]
    if targets_B_T.numel() > 0 and (targets_B_T.min() < 0 or targets_B_T.max() >= V):
        bad = targets_B_T[(targets_B_T < 0) | (targets_B_T >= V)][0].item()
        raise ValueError(f"target id {bad} is outside the vocabulary [0, {V})")
    top_k = top_k if top_k < V else 0
    out = gathered_logprobs(logits_B_T_V.reshape(-1, V), IDENTITY, targets_B_T.reshape(-1, 1), temperature, top_k,
                            top_p, chunk_size)
    return out.reshape(targets_B_T.shape)


def gather_logprobs(logits_B_T_V: Tensor, ids_B_T_K: Tensor, temperature: float = 1.0, chunk_size: int = 64) -> Tensor:
    """Untruncated log-softmax(logits / τ) at `ids_B_T_K`, fp32, shape `ids_B_T_K.shape`; ids already valid."""
    if logits_B_T_V.shape[:-1] != ids_B_T_K.shape[:-1]:
        raise ValueError(f"logits {tuple(logits_B_T_V.shape)} and ids {tuple(ids_B_T_K.shape)} "
                         "disagree on leading dims")
    V, K = logits_B_T_V.shape[-1], ids_B_T_K.shape[-1]
    out = gathered_logprobs(logits_B_T_V.reshape(-1, V), IDENTITY, ids_B_T_K.reshape(-1, K), temperature,
                            chunk_size=chunk_size)
    return out.reshape(ids_B_T_K.shape)


@torch.no_grad()
def teacher_topk(features_N_X: Tensor, head: Head, ids_N: Tensor, temperature: float, k: int,
                 chunk_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs_N, topk_logprobs_N_K, topk_ids_N_K) of `log softmax(head(f) / τ)`, `chunk_size` rows at a time.

    The sampled token's logprob and the k most likely ids with their logprobs (k capped at V), fp32.
    """
    check_temperature(temperature)
    chunk_size = chunk_rows(head_vocab(head, features_N_X), features_N_X.shape[0]) if chunk_size is None else chunk_size
    check_chunk_size(chunk_size)
    N, device = features_N_X.shape[0], features_N_X.device
    logprobs_N = torch.empty(N, device=device)
    topk_lp, topk_ids = [], []
    for start in range(0, N, chunk_size):
        rows = slice(start, start + chunk_size)
        logp_C_V = torch.log_softmax(head(features_N_X[rows]).float() / temperature, dim=-1)
        logprobs_N[rows] = logp_C_V.gather(-1, ids_N[rows, None]).squeeze(-1)
        values_C_K, ids_C_K = logp_C_V.topk(min(k, logp_C_V.shape[-1]), dim=-1)
        topk_lp.append(values_C_K)
        topk_ids.append(ids_C_K)
    if not topk_lp:
        return logprobs_N, torch.empty((0, k), device=device), torch.empty((0, k), dtype=torch.long, device=device)
    return logprobs_N, torch.cat(topk_lp), torch.cat(topk_ids)


def head_vocab(head: Head, features_N_X: Tensor) -> int:
    """V, the number of logits `head` makes from a row of `features_N_X`."""
    if head.kind == "identity":
        return features_N_X.shape[-1]
    if head.kind == "linear":
        return head.params[0].shape[0]
    with torch.no_grad():
        return head(features_N_X[:1]).shape[-1]


def _cut(head: Head, features_N_X: Tensor, V: int) -> tuple[Head, Tensor]:
    """(head, features) whose logits are the first V columns of `head(features)`'s."""
    if head_vocab(head, features_N_X) == V:
        return head, features_N_X
    if head.kind == "identity":
        return head, features_N_X[:, :V]
    if head.kind == "linear":
        return Head(head.fn, (head.params[0][:V],), "linear", head.grad_into), features_N_X
    return Head(lambda f, *p: head.fn(f, *p)[..., :V], head.params), features_N_X
