"""Rollouts + teacher scores -> one `Batch` in student target space (docs/design.md §3).

The completion of row b occupies target positions `[len(prompt) - 1, len(prompt) - 1 + R)`;
the teacher's values, cut from its own (possibly longer, privileged) prompt's target
space by the scorer, are copied there. The mask comes from the lengths, never from ids.
"""

from __future__ import annotations

import torch

from opd.logprobs import completion_mask
from opd.teacher import TeacherScores
from opd.types import Batch, Rollout


def right_pad(seqs: list[list[int]], pad_id: int, min_width: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens_B_L, attention_mask_B_L): sequences right-padded with `pad_id`, mask 1 on real tokens."""
    width = max([min_width, *(len(s) for s in seqs)])
    tokens_B_L = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask_B_L = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        tokens_B_L[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask_B_L[row, : len(seq)] = 1
    return tokens_B_L, attention_mask_B_L


def collate(rollouts: list[Rollout], scores: list[TeacherScores] | None, pad_id: int,
            advantages_B: torch.Tensor | None = None, kl_coef_B: torch.Tensor | None = None) -> Batch:
    """Right-padded tokens and every per-token tensor a loss needs, zero (or -inf) where masked.

    `scores=None` means no teacher scored (pure RL, `teacher_backend=none`): every teacher field is None.
    `kl_coef_B`: each row's reverse-KL weight, its teacher's `kl_coef` (several teachers; None: one for all).
    """
    if not rollouts or (scores is not None and len(rollouts) != len(scores)):
        raise ValueError(f"collate needs one teacher score per rollout, got {len(rollouts)} rollouts, "
                         f"{None if scores is None else len(scores)} scores")
    tokens_B_L, attention_mask_B_L = right_pad([r.prompt_ids + r.completion_ids for r in rollouts], pad_id)
    B, L = tokens_B_L.shape
    sampler_B_T = torch.zeros((B, L - 1))
    for b, r in enumerate(rollouts):
        P, R = len(r.prompt_ids), len(r.completion_ids)
        sampler_B_T[b, P - 1 : P - 1 + R] = torch.tensor(r.sampler_logprobs)
    student_topk_ids_B_T_K = _sampler_topk_ids(rollouts, L)
    teacher = dict.fromkeys(TEACHER_FIELDS) if scores is None else _teacher_fields(rollouts, scores, L)
    prompt_lens_B = torch.tensor([len(r.prompt_ids) for r in rollouts])
    completion_lens_B = torch.tensor([len(r.completion_ids) for r in rollouts])
    loss_mask_B_T = completion_mask(prompt_lens_B, completion_lens_B, L - 1).float()
    advantages_B_T = None
    if advantages_B is not None:
        advantages_B_T = torch.where(loss_mask_B_T > 0, advantages_B[:, None].float(), 0.0)
    return Batch(tokens_B_L=tokens_B_L, attention_mask_B_L=attention_mask_B_L, loss_mask_B_T=loss_mask_B_T,
                 sampler_logprobs_B_T=sampler_B_T, prompt_index_B=torch.tensor([r.prompt_index for r in rollouts]),
                 prompt_lens_B=prompt_lens_B, completion_lens_B=completion_lens_B, advantages_B_T=advantages_B_T,
                 kl_coef_B=None if kl_coef_B is None else kl_coef_B.float(),
                 student_topk_ids_B_T_K=student_topk_ids_B_T_K, **teacher)


TEACHER_FIELDS = ("teacher_logprobs_B_T", "teacher_topk_ids_B_T_K", "teacher_topk_logprobs_B_T_K",
                  "teacher_logits_B_T_V", "teacher_hidden_B_T_H", "teacher_logprobs_at_student_topk_B_T_K")


def _sampler_topk_ids(rollouts: list[Rollout], L: int) -> torch.Tensor | None:
    """student_topk_ids_B_T_K: each row's recorded top-K ids at its completion targets, 0 elsewhere.

    None when no rollout recorded them (every loss but student_topk_rkl).
    """
    recorded = [r.sampler_topk_ids is not None for r in rollouts]
    if not any(recorded):
        return None
    K = {len(ids) for r in rollouts for ids in (r.sampler_topk_ids or [])}
    if not all(recorded) or len(K) > 1:
        raise ValueError(f"sampler top-k ids: rows {[b for b, ok in enumerate(recorded) if not ok]} have none; every "
                         f"row needs them, with one K (got K = {sorted(K)})")
    ids_B_T_K = torch.zeros((len(rollouts), L - 1, K.pop() if K else 0), dtype=torch.long)
    for b, r in enumerate(rollouts):
        P, R = len(r.prompt_ids), len(r.completion_ids)
        if R:
            ids_B_T_K[b, P - 1 : P - 1 + R] = torch.tensor(r.sampler_topk_ids, dtype=torch.long)
    return ids_B_T_K


def _teacher_fields(rollouts: list[Rollout], scores: list[TeacherScores], L: int) -> dict[str, torch.Tensor | None]:
    """The teacher's values at each row's completion targets `[P - 1, P - 1 + R)`; 0 (-inf for top-k) elsewhere."""
    B = len(rollouts)
    teacher_B_T = torch.zeros((B, L - 1))
    first = scores[0]
    topk_ids_B_T_K = topk_lp_B_T_K = logits_B_T_V = at_topk_B_T_K = None
    if first.logprobs_at_sampler_topk_R_K is not None:
        at_topk_B_T_K = torch.full((B, L - 1, first.logprobs_at_sampler_topk_R_K.shape[-1]), float("-inf"))
    if first.topk_ids_R_K is not None:
        K = first.topk_ids_R_K.shape[-1]
        topk_ids_B_T_K = torch.zeros((B, L - 1, K), dtype=torch.long)
        topk_lp_B_T_K = torch.full((B, L - 1, K), float("-inf"))
    if first.logits_R_V is not None:
        logits_B_T_V = torch.zeros((B, L - 1, first.logits_R_V.shape[-1]))
    hidden_B_T_H = None
    if first.hidden_R_H is not None:
        hidden_B_T_H = torch.zeros((B, L - 1, first.hidden_R_H.shape[-1]), dtype=first.hidden_R_H.dtype)
    for b, (r, s) in enumerate(zip(rollouts, scores, strict=True)):
        P, R = len(r.prompt_ids), len(r.completion_ids)
        if s.logprobs_R.shape[0] != R:
            raise ValueError(f"row {b}: teacher scored {s.logprobs_R.shape[0]} completion tokens, the rollout has {R}")
        if R and not torch.isfinite(s.logprobs_R).all():
            raise ValueError(f"row {b}: teacher logprob is not finite at completion positions "
                             f"{torch.nonzero(~torch.isfinite(s.logprobs_R)).flatten().tolist()}")
        span = slice(P - 1, P - 1 + R)
        teacher_B_T[b, span] = s.logprobs_R
        if topk_ids_B_T_K is not None:
            topk_ids_B_T_K[b, span] = s.topk_ids_R_K
            topk_lp_B_T_K[b, span] = s.topk_logprobs_R_K
        if logits_B_T_V is not None:
            logits_B_T_V[b, span] = s.logits_R_V
        if hidden_B_T_H is not None:
            hidden_B_T_H[b, span] = s.hidden_R_H
        if at_topk_B_T_K is not None:
            bad_R = ~torch.isfinite(s.logprobs_at_sampler_topk_R_K).all(-1)
            if bad_R.any():
                raise ValueError(f"row {b}: teacher logprob at the student's top-k ids is not finite at completion "
                                 f"positions {bad_R.nonzero().flatten().tolist()}")
            at_topk_B_T_K[b, span] = s.logprobs_at_sampler_topk_R_K
    return dict(zip(TEACHER_FIELDS, (teacher_B_T, topk_ids_B_T_K, topk_lp_B_T_K, logits_B_T_V, hidden_B_T_H,
                                     at_topk_B_T_K), strict=True))

