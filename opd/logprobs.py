"""Masks, masked reductions and the argument checks the kernels and losses share.

Pure tensor helpers for the data contract of docs/design.md §3-4. Shapes: `B` sequences, `T` target
positions. The token log-probabilities themselves are `opd.kernels.token_logprobs`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    # fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 so gradcheck can run in double precision.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_chunk_size(chunk_size: int, name: str = "chunk_size") -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name} must be a positive int, got {chunk_size!r}")


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


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
