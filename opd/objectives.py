"""The objective of each loss: what it needs from the teacher, and its value on one micro-batch.

The loop (`opd.train`) asks `teacher_scores` for the teacher's side once per step and calls the
objective `make_objective` chose once from the config. Each objective reads the student's features at
the loss-mask rows and the head that makes its logits (`opd.forward`), and one kernel of `opd.kernels`
(docs/design.md §4). An in-process teacher's head comes beside the Batch (`teacher_head`), never in it.
"""

from __future__ import annotations

import dataclasses

import torch

from opd.config import TrainConfig
from opd.forward import active_features, masked_token_logprobs, model_head
from opd.heads import IDENTITY
from opd.kernels import gathered_logprobs, head_vocab
from opd.kernels_jsd import jsd_loss
from opd.losses import (checked_topk_ids, cross_entropy_loss, importance_sampling_loss, opsm_mask, ppo_clip_loss,
                        reverse_kl_advantages, topk_forward_kl_terms)
from opd.losses_student_topk import student_topk_rkl_terms
from opd.types import Batch, Rollout

# An objective: (student, micro-batch, step-global token count, the teacher's head or None) -> (loss, metrics).
# The head is what an in-process teacher passes beside the Batch for a full-vocabulary loss (None otherwise).


def make_objective(config: TrainConfig, vocab_size: int | None = None):
    """The configured micro-batch loss, chosen once (`OBJECTIVES`); the loop calls it per micro-batch."""
    loss = OBJECTIVES[config.loss]

    def objective(student: torch.nn.Module, micro: Batch, num_tokens: int, teacher_head=None):
        return loss(student, micro, config, num_tokens, vocab_size, teacher_head=teacher_head)
    return objective


def teacher_scores(scorer, rollouts: list[Rollout], config: TrainConfig) -> list:
    """The teacher's logprob q of each sampled token at τ, and what the loss compares at its temperature.

    docs/design.md §4: both sides of a divergence use one temperature. The top-k forward KL's student side
    is at `loss_temperature`, so the teacher's top-k (student_topk_rkl: its logprobs at the student's recorded
    top-k ids) is scored at it too; when that differs from τ, a second pass keeps q (a metric here) at τ.
    JSD takes raw teacher logits and scales both.
    """
    if config.loss not in ("topk_kl", "student_topk_rkl"):
        return scorer.score(rollouts, config.temperature, full_logits=config.loss == "jsd")
    extra = dict(topk=config.topk) if config.loss == "topk_kl" else dict(at_sampler_topk=True)
    scores = scorer.score(rollouts, config.loss_temperature, **extra)
    if config.loss_temperature != config.temperature:
        scores = [dataclasses.replace(s, logprobs_R=at_tau.logprobs_R)
                  for s, at_tau in zip(scores, scorer.score(rollouts, config.temperature), strict=True)]
    return scores


def student_features(student: torch.nn.Module, micro: Batch, vocab_size: int | None = None):
    """(features_N_X, head, active_B_T): the student's features at the loss-mask rows and the head of its logits."""
    active_B_T = micro.loss_mask_B_T != 0
    head = model_head(student, vocab_size)
    features_N_X = active_features(student, head, micro.tokens_B_L, micro.attention_mask_B_L, active_B_T, vocab_size,
                                   micro.prompt_lens_B, micro.completion_lens_B, micro.prompt_index_B)
    return features_N_X, head or IDENTITY, active_B_T


def micro_loss(student: torch.nn.Module, micro: Batch, config: TrainConfig, num_tokens: int,
               vocab_size: int | None = None, teacher_head=None) -> tuple[torch.Tensor, dict]:
    """The configured loss of one micro-batch, normalized by the step-global `num_tokens`.

    Logits past `vocab_size` (a padded embedding) are dropped, so they get no gradient (docs/design.md §5).
    """
    return OBJECTIVES[config.loss](student, micro, config, num_tokens, vocab_size, teacher_head)


