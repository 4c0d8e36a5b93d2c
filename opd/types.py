"""The data contract between stages (docs/design.md §3). Validation of shapes only, no logic.

Axes: B sequences, L tokens (prompt + completion, right-padded), T = L - 1 target
positions, K top-k (the teacher's, or the student's), V vocabulary. Position t of every `_B_T` tensor predicts
`tokens_B_L[:, t + 1]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FINISH_REASONS = ("stop", "length")


@dataclass
class Rollout:
    """One sample (the student's; off-policy the teacher's, re-based on the student's prompt), as plain lists.

    Complete when it reaches the loop: `opd.sampler.completed` builds it anew with its teacher prompt,
    answer and reward; nothing fills it in after that.
    """

    prompt_ids: list[int]  # the student's prompt
    completion_ids: list[int]  # sampled tokens, the generated eos included
    sampler_logprobs: list[float]  # logprob of each sampled token under the distribution it was drawn from
    finish_reason: str  # "stop" (eos sampled) or "length" (max_new_tokens reached)
    prompt_index: int  # which prompt of the step, for groups
    teacher_prompt_ids: list[int] = field(default_factory=list)  # empty means: same as prompt_ids
    expected_answer: str | None = None
    reward: float | None = None
    teacher: str = "teacher"  # the name of the teacher that scores it (opd/teachers.py; "teacher" when there is one)
    # the K most likely ids of the distribution each token was drawn from, one list per completion token
    # (`Sampling.record_topk`; None when not recorded); loss=student_topk_rkl compares the two models there
    sampler_topk_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if not self.teacher_prompt_ids:
            self.teacher_prompt_ids = list(self.prompt_ids)
        if len(self.sampler_logprobs) != len(self.completion_ids):
            raise ValueError(
                f"rollout of prompt {self.prompt_index}: {len(self.sampler_logprobs)} sampler logprobs "
                f"for {len(self.completion_ids)} completion tokens"
            )
        if self.sampler_topk_ids is not None and (len(self.sampler_topk_ids) != len(self.completion_ids)
                                                  or len({len(ids) for ids in self.sampler_topk_ids}) > 1):
            raise ValueError(f"rollout of prompt {self.prompt_index}: sampler top-k ids must be one list of K ids per "
                             f"completion token, got {[len(ids) for ids in self.sampler_topk_ids]} for "
                             f"{len(self.completion_ids)} tokens")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        if not self.prompt_ids or not self.teacher_prompt_ids:
            raise ValueError(f"rollout of prompt {self.prompt_index}: empty prompt")
        if any(math.isnan(x) for x in self.sampler_logprobs):
            raise ValueError(f"rollout of prompt {self.prompt_index}: NaN sampler logprob")


@dataclass
class Batch:
    """Tensors for one optimizer step's worth of rollouts, in target space: plain data, no model references."""

    tokens_B_L: torch.Tensor  # long
    attention_mask_B_L: torch.Tensor  # long, 1 on prompt + completion
    loss_mask_B_T: torch.Tensor  # float 0/1, 1 exactly on completion targets
    sampler_logprobs_B_T: torch.Tensor  # float32, 0.0 where masked
    teacher_logprobs_B_T: torch.Tensor | None  # float32, 0.0 where masked; None when no teacher scored (pure RL)
    prompt_index_B: torch.Tensor  # long, the group of each row: rows of one prompt index share their prompt
    prompt_lens_B: torch.Tensor  # long, tokens of each row's prompt
    completion_lens_B: torch.Tensor  # long, tokens of each row's completion (targets [P - 1, P - 1 + R))
    advantages_B_T: torch.Tensor | None = None  # task advantages (0 for pure OPD)
    kl_coef_B: torch.Tensor | None = None  # float32, each row's teacher's kl_coef (several teachers); None: config's
    teacher_topk_ids_B_T_K: torch.Tensor | None = None  # long, 0 where masked
    teacher_topk_logprobs_B_T_K: torch.Tensor | None = None  # float32, -inf where masked
    teacher_logits_B_T_V: torch.Tensor | None = None  # only for full-vocabulary losses
    # The same in factored form (in-process teachers): logits = teacher_head(teacher_hidden_B_T_H), the head
    # passed beside the batch (`scorer.head`, docs/design.md §3). 0 where masked.
    teacher_hidden_B_T_H: torch.Tensor | None = None
    # loss=student_topk_rkl only: the student's top-K ids the sampler recorded at each position (long, 0 where
    # masked) and the teacher's logprobs at them (float32, -inf where masked)
    student_topk_ids_B_T_K: torch.Tensor | None = None
    teacher_logprobs_at_student_topk_B_T_K: torch.Tensor | None = None

    def __post_init__(self) -> None:
        B, L = self.tokens_B_L.shape
        expect = {"attention_mask_B_L": (B, L), "loss_mask_B_T": (B, L - 1), "sampler_logprobs_B_T": (B, L - 1),
                  "teacher_logprobs_B_T": (B, L - 1), "prompt_index_B": (B,), "prompt_lens_B": (B,),
                  "completion_lens_B": (B,), "advantages_B_T": (B, L - 1), "kl_coef_B": (B,)}
        for name, shape in expect.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"Batch.{name} has shape {tuple(value.shape)}, expected {shape}")
        for name in ("teacher_topk_ids_B_T_K", "teacher_topk_logprobs_B_T_K", "teacher_logits_B_T_V",
                     "teacher_hidden_B_T_H", "student_topk_ids_B_T_K", "teacher_logprobs_at_student_topk_B_T_K"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape[:2]) != (B, L - 1):
                raise ValueError(f"Batch.{name} has shape {tuple(value.shape)}, expected ({B}, {L - 1}, ...)")

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask_B_T.sum().item())

    def to(self, device: torch.device | str) -> Batch:
        """Every tensor on `device`."""
        return Batch(**{name: (None if value is None else value.to(device)) for name, value in vars(self).items()})

    def select(self, rows: slice) -> Batch:
        """The micro-batch of rows `rows`; every tensor sliced along B."""
        return Batch(**{name: (None if value is None else value[rows]) for name, value in vars(self).items()})
