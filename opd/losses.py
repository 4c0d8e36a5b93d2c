"""Pure loss functions for on-policy distillation: (tensors, scalars) -> (loss, metrics).

Notation (docs/design.md §3-4): `B` sequences, `T` target positions, `V` vocabulary, `K` top-k (opd.losses_student_topk).
`p` = sampler logprob of the sampled token, `q` = teacher logprob of it, `m` = loss mask (0/1),
`log π` = the trained student's logprob, `N` = active tokens of the whole optimizer step.
Every loss is `Σ (per-token term · m) / N` (`logprobs.normalized_sum`), so `N = 0` gives an exact 0
with a zero gradient. Masked positions are excluded with `torch.where`, never by multiplying with
the mask, so NaN/inf stored there never reaches a loss or a gradient. Metrics are detached scalars,
means over this call's active tokens, named as in docs/design.md §6.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.kernels import check_beta, gather_logprobs
from opd.logprobs import check_chunk_size, check_temperature, masked_mean, normalized_sum


def _check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match: {shapes}")


def _fp(x: Tensor) -> Tensor:
    """x in fp32, or fp64 if it already is (so gradcheck can run in double precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _detached(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: value.detach().float() for name, value in metrics.items()}


def _advantage_metrics(advantages_B_T: Tensor, active_B_T: Tensor) -> dict[str, Tensor]:
    adv_B_T = torch.where(active_B_T, advantages_B_T, torch.zeros_like(advantages_B_T))
    return {"opd/advantage": masked_mean(adv_B_T, active_B_T),
            "opd/abs_advantage": masked_mean(adv_B_T.abs(), active_B_T)}


def _reverse_kl_term(sampler_logprobs_B_T: Tensor, teacher_logprobs_B_T: Tensor, kl_coef: float | Tensor) -> Tensor:
    """c · (p_t - q_t) everywhere (c a number or `[B, 1]` per row), detached fp32; callers where-mask it."""
    return kl_coef * (_fp(sampler_logprobs_B_T.detach()) - _fp(teacher_logprobs_B_T.detach()))


def reverse_kl_advantages(sampler_logprobs_B_T: Tensor, teacher_logprobs_B_T: Tensor, loss_mask_B_T: Tensor,
                          kl_coef: float | Tensor = 1.0, discount: float = 0.0) -> Tensor:
    """Per-token OPD advantage `A_t = -c · m_t · (p_t - q_t)` (Thinking Machines, "On-Policy Distillation").

    With `discount = γ > 0`: `A_t = Σ_{s >= t, m_s = 1} γ^(s-t) · (-c (p_s - q_s))`, the discounted
    future sum within the completion (tinker-cookbook `distillation`). Shapes `[B, T]`; returns a
    detached fp32 `advantages_B_T`, exactly 0 on masked positions.
    """
    _check_shapes(sampler_logprobs_B_T=sampler_logprobs_B_T, teacher_logprobs_B_T=teacher_logprobs_B_T,
                  loss_mask_B_T=loss_mask_B_T)
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount!r}")
    active_B_T = loss_mask_B_T != 0
    diff_B_T = _reverse_kl_term(sampler_logprobs_B_T, teacher_logprobs_B_T, kl_coef)
    term_B_T = torch.where(active_B_T, -diff_B_T, torch.zeros_like(diff_B_T))
    if discount > 0.0:
        # Completions are contiguous and masked terms are 0, so a right-to-left scan stays inside one.
        acc_B = torch.zeros_like(term_B_T[..., 0])
        for t in reversed(range(term_B_T.shape[-1])):
            acc_B = term_B_T[..., t] + discount * acc_B
            term_B_T[..., t] = acc_B
        term_B_T = torch.where(active_B_T, term_B_T, torch.zeros_like(term_B_T))
    return term_B_T


