"""The objective of each loss: what it needs from the teacher, and its value on one micro-batch.

The loop (`opd.train`) asks `teacher_scores` for the teacher's side once per step and calls the
configured micro-batch loss; which loss, which path (fused or full logits) and which form of the
teacher's distribution are decided here, not in the loop (docs/design.md §4).
"""

from __future__ import annotations

import dataclasses

import torch

from opd.config import TrainConfig
from opd.fused import (active_hidden_states, active_logits, head_weight, linear_jsd_loss, masked_token_logprobs,
                       supports_fused)
from opd.logprobs import token_logprobs
from opd.losses import (cross_entropy_loss, generalized_jsd_loss, importance_sampling_loss, opsm_mask,
                        reverse_kl_advantages, topk_forward_kl_loss)
from opd.tokenization import vocab_logits
from opd.types import Batch, Rollout

# An objective: (student, micro-batch, step-global token count, the teacher's head or None) -> (loss, metrics).
# The head is what an in-process teacher passes beside the Batch for a full-vocabulary loss (None otherwise).


def make_objective(config: TrainConfig, vocab_size: int | None = None):
    """The configured micro-batch loss, chosen once; the loop calls it per micro-batch."""
    loss = cross_entropy_micro_loss if config.loss == "cross_entropy" else micro_loss

    def objective(student: torch.nn.Module, micro: Batch, num_tokens: int, teacher_head=None):
        return loss(student, micro, config, num_tokens, vocab_size)
    return objective


def teacher_scores(scorer, rollouts: list[Rollout], config: TrainConfig) -> list:
    """The teacher's logprob q of each sampled token at τ, and what the loss compares at its temperature.

    docs/design.md §4: both sides of a divergence use one temperature. The top-k forward KL's student side
    is at `loss_temperature`, so the teacher's top-k is scored at it too; when that differs
    from τ, a second pass keeps q (a metric here) at τ. JSD takes raw teacher logits and scales both.
    """
    if config.loss != "topk_kl":
        return scorer.score(rollouts, config.temperature, full_logits=config.loss == "jsd")
    scores = scorer.score(rollouts, config.loss_temperature, topk=config.topk)
    if config.loss_temperature != config.temperature:
        for s, at_tau in zip(scores, scorer.score(rollouts, config.temperature), strict=True):
            s.logprobs_R = at_tau.logprobs_R
    return scores