def reverse_kl_micro_loss(student: torch.nn.Module, micro: Batch, config: TrainConfig, num_tokens: int,
                          vocab_size: int | None = None, teacher_head=None) -> tuple[torch.Tensor, dict]:
    """The sampled-token policy gradient with `Â = A_task − c·m·(p − q)` (docs/design.md §4).

    One update per batch: the importance-sampling loss (tinker-cookbook `importance_sampling`). With
    `updates_per_batch > 1` the later updates are off the sampler's policy, so the PPO clipped surrogate
    against the sampler's logprobs (the old policy) bounds them, as tinker-cookbook's `loss_fn: ppo`.
    """
    student_logprobs_B_T = sampled_token_logprobs(student, micro, config, vocab_size)
    advantages_B_T = micro.advantages_B_T  # task (GRPO) advantages; None for pure OPD
    if micro.teacher_logprobs_B_T is not None:  # None only for pure GRPO (teacher_backend=none)
        kl_coef = config.kl_coef if micro.kl_coef_B is None else micro.kl_coef_B[:, None]  # c of each row's teacher
        opd_B_T = reverse_kl_advantages(micro.sampler_logprobs_B_T, micro.teacher_logprobs_B_T, micro.loss_mask_B_T,
                                        kl_coef=kl_coef, discount=config.discount)
        # OPD + task reward: Â = A_task − λ·m·(p − q), before any normalization
        advantages_B_T = opd_B_T if advantages_B_T is None else advantages_B_T + opd_B_T
    loss_mask_B_T, opsm_metrics = micro.loss_mask_B_T, {}
    if config.opsm_delta is not None:
        loss_mask_B_T, opsm_metrics = opsm_mask(student_logprobs_B_T.detach(), micro.sampler_logprobs_B_T,
                                                advantages_B_T, loss_mask_B_T, delta=config.opsm_delta)
    if config.updates_per_batch > 1:
        loss, metrics = ppo_clip_loss(student_logprobs_B_T, micro.sampler_logprobs_B_T, advantages_B_T, loss_mask_B_T,
                                      num_tokens)
    else:
        loss, metrics = importance_sampling_loss(student_logprobs_B_T, micro.sampler_logprobs_B_T, advantages_B_T,
                                                 loss_mask_B_T, num_tokens, log_ratio_cap=config.log_ratio_cap)
    return loss, metrics | opsm_metrics


def sampled_token_logprobs(student: torch.nn.Module, micro: Batch, config: TrainConfig,
                           vocab_size: int | None = None) -> torch.Tensor:
    """log π_θ of each sampled token at τ, after the sampler's top-k / top-p truncation (docs/design.md §4)."""
    return masked_token_logprobs(student, micro.tokens_B_L, micro.attention_mask_B_L, micro.loss_mask_B_T,
                                 temperature=config.temperature, vocab_size=vocab_size, top_k=config.top_k,
                                 top_p=config.top_p, prompt_lens_B=micro.prompt_lens_B,
                                 completion_lens_B=micro.completion_lens_B, group_B=micro.prompt_index_B)


def topk_kl_micro_loss(student: torch.nn.Module, micro: Batch, config: TrainConfig, num_tokens: int,
                       vocab_size: int | None = None, teacher_head=None) -> tuple[torch.Tensor, dict]:
    """`losses.topk_forward_kl_loss` on the loss-mask rows, ℓ from the student's features and head."""
    features_N_X, head, active_B_T = student_features(student, micro, vocab_size)
    ids_N_K, nu_N_K = micro.teacher_topk_ids_B_T_K[active_B_T], micro.teacher_topk_logprobs_B_T_K[active_B_T]
    mask_N = micro.loss_mask_B_T[active_B_T]
    V = head_vocab(head, features_N_X) if features_N_X.shape[0] else 1
    checked_N_K = checked_topk_ids(ids_N_K, nu_N_K, mask_N, V, (*mask_N.shape, V))
    ell_N_K = gathered_logprobs(features_N_X, head, checked_N_K, config.loss_temperature)
    return topk_forward_kl_terms(ell_N_K, ids_N_K, nu_N_K, mask_N, num_tokens, tail_bucket=config.tail_bucket,
                                 sampled_ids_B_T=micro.tokens_B_L[:, 1:][active_B_T])