def importance_sampling_loss(student_logprobs_B_T: Tensor, sampler_logprobs_B_T: Tensor, advantages_B_T: Tensor,
                             loss_mask_B_T: Tensor, num_tokens: float | Tensor,
                             log_ratio_cap: float = 20.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance-sampled policy gradient (tinker-cookbook `importance_sampling` loss).

        L = -Σ_t m_t · exp(min(log π_t - p_t, cap)) · sg(A_t) / N
    All inputs `[B, T]`. At `log π = p`, `L = -Σ m A / N` and `∂L/∂log π_t = -A_t / N`; with
    `A = -c(p - q)` that is `Σ m c (p - q) / N` and `c (p_t - q_t) / N`. Above the cap the ratio is
    constant (zero gradient). Metrics: `opd/is_ratio` (mean capped ratio),
    `opd/is_capped_fraction`, `opd/advantage`, `opd/abs_advantage`.
    """
    _check_shapes(student_logprobs_B_T=student_logprobs_B_T, sampler_logprobs_B_T=sampler_logprobs_B_T,
                  advantages_B_T=advantages_B_T, loss_mask_B_T=loss_mask_B_T)
    active_B_T = loss_mask_B_T != 0
    log_ratio_B_T = _fp(student_logprobs_B_T) - _fp(sampler_logprobs_B_T.detach())
    zeros_B_T = torch.zeros_like(log_ratio_B_T)
    log_ratio_B_T = torch.where(active_B_T, log_ratio_B_T, zeros_B_T)
    ratio_B_T = torch.exp(log_ratio_B_T.clamp(max=log_ratio_cap))
    adv_B_T = torch.where(active_B_T, _fp(advantages_B_T.detach()).to(zeros_B_T.dtype), zeros_B_T)
    loss = normalized_sum(-ratio_B_T * adv_B_T, loss_mask_B_T, num_tokens)
    metrics = {"opd/is_ratio": masked_mean(ratio_B_T, loss_mask_B_T),
               "opd/is_capped_fraction": masked_mean((log_ratio_B_T > log_ratio_cap).float(), loss_mask_B_T),
               **_advantage_metrics(adv_B_T, active_B_T)}
    return loss, _detached(metrics)


def cross_entropy_loss(student_logprobs_B_T: Tensor, loss_mask_B_T: Tensor,
                       num_tokens: float | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level cross-entropy on given completions: sequence-level KD on teacher samples.

        L = -Σ_t m_t · log π_θ,t / N
    (Kim & Rush 2016, "Sequence-Level Knowledge Distillation": maximum likelihood on sequences the
    teacher generated; the off-policy baseline of `opd.offpolicy`). Inputs `[B, T]`: the student's
    logprob of each target token (at the sampling temperature τ, docs/design.md §4) and the mask of the
    completion targets; a masked slot may hold anything (even -inf or NaN) and never reaches the
    loss or the gradient. `∂L/∂log π_θ,t = -m_t / N`. Metric: `sft/nll` (mean -log π_θ, nats/token).
    """
    _check_shapes(student_logprobs_B_T=student_logprobs_B_T, loss_mask_B_T=loss_mask_B_T)
    active_B_T = loss_mask_B_T != 0
    logprobs_B_T = _fp(student_logprobs_B_T)
    nll_B_T = torch.where(active_B_T, -logprobs_B_T, torch.zeros_like(logprobs_B_T))
    loss = normalized_sum(nll_B_T, loss_mask_B_T, num_tokens)
    return loss, _detached({"sft/nll": masked_mean(nll_B_T, loss_mask_B_T)})


def ppo_clip_loss(student_logprobs_B_T: Tensor, old_logprobs_B_T: Tensor, advantages_B_T: Tensor,
                  loss_mask_B_T: Tensor, num_tokens: float | Tensor, clip_low: float = 0.2,
                  clip_high: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017; asymmetric bounds as in DAPO).

        r_t = exp(log π_t - log π_old,t);  L = -Σ_t m_t · min(r_t A_t, clip(r_t, 1-ε_lo, 1+ε_hi) A_t) / N
    All inputs `[B, T]`. Departure: the log-ratio is clamped to ±20 before exp so an extreme ratio
    cannot overflow to inf (inf·0 = NaN); this changes nothing for |log r| < 20. Metrics:
    `opd/ppo_clip_fraction` (tokens whose clipped branch is selected, i.e. zero gradient),
    `opd/ppo_ratio`, `opd/advantage`, `opd/abs_advantage`.
    """
    _check_shapes(student_logprobs_B_T=student_logprobs_B_T, old_logprobs_B_T=old_logprobs_B_T,
                  advantages_B_T=advantages_B_T, loss_mask_B_T=loss_mask_B_T)
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low!r}, {clip_high!r}")
    active_B_T = loss_mask_B_T != 0
    log_ratio_B_T = _fp(student_logprobs_B_T) - _fp(old_logprobs_B_T.detach())
    zeros_B_T = torch.zeros_like(log_ratio_B_T)
    log_ratio_B_T = torch.where(active_B_T, log_ratio_B_T, zeros_B_T)
    ratio_B_T = torch.exp(log_ratio_B_T.clamp(min=-20.0, max=20.0))
    adv_B_T = torch.where(active_B_T, _fp(advantages_B_T.detach()).to(zeros_B_T.dtype), zeros_B_T)
    unclipped_B_T = ratio_B_T * adv_B_T
    clipped_B_T = ratio_B_T.clamp(1.0 - clip_low, 1.0 + clip_high) * adv_B_T
    loss = normalized_sum(-torch.minimum(unclipped_B_T, clipped_B_T), loss_mask_B_T, num_tokens)
    metrics = {"opd/ppo_clip_fraction": masked_mean((clipped_B_T < unclipped_B_T).float(), loss_mask_B_T),
               "opd/ppo_ratio": masked_mean(ratio_B_T, loss_mask_B_T),
               **_advantage_metrics(adv_B_T, active_B_T)}
    return loss, _detached(metrics)


def topk_forward_kl_loss(student_logits_B_T_V: Tensor, teacher_topk_ids_B_T_K: Tensor,
                         teacher_topk_logprobs_B_T_K: Tensor, loss_mask_B_T: Tensor,
                         num_tokens: float | Tensor, temperature: float = 1.0, tail_bucket: bool = False,
                         sampled_ids_B_T: Tensor | None = None,
                         chunk_size: int = 64) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward KL to the teacher's top-k (open-instruct's top-k distillation; docs/design.md §4).

        ℓ_k = log softmax(z_s / τ)[v_k]   (full student softmax, no renormalization over the k ids)
        L_t = Σ_{k: ν_k finite} exp(ν_k) (ν_k - ℓ_k)
              [+ (1 - Σe^ν)(log(1 - Σe^ν) - log(1 - Σe^ℓ))  with tail_bucket]
        L   = Σ_t m_t L_t / N
    Shapes: logits `[B, T, V]`, ids / logprobs `[B, T, K]`, mask `[B, T]`. ν must already be at
    temperature τ (the teacher scorer applies it); ℓ uses the same τ. A -inf teacher slot adds
    exactly 0, even where ℓ = -inf. Teacher ids outside [0, V) at active positions raise ValueError,
    never clamped. ℓ comes from the chunked log-softmax, so no fp32 `[B, T, V]` copy exists. The
    student tail is floored at 1e-6 in value only (straight-through) so its gradient never vanishes.
    Metrics: `opd/topk_forward_kl`, `opd/teacher_topk_mass`, `opd/sampled_token_in_topk` (if sampled ids).
    """
    check_temperature(temperature)
    check_chunk_size(chunk_size)
    ids_B_T_K = checked_topk_ids(teacher_topk_ids_B_T_K, teacher_topk_logprobs_B_T_K, loss_mask_B_T,
                                 student_logits_B_T_V.shape[-1], tuple(student_logits_B_T_V.shape))
    ell_B_T_K = gather_logprobs(student_logits_B_T_V, ids_B_T_K, temperature, chunk_size)
    return topk_forward_kl_terms(ell_B_T_K, teacher_topk_ids_B_T_K, teacher_topk_logprobs_B_T_K, loss_mask_B_T,
                                 num_tokens, tail_bucket, sampled_ids_B_T)


def checked_topk_ids(teacher_topk_ids_B_T_K: Tensor, teacher_topk_logprobs_B_T_K: Tensor, loss_mask_B_T: Tensor,
                     V: int, logits_shape: tuple, what: str = "teacher top-k") -> Tensor:
    """The ids, 0 at masked positions, after checking shapes, the id range `[0, V)` and ν at active ones.

    `what` names the ids in errors: the teacher's own top-k (topk_kl) or the student's (student_topk_rkl).
    """
    lead = tuple(logits_shape[:-1])
    if (teacher_topk_ids_B_T_K.shape != teacher_topk_logprobs_B_T_K.shape or teacher_topk_ids_B_T_K.dim() < 2
            or tuple(teacher_topk_ids_B_T_K.shape[:-1]) != lead or tuple(loss_mask_B_T.shape) != lead):
        raise ValueError(f"shapes disagree: logits {logits_shape}, ids "
                         f"{tuple(teacher_topk_ids_B_T_K.shape)}, logprobs {tuple(teacher_topk_logprobs_B_T_K.shape)}, "
                         f"mask {tuple(loss_mask_B_T.shape)}")
    if teacher_topk_ids_B_T_K.is_floating_point():
        raise ValueError(f"{what} ids must be integers, got {teacher_topk_ids_B_T_K.dtype}")
    active_B_T = loss_mask_B_T != 0
    nu_B_T_K = teacher_topk_logprobs_B_T_K.detach()
    bad_B_T_K = active_B_T[..., None] & ((teacher_topk_ids_B_T_K < 0) | (teacher_topk_ids_B_T_K >= V))
    if bad_B_T_K.any():
        pos = bad_B_T_K.nonzero()[0].tolist()
        raise ValueError(f"{what} id {int(teacher_topk_ids_B_T_K[tuple(pos)])} at position {pos} is outside "
                         f"the student vocabulary [0, {V}); ids are never clamped")
    bad_B_T_K = active_B_T[..., None] & (nu_B_T_K.isnan() | nu_B_T_K.isposinf())
    if bad_B_T_K.any():
        pos = bad_B_T_K.nonzero()[0].tolist()
        raise ValueError(f"teacher top-k logprob {float(nu_B_T_K[tuple(pos)])} at active position {pos} "
                         "is not a logprob")
    return torch.where(active_B_T[..., None], teacher_topk_ids_B_T_K, torch.zeros_like(teacher_topk_ids_B_T_K))


def topk_forward_kl_terms(ell_B_T_K: Tensor, teacher_topk_ids_B_T_K: Tensor, teacher_topk_logprobs_B_T_K: Tensor,
                          loss_mask_B_T: Tensor, num_tokens: float | Tensor, tail_bucket: bool = False,
                          sampled_ids_B_T: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """`topk_forward_kl_loss` given the student's logprobs ℓ at the teacher's (checked) ids, `[B, T, K]`."""
    active_B_T = loss_mask_B_T != 0
    nu_B_T_K = _fp(teacher_topk_logprobs_B_T_K.detach())
    finite_B_T_K = active_B_T[..., None] & nu_B_T_K.isfinite()
    zeros_B_T_K = torch.zeros_like(nu_B_T_K)
    # Sanitize before exp/mul: where() after them would still send 0 * NaN = NaN back into the gradient.
    nu_safe_B_T_K = torch.where(finite_B_T_K, nu_B_T_K, zeros_B_T_K)
    ell_safe_B_T_K = torch.where(finite_B_T_K, ell_B_T_K, zeros_B_T_K)
    teacher_p_B_T_K = torch.where(finite_B_T_K, nu_safe_B_T_K.exp(), zeros_B_T_K)
    per_token_B_T = (teacher_p_B_T_K * (nu_safe_B_T_K - ell_safe_B_T_K)).sum(-1)
    mass_B_T = teacher_p_B_T_K.sum(-1)
    if tail_bucket:
        student_mass_B_T = torch.where(finite_B_T_K, ell_safe_B_T_K.exp(), zeros_B_T_K).sum(-1)
        tail_t_B_T = (1.0 - mass_B_T).clamp(min=0.0)
        tail_s_B_T = 1.0 - student_mass_B_T
        tail_s_B_T = tail_s_B_T + (1e-6 - tail_s_B_T).clamp(min=0.0).detach()
        log_tail_t_B_T = torch.log(torch.where(tail_t_B_T > 0, tail_t_B_T, torch.ones_like(tail_t_B_T)))
        tail_term_B_T = tail_t_B_T * (log_tail_t_B_T - torch.log(tail_s_B_T))
        per_token_B_T = per_token_B_T + torch.where(active_B_T & (tail_t_B_T > 0), tail_term_B_T,
                                                    torch.zeros_like(tail_term_B_T))
    loss = normalized_sum(per_token_B_T, loss_mask_B_T, num_tokens)
    metrics = {"opd/topk_forward_kl": masked_mean(per_token_B_T, loss_mask_B_T),
               "opd/teacher_topk_mass": masked_mean(mass_B_T, loss_mask_B_T)}
    if sampled_ids_B_T is not None:
        if tuple(sampled_ids_B_T.shape) != tuple(loss_mask_B_T.shape):
            raise ValueError(f"sampled_ids {tuple(sampled_ids_B_T.shape)} must have shape {tuple(loss_mask_B_T.shape)}")
        hit_B_T = ((teacher_topk_ids_B_T_K == sampled_ids_B_T[..., None]) & finite_B_T_K).any(-1)
        metrics["opd/sampled_token_in_topk"] = masked_mean(hit_B_T.float(), loss_mask_B_T)
    return loss, _detached(metrics)


def generalized_jsd_loss(student_logits_B_T_V: Tensor, teacher_logits_B_T_V: Tensor, loss_mask_B_T: Tensor,
                         num_tokens: float | Tensor, beta: float = 0.5, temperature: float = 1.0,
                         chunk_size: int = 32) -> tuple[Tensor, dict[str, Tensor]]:
    """Full-vocabulary generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024; TRL's convention).

        P_S = softmax(z_s[:V] / τ), P_T = softmax(z_t[:V] / τ), M = β P_T + (1-β) P_S
        JSD_β = β KL(P_T‖M) + (1-β) KL(P_S‖M);  β = 0: KL(P_T‖P_S);  β = 1: KL(P_S‖P_T)
        L = Σ_t m_t JSD_β,t / N
    Shapes: logits `[B, T, Vs]` and `[B, T, Vt]`, mask `[B, T]`. Padded vocabularies: both sides
    are compared over the shared range `V = min(Vs, Vt)` only (columns above get zero gradient).
    The specification, differentiated by autograd: fp32 over the active rows only, `chunk_size` rows
    at a time; log-probs floored at -1e4 so 0·log 0 is 0. The training kernel is `opd.kernels_jsd.jsd_loss`.
    Gradient flows to the student only. Metric: `opd/jsd`.
    """
    check_temperature(temperature)
    check_chunk_size(chunk_size)
    check_beta(beta)
    lead = tuple(student_logits_B_T_V.shape[:-1])
    if tuple(teacher_logits_B_T_V.shape[:-1]) != lead or tuple(loss_mask_B_T.shape) != lead or len(lead) < 1:
        raise ValueError(f"shapes disagree: student logits {tuple(student_logits_B_T_V.shape)}, teacher logits "
                         f"{tuple(teacher_logits_B_T_V.shape)}, mask {tuple(loss_mask_B_T.shape)}")
    active_B_T = loss_mask_B_T != 0
    V = min(student_logits_B_T_V.shape[-1], teacher_logits_B_T_V.shape[-1])
    student_A_V = student_logits_B_T_V[active_B_T][:, :V]
    teacher_A_V = teacher_logits_B_T_V.detach()[active_B_T][:, :V]
    values = [student_A_V.sum(-1)[:0].float()]  # keeps the graph when no row is active
    for start in range(0, student_A_V.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        log_ps_C_V = torch.log_softmax(_fp(student_A_V[rows]) / temperature, -1).clamp(min=-1e4)
        log_pt_C_V = torch.log_softmax(_fp(teacher_A_V[rows]) / temperature, -1).clamp(min=-1e4)
        ps_C_V, pt_C_V = log_ps_C_V.exp(), log_pt_C_V.exp()
        if beta == 0.0:
            value_C = (pt_C_V * (log_pt_C_V - log_ps_C_V)).sum(-1)
        elif beta == 1.0:
            value_C = (ps_C_V * (log_ps_C_V - log_pt_C_V)).sum(-1)
        else:
            log_m_C_V = (beta * pt_C_V + (1 - beta) * ps_C_V).clamp(min=torch.finfo(ps_C_V.dtype).tiny).log()
            value_C = (beta * (pt_C_V * (log_pt_C_V - log_m_C_V)).sum(-1)
                       + (1 - beta) * (ps_C_V * (log_ps_C_V - log_m_C_V)).sum(-1))
        # A divergence is >= 0; fp32 rounding can leave ~-1e-7 for near-identical rows (value only).
        values.append(value_C + (value_C.clamp(min=0.0) - value_C).detach())
    values_A = torch.cat(values)
    per_token_B_T = torch.zeros(lead, dtype=values_A.dtype, device=values_A.device).masked_scatter(active_B_T, values_A)
    loss = normalized_sum(per_token_B_T, loss_mask_B_T, num_tokens)
    return loss, _detached({"opd/jsd": masked_mean(per_token_B_T, loss_mask_B_T)})


def grpo_advantages(rewards_B: Tensor, prompt_index_B: Tensor, scale_by_std: bool = True,
                    eps: float = 1e-6) -> Tensor:
    """Group-relative advantages (DeepSeekMath GRPO): `(r - mean_g) / (std_g + eps)` per prompt group.

    Groups are sequences sharing `prompt_index`; std is the unbiased one (as TRL and slime use).
    A group of one gets 0. Returns fp32 `advantages_B`.
    """
    if rewards_B.dim() != 1 or rewards_B.shape != prompt_index_B.shape:
        raise ValueError(f"rewards {tuple(rewards_B.shape)} and prompt_index {tuple(prompt_index_B.shape)} "
                         "must be equal 1-d shapes")
    rewards_B = rewards_B.detach().float()
    if not rewards_B.isfinite().all():
        raise ValueError(f"rewards must be finite, got {rewards_B.tolist()}")
    _, group_B = torch.unique(prompt_index_B, return_inverse=True)
    G = int(group_B.max()) + 1 if group_B.numel() else 0
    count_G = torch.zeros(G, device=rewards_B.device).index_add_(0, group_B, torch.ones_like(rewards_B))
    mean_G = torch.zeros(G, device=rewards_B.device).index_add_(0, group_B, rewards_B) / count_G
    adv_B = rewards_B - mean_G[group_B]
    if scale_by_std:
        var_G = torch.zeros(G, device=rewards_B.device).index_add_(0, group_B, adv_B**2) / (count_G - 1).clamp(min=1)
        adv_B = adv_B / (var_G.sqrt()[group_B] + eps)
    return torch.where(count_G[group_B] > 1, adv_B, torch.zeros_like(adv_B))


@torch.no_grad()
def opsm_mask(student_logprobs_B_T: Tensor, old_logprobs_B_T: Tensor, advantages_B_T: Tensor,
              loss_mask_B_T: Tensor, delta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Off-policy sequence masking (DeepSeek-V3.2 technical report; as implemented in slime).

        KL_b = Σ_t m (log π_old - log π_θ) / max(Σ_t m, 1),   Ā_b = Σ_t m A / max(Σ_t m, 1)
        reject b  iff  Ā_b < 0 and KL_b > δ;  a rejected sequence is masked on every token.
    Inputs `[B, T]` (advantages may be `[B]`). Returns the new loss mask (same dtype as the input,
    detached) and `opd/opsm_rejected` (count of rejected sequences). Only valid tokens enter the sums.
    """
    _check_shapes(student_logprobs_B_T=student_logprobs_B_T, old_logprobs_B_T=old_logprobs_B_T,
                  loss_mask_B_T=loss_mask_B_T)
    if advantages_B_T.dim() == 1:
        advantages_B_T = advantages_B_T[:, None].expand(loss_mask_B_T.shape)
    _check_shapes(advantages_B_T=advantages_B_T, loss_mask_B_T=loss_mask_B_T)
    active_B_T = loss_mask_B_T != 0
    zeros_B_T = torch.zeros(loss_mask_B_T.shape, dtype=torch.float32, device=loss_mask_B_T.device)
    count_B = active_B_T.sum(-1).clamp(min=1).float()
    kl_B = torch.where(active_B_T, old_logprobs_B_T.float() - student_logprobs_B_T.float(), zeros_B_T).sum(-1) / count_B
    adv_B = torch.where(active_B_T, advantages_B_T.float(), zeros_B_T).sum(-1) / count_B
    rejected_B = (adv_B < 0) & (kl_B > delta)
    new_mask_B_T = torch.where(rejected_B[:, None], torch.zeros_like(loss_mask_B_T), loss_mask_B_T)
    return new_mask_B_T, {"opd/opsm_rejected": rejected_B.sum().float()}