def micro_loss(student: torch.nn.Module, micro: Batch, config: TrainConfig, num_tokens: int,
               vocab_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """The configured loss of one micro-batch, normalized by the step-global `num_tokens`.

    Logits past `vocab_size` (a padded embedding) are dropped, so they get no gradient (docs/design.md §5).
    """
    if config.loss == "jsd":
        return active_jsd_loss(student, micro, config, num_tokens, vocab_size)
    if config.loss == "topk_kl":  # the loss reads the loss-mask rows only: pass them as an [N, ...] lead
        active_B_T = micro.loss_mask_B_T != 0
        return topk_forward_kl_loss(active_student_logits(student, micro, active_B_T, vocab_size),
                                    micro.teacher_topk_ids_B_T_K[active_B_T],
                                    micro.teacher_topk_logprobs_B_T_K[active_B_T], micro.loss_mask_B_T[active_B_T],
                                    num_tokens, temperature=config.loss_temperature,
                                    tail_bucket=config.tail_bucket, sampled_ids_B_T=micro.tokens_B_L[:, 1:][active_B_T])
    student_logprobs_B_T = sampled_token_logprobs(student, micro, config, vocab_size)
    advantages_B_T = micro.advantages_B_T  # task (GRPO) advantages; None for pure OPD
    if micro.teacher_logprobs_B_T is not None:  # None only for pure GRPO (teacher_backend=none)
        opd_B_T = reverse_kl_advantages(micro.sampler_logprobs_B_T, micro.teacher_logprobs_B_T, micro.loss_mask_B_T,
                                        kl_coef=config.kl_coef, discount=config.discount)
        # OPD + task reward: Â = A_task − λ·m·(p − q), before any normalization
        advantages_B_T = opd_B_T if advantages_B_T is None else advantages_B_T + opd_B_T
    loss_mask_B_T, opsm_metrics = micro.loss_mask_B_T, {}
    if config.opsm_delta is not None:
        loss_mask_B_T, opsm_metrics = opsm_mask(student_logprobs_B_T.detach(), micro.sampler_logprobs_B_T,
                                                advantages_B_T, loss_mask_B_T, delta=config.opsm_delta)
    loss, metrics = importance_sampling_loss(student_logprobs_B_T, micro.sampler_logprobs_B_T, advantages_B_T,
                                             loss_mask_B_T, num_tokens, log_ratio_cap=config.log_ratio_cap)
    return loss, metrics | opsm_metrics


def sampled_token_logprobs(student: torch.nn.Module, micro: Batch, config: TrainConfig,
                           vocab_size: int | None = None) -> torch.Tensor:
    """log π_θ of each sampled token at τ, after the sampler's truncation (docs/design.md §4).

    Without truncation, on a plain-head model, logits exist only at the completion tokens and one
    chunk at a time (opd/fused.py): at a real vocabulary the full `[B, T, V]` logits and their
    gradient are the largest tensors of a step (bench/bench_vs_trl.py, scale b).
    """
    if not config.top_k and config.top_p == 1.0 and supports_fused(student):
        return masked_token_logprobs(student, micro.tokens_B_L, micro.attention_mask_B_L, micro.loss_mask_B_T,
                                     temperature=config.temperature, vocab_size=vocab_size)
    logits_B_L_V = student(input_ids=micro.tokens_B_L, attention_mask=micro.attention_mask_B_L).logits
    return token_logprobs(vocab_logits(logits_B_L_V[:, :-1], vocab_size), micro.tokens_B_L[:, 1:],
                          temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)


def active_student_logits(student: torch.nn.Module, micro: Batch, active_B_T: torch.Tensor,
                          vocab_size: int | None = None) -> torch.Tensor:
    """logits_N_V at the `active_B_T` targets (row-major), in target space, for the full-distribution losses.

    On a plain-head model the head runs at those rows only and each shared prompt once (opd/fused.py).
    """
    if supports_fused(student):
        return active_logits(student, micro.tokens_B_L, micro.attention_mask_B_L, active_B_T, vocab_size)
    logits_B_L_V = student(input_ids=micro.tokens_B_L, attention_mask=micro.attention_mask_B_L).logits
    return vocab_logits(logits_B_L_V[:, :-1], vocab_size)[active_B_T]


def active_jsd_loss(student: torch.nn.Module, micro: Batch, config: TrainConfig, num_tokens: int,
                    vocab_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """The full-vocabulary JSD on the loss-mask rows, from either form of the teacher's logits (docs/design.md §3).

    On a plain-head student no `[N, V]` logits exist whole, the student's or the teacher's: both are
    formed a chunk of rows at a time next to the loss (`fused.linear_jsd_loss`).
    """
    active_B_T = micro.loss_mask_B_T != 0
    mask_N = micro.loss_mask_B_T[active_B_T]
    if micro.teacher_hidden_B_T_H is None:
        teacher_N_X, teacher_head_V_X = micro.teacher_logits_B_T_V[active_B_T], None
    else:
        teacher_N_X, teacher_head_V_X = micro.teacher_hidden_B_T_H[active_B_T], micro.teacher_head_V_H
    beta, temperature = config.jsd_beta, config.loss_temperature
    if supports_fused(student):
        hidden_N_H = active_hidden_states(student, micro.tokens_B_L, micro.attention_mask_B_L, active_B_T)
        return linear_jsd_loss(hidden_N_H, head_weight(student, vocab_size), teacher_N_X, mask_N, num_tokens,
                               beta=beta, temperature=temperature, teacher_head_V_X=teacher_head_V_X)
    if teacher_head_V_X is not None:
        teacher_N_X = (teacher_N_X.to(teacher_head_V_X.device) @ teacher_head_V_X.T).to(active_B_T.device)
    return generalized_jsd_loss(active_student_logits(student, micro, active_B_T, vocab_size), teacher_N_X, mask_N,
                                num_tokens, beta=beta, temperature=temperature)


def cross_entropy_micro_loss(student: torch.nn.Module, micro: Batch, config: TrainConfig, num_tokens: int,
                             vocab_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """-Σ m log π_θ / N on the teacher's completion tokens, at the sampling temperature (docs/design.md §4).

    The student's logprobs come from ``sampled_token_logprobs`` (the fused path where the
    model allows it, padded logits dropped) without truncation: the target is the teacher's token,
    which the student's full distribution at τ must put mass on (a truncated logprob could be -inf).
    """
    untruncated = dataclasses.replace(config, top_k=0, top_p=1.0)
    student_logprobs_B_T = sampled_token_logprobs(student, micro, untruncated, vocab_size)
    return cross_entropy_loss(student_logprobs_B_T, micro.loss_mask_B_T, num_tokens)