def student_topk_rkl_micro_loss(student: torch.nn.Module, micro: Batch, config: TrainConfig, num_tokens: int,
                                vocab_size: int | None = None, teacher_head=None) -> tuple[torch.Tensor, dict]:
    """`losses_student_topk.student_topk_rkl_loss` on the loss-mask rows: ℓ at the student's recorded top-k ids from its features
    and head through the chunked kernel (`kernels.gathered_logprobs`, no `[N, V]` logits), at `loss_temperature`."""
    if micro.student_topk_ids_B_T_K is None or micro.teacher_logprobs_at_student_topk_B_T_K is None:
        raise ValueError("loss=student_topk_rkl needs Batch.student_topk_ids_B_T_K and "
                         "teacher_logprobs_at_student_topk_B_T_K: sample with record_topk=student_topk and score "
                         "with at_sampler_topk=True (objectives.teacher_scores)")
    features_N_X, head, active_B_T = student_features(student, micro, vocab_size)
    ids_N_K = micro.student_topk_ids_B_T_K[active_B_T]
    nu_N_K = micro.teacher_logprobs_at_student_topk_B_T_K[active_B_T]
    mask_N = micro.loss_mask_B_T[active_B_T]
    V = head_vocab(head, features_N_X) if features_N_X.shape[0] else 1
    checked_N_K = checked_topk_ids(ids_N_K, nu_N_K, mask_N, V, (*mask_N.shape, V), "student top-k")
    ell_N_K = gathered_logprobs(features_N_X, head, checked_N_K, config.loss_temperature)
    return student_topk_rkl_terms(ell_N_K, nu_N_K, mask_N, num_tokens)


def jsd_micro_loss(student: torch.nn.Module, micro: Batch, config: TrainConfig, num_tokens: int,
                   vocab_size: int | None = None, teacher_head=None) -> tuple[torch.Tensor, dict]:
    """The full-vocabulary JSD on the loss-mask rows, from either form of the teacher's logits (docs/design.md §3).

    No `[N, V]` logits exist whole, the student's or the teacher's: both are formed a chunk of rows at a
    time next to the loss (`kernels.jsd_loss`); factored teacher rows go through `teacher_head`.
    """
    features_N_X, head, active_B_T = student_features(student, micro, vocab_size)
    mask_N = micro.loss_mask_B_T[active_B_T]
    if micro.teacher_hidden_B_T_H is None:
        teacher_N_Y, teacher_head = micro.teacher_logits_B_T_V[active_B_T], IDENTITY
    elif teacher_head is None:
        raise ValueError("the batch holds the teacher's hidden states: pass teacher_head=scorer.head beside it")
    else:
        teacher_N_Y = micro.teacher_hidden_B_T_H[active_B_T]
    return jsd_loss(features_N_X, head, teacher_N_Y, mask_N, num_tokens, beta=config.jsd_beta,
                    temperature=config.loss_temperature, teacher_head=teacher_head)


def cross_entropy_micro_loss(student: torch.nn.Module, micro: Batch, config: TrainConfig, num_tokens: int,
                             vocab_size: int | None = None, teacher_head=None) -> tuple[torch.Tensor, dict]:
    """-Σ m log π_θ / N on the teacher's completion tokens, at the sampling temperature (docs/design.md §4).

    Without truncation: the target is the teacher's token, which the student's full distribution at τ
    must put mass on (a truncated logprob could be -inf).
    """
    untruncated = dataclasses.replace(config, top_k=0, top_p=1.0)
    student_logprobs_B_T = sampled_token_logprobs(student, micro, untruncated, vocab_size)
    return cross_entropy_loss(student_logprobs_B_T, micro.loss_mask_B_T, num_tokens)


# config.loss -> its objective; every entry takes (student, micro, config, num_tokens, vocab_size, teacher_head)
OBJECTIVES = {"reverse_kl": reverse_kl_micro_loss, "topk_kl": topk_kl_micro_loss, "jsd": jsd_micro_loss,
              "cross_entropy": cross_entropy_micro_loss, "student_topk_rkl": student_topk_rkl_micro_loss}
