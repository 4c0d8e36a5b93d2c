"""Who samples a step's completions: the student (on-policy) or the frozen teacher (off-policy).

The loop (`opd.train`) asks a `Sampler` for the step's rollouts, complete: each carries its
student prompt, its teacher prompt, its expected answer and its reward when it reaches the loop
(built as new values, `completed`; nothing fills them in later). The step's prompts are a pure
function of (seed, step), so a resumed run sees the same data. With `loss=cross_entropy` the
teacher samples after its own prompt and the completions are re-based on the student's prompts
(`opd.offpolicy`); otherwise the student samples and the engine follows its weights (`sync`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import torch

from opd import distributed
from opd.config import TrainConfig
from opd.data import Data, LazyList, epoch_prompts, rendered
from opd.offpolicy import on_student_prompts
from opd.rewards import Reward, final_answer, score
from opd.rollout import RolloutEngine, make_rollout_engine
from opd.teacher.routed import Teachers
from opd.teachers import SINGLE, mixed_prompts, route_of
from opd.types import Rollout


def step_prompts(n_prompts: int, k: int, seed: int, step: int, epochs: bool = False) -> list[int]:
    """The step's prompt indices: a pure function of (seed, step), so a resumed run sees the same data.

    With `epochs`, the rows are walked without replacement (`opd.data.epoch_prompts`); else each step
    draws k distinct rows afresh.
    """
    if epochs:
        return epoch_prompts(n_prompts, k, seed, step)
    return random.Random(f"{seed}:{step}").sample(range(n_prompts), min(k, n_prompts))


def completed(rollouts: list[Rollout], chosen_P: list[int], teacher_prompts: list[list[int]], examples, tokenizer,
              reward: Reward | None = final_answer, teacher_of: Sequence[str] | None = None) -> list[Rollout]:
    """New rollouts with their teacher prompt, expected answer, reward (None when the reward is `none`) and the
    name of the teacher that scores them (`teacher_of[row]`; None: the one teacher)."""
    def complete(r: Rollout) -> Rollout:
        example = examples[chosen_P[r.prompt_index]]
        graded = None if reward is None else score(reward, tokenizer.decode(r.completion_ids, skip_special_tokens=True),
                                                   example)
        row = chosen_P[r.prompt_index]
        return dataclasses.replace(r, teacher_prompt_ids=teacher_prompts[row], expected_answer=example.answer or None,
                                   reward=graded, teacher=SINGLE if teacher_of is None else teacher_of[row])
    return [complete(r) for r in rollouts]


@dataclasses.dataclass
class Sampler:
    """The step's G completions of P prompts from `engine`: after the student's prompts, or the teacher's."""

    engine: RolloutEngine
    config: TrainConfig
    data: Data
    prompts: list[list[int]]  # the student's prompt of each training row
    teacher_prompts: list[list[int]]  # the teacher's, in its own teacher's template
    tokenizer: object  # the student's: rewards are graded on its decoding
    on_policy: bool  # the student samples (else the teacher, off-policy)
    teacher_of: Sequence[str]  # the teacher of each training row (opd/teachers.py)

    def sample(self, step: int, d: distributed.Dist = distributed.Dist()) -> list[Rollout]:
        """rollouts_PG of this rank's share of the step's prompts, prompt-major, complete."""
        config = self.config
        if config.teacher_mix:
            chosen = mixed_prompts(self.teacher_of, config.teacher_mix, config.prompts_per_step, config.seed, step)
        else:
            chosen = step_prompts(len(self.prompts), config.prompts_per_step, config.seed, step, config.epochs is not None)
        chosen_P = distributed.shard(chosen, d)
        sampled_prompts = self.prompts if self.on_policy else self.teacher_prompts
        generated = self.engine.generate([sampled_prompts[i] for i in chosen_P], config.completions_per_prompt,
                                         config.sampling, seed=config.seed * 1_000_003 + step + 7919 * d.rank)
        if not self.on_policy:
            generated = on_student_prompts(generated, chosen_P, self.prompts)
        return completed(generated, chosen_P, self.teacher_prompts, self.data.train, self.tokenizer, self.data.reward,
                         self.teacher_of)

    def sync(self, student: torch.nn.Module) -> None:
        """Make the engine sample from the student's current weights (on-policy); the teacher is frozen."""
        if self.on_policy:
            self.engine.load_weights(student)


def make_sampler(config: TrainConfig, data: Data, teachers: Teachers, student, tokenizer) -> Sampler:
    """The student's engine, or with `loss=cross_entropy` the one teacher's (off-policy distillation).

    Each row's teacher prompt is rendered in the template of the teacher it is routed to.
    """
    on_policy = config.loss != "cross_entropy"
    if config.sampling.record_topk > len(tokenizer):
        raise ValueError(f"student_topk={config.student_topk} exceeds the student's vocabulary of {len(tokenizer)} "
                         f"tokens; set student_topk to at most {len(tokenizer)}")
    model, model_tokenizer = (student, tokenizer) if on_policy else teachers.only()
    engine = make_rollout_engine(config.rollout_backend, model, model_tokenizer, seed=config.seed)
    teacher_of = LazyList(len(data.train), lambda i: route_of(data.train[i], config))
    by_teacher = {name: rendered(tok, data.train, teacher=True) for name, tok in teachers.tokenizers.items()}
    teacher_prompts = LazyList(len(data.train), lambda i: by_teacher[teacher_of[i]][i])
    if config.teacher_mix:  # the draw by teacher needs every row's route once
        teacher_of = [teacher_of[i] for i in range(len(data.train))]
    return Sampler(engine, config, data, rendered(tokenizer, data.train), teacher_prompts, tokenizer, on_policy,
                   teacher_of)
