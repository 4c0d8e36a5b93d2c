"""The student's top-K reverse KL (`loss=student_topk_rkl`): pure functions, as in `opd.losses` (docs/design.md §4).

At each sampled position, the exact KL between the student's and the teacher's distributions coarsened to
(K + 1) buckets: the student's top-K ids, recorded by the sampler, and one tail bucket for the rest.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.kernels import gather_logprobs
from opd.logprobs import check_chunk_size, check_temperature, masked_mean, normalized_sum
from opd.losses import _check_shapes, _detached, _fp, checked_topk_ids

TAIL_FLOOR = 1e-6  # the tails 1 - S and 1 - Q enter a log floored here (straight-through for the student's)


def _floored(x: Tensor, floor: float = TAIL_FLOOR) -> Tensor:
    """max(x, floor) in value, x's gradient kept (straight-through), so log(x) never is -inf or NaN."""
    return x + (floor - x).clamp(min=0.0).detach()


def student_topk_reverse_kl(student_logprobs_at_ids_N_K: Tensor,
                            teacher_logprobs_at_ids_N_K: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row `(L_N, S_N, Q_N)`: the exact reverse KL of the (K+1)-bucket coarsenings.

    Reverse KL over the student's top-k as in verl PR #7806 (open; verl #6676 asks for it renormalized over
    the K ids instead), here with one tail bucket, so it is a true divergence:

        ℓ_k = log π(v_k), ν_k = log q(v_k) at the student's top-K ids v_k;  S = Σ_k e^ℓ_k, Q = Σ_k e^ν_k
        L = Σ_k e^ℓ_k (ℓ_k - ν_k) + (1 - S)(log(1 - S) - log(1 - Q)) = KL(π̃ ‖ q̃)
    π̃, q̃ put the mass of every id outside the K into one tail bucket, so L >= 0, L equals the full reverse
    KL when the tail is one id or none (K >= V - 1), and L <= the full reverse KL otherwise (data processing).
    Departures: inside the logs the tails are floored at `TAIL_FLOOR` (the student's straight-through, so its
    gradient never vanishes; with K = V both tails are ~0 and the term is 0), and L is clamped at 0 in value
    only (fp32 rounding). An id with ℓ = -inf adds exactly 0. ν must be finite (callers check). Shapes `[N, K]`;
    fp32 (fp64 for fp64 input); gradient to ℓ only.
    """
    _check_shapes(student_logprobs_at_ids_N_K=student_logprobs_at_ids_N_K,
                  teacher_logprobs_at_ids_N_K=teacher_logprobs_at_ids_N_K)
    ell_N_K, nu_N_K = _fp(student_logprobs_at_ids_N_K), _fp(teacher_logprobs_at_ids_N_K.detach())
    finite_N_K = ell_N_K.isfinite()
    zeros_N_K = torch.zeros_like(ell_N_K)
    # Sanitize before exp/mul: 0 · (-inf) would be NaN in the value and in the gradient.
    ell_safe_N_K = torch.where(finite_N_K, ell_N_K, zeros_N_K)
    p_N_K = torch.where(finite_N_K, ell_safe_N_K.exp(), zeros_N_K)
    student_mass_N, teacher_mass_N = p_N_K.sum(-1), nu_N_K.exp().sum(-1)
    tail_s_N = 1.0 - student_mass_N
    tail_term_N = tail_s_N * (torch.log(_floored(tail_s_N)) - torch.log(_floored(1.0 - teacher_mass_N)))
    kl_N = (p_N_K * (ell_safe_N_K - nu_N_K)).sum(-1) + tail_term_N
    return kl_N + (kl_N.clamp(min=0.0) - kl_N).detach(), student_mass_N, teacher_mass_N


def student_topk_rkl_terms(ell_B_T_K: Tensor, teacher_logprobs_B_T_K: Tensor, loss_mask_B_T: Tensor,
                           num_tokens: float | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """`Σ_t m_t L_t / N` of `student_topk_reverse_kl`, given ℓ and ν at the student's top-K ids, `[B, T, K]`.

    A masked position may hold anything (NaN, ±inf): it is replaced before any arithmetic, so it reaches neither
    the loss nor a gradient. A non-finite ν at an active position raises. Metrics: `opd/student_topk_rkl`
    (mean L_t), `opd/student_topk_mass` (mean S), `opd/teacher_mass_at_student_topk` (mean Q).
    """
    _check_shapes(ell_B_T_K=ell_B_T_K, teacher_logprobs_B_T_K=teacher_logprobs_B_T_K)
    if tuple(loss_mask_B_T.shape) != tuple(ell_B_T_K.shape[:-1]):
        raise ValueError(f"mask {tuple(loss_mask_B_T.shape)} must have shape {tuple(ell_B_T_K.shape[:-1])}")
    active_B_T_1 = (loss_mask_B_T != 0)[..., None]
    nu_B_T_K = teacher_logprobs_B_T_K.detach()
    bad_B_T_K = active_B_T_1 & ~nu_B_T_K.isfinite()
    if bad_B_T_K.any():
        pos = bad_B_T_K.nonzero()[0].tolist()
        raise ValueError(f"teacher logprob {float(nu_B_T_K[tuple(pos)])} at the student's top-k id, active position "
                         f"{pos}, is not finite: the reverse KL there would be infinite")
    ell_B_T_K = torch.where(active_B_T_1, ell_B_T_K, torch.zeros_like(ell_B_T_K))
    nu_B_T_K = torch.where(active_B_T_1, nu_B_T_K, torch.zeros_like(nu_B_T_K))
    K = ell_B_T_K.shape[-1]
    kl_N, s_N, q_N = student_topk_reverse_kl(ell_B_T_K.reshape(-1, K), nu_B_T_K.reshape(-1, K))
    kl_B_T, s_B_T, q_B_T = (x.reshape(loss_mask_B_T.shape) for x in (kl_N, s_N, q_N))
    loss = normalized_sum(kl_B_T, loss_mask_B_T, num_tokens)
    return loss, _detached({"opd/student_topk_rkl": masked_mean(kl_B_T, loss_mask_B_T),
                            "opd/student_topk_mass": masked_mean(s_B_T, loss_mask_B_T),
                            "opd/teacher_mass_at_student_topk": masked_mean(q_B_T, loss_mask_B_T)})


def student_topk_rkl_loss(student_logits_B_T_V: Tensor, student_topk_ids_B_T_K: Tensor,
                          teacher_logprobs_B_T_K: Tensor, loss_mask_B_T: Tensor, num_tokens: float | Tensor,
                          temperature: float = 1.0, chunk_size: int = 64) -> tuple[Tensor, dict[str, Tensor]]:
    """Reverse KL over the student's top-K ids plus a tail bucket, from logits (docs/design.md §4).

        ℓ_k = log softmax(z_s / τ)[v_k]  (the full softmax: no renormalization over the K ids)
        L   = Σ_t m_t L_t / N,  L_t = `student_topk_reverse_kl`(ℓ_t, ν_t)
    Shapes: logits `[B, T, V]`, the student's ids (recorded by the sampler) and the teacher's logprobs at them
    (at τ, from the scorer) `[B, T, K]`, mask `[B, T]`. Ids outside [0, V) at active positions raise, never
    clamped. The training path is `objectives.student_topk_rkl_micro_loss` (the chunked kernel on features).
    """
    check_temperature(temperature)
    check_chunk_size(chunk_size)
    ids_B_T_K = checked_topk_ids(student_topk_ids_B_T_K, teacher_logprobs_B_T_K, loss_mask_B_T,
                                 student_logits_B_T_V.shape[-1], tuple(student_logits_B_T_V.shape), "student top-k")
    ell_B_T_K = gather_logprobs(student_logits_B_T_V, ids_B_T_K, temperature, chunk_size)
    return student_topk_rkl_terms(ell_B_T_K, teacher_logprobs_B_T_K, loss_mask_B_T, num_tokens)
