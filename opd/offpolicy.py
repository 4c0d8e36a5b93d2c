"""Off-policy distillation, the baseline OPD is measured against: cross-entropy on teacher samples.

Sequence-level knowledge distillation (Kim & Rush 2016), the "SFT on teacher samples" baseline
of Thinking Machines' "On-Policy Distillation" (2025) and of the Qwen3 report. Per step the
frozen teacher samples G completions of each of the step's P prompts (from its own, possibly
privileged, prompt, at the same temperature and truncation the student samples with on-policy),
and the student maximizes their likelihood after its own prompt. The student never sees its own
states, which is the difference OPD is about: its errors at test time lead it to prefixes it was
never trained on.

It is not a second loop: `opd train-offpolicy` runs the one `opd.train.train` with `loss=cross_entropy`,
which picks the teacher as the sampler (`opd.sampler`) and the scores below as the teacher's side.
What differs lives here: re-basing the teacher's samples on the student's prompts, and their scores,
which are the teacher's own sampler logprobs (no scoring pass). The settings only the on-policy
losses read are refused (`check_offpolicy_config`).
"""

from __future__ import annotations

import dataclasses

import torch

from opd.config import ON_POLICY_ONLY, check_offpolicy_config
from opd.teacher import TeacherScores
from opd.types import Rollout

__all__ = ["ON_POLICY_ONLY", "OwnScores", "check_offpolicy_config", "on_student_prompts", "own_scores"]


def on_student_prompts(samples: list[Rollout], chosen_P: list[int], prompts: list[list[int]]) -> list[Rollout]:
    """The teacher's samples re-based on the student's prompts: same completion tokens and logprobs.

    The teacher sampled after its own prompt (kept as `teacher_prompt_ids`); the student is trained
    on the same completion after its prompt. The tokenizers share ids (checked by `load_pair`).
    """
    return [dataclasses.replace(r, prompt_ids=prompts[chosen_P[r.prompt_index]], teacher_prompt_ids=r.prompt_ids)
            for r in samples]


def own_scores(samples: list[Rollout]) -> list[TeacherScores]:
    """The teacher's logprob of each token it sampled: its sampler logprobs, no second forward pass."""
    return [TeacherScores(logprobs_R=torch.tensor(r.sampler_logprobs, dtype=torch.float32)) for r in samples]


class OwnScores:
    """The off-policy run's teacher scorer: the teacher's samples carry their scores (`own_scores`)."""

    def score(self, rollouts: list[Rollout], temperature: float, topk: int = 0, full_logits: bool = False,
              at_sampler_topk: bool = False) -> list[TeacherScores]:
        return own_scores(rollouts)
