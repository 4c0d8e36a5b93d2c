"""The run's teachers behind one `TeacherScorer` (#22): each rollout is scored by the teacher it is routed to.

`Teachers` holds what `opd.models.load_teachers` loaded, by route name (a model loaded once however
often it is named). `RoutedScorer.score` groups a step's rollouts by `Rollout.teacher`, scores each group
with its teacher's scorer and returns the scores in the rollouts' order, so `collate` builds one Batch
with one mask and the one step-global normalizer (docs/design.md §4: the gradient does not depend on
how rows are grouped). With several in-process teachers, full-vocabulary scores are formed as logits
(each teacher has its own head; the Batch passes one head beside it). With one teacher it is that
teacher's scorer, unchanged. `teacher_metrics` gives the per-teacher share of the step.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opd.teacher import TeacherScorer, TeacherScores
from opd.types import Batch, Rollout

log = logging.getLogger(__name__)


@dataclass
class Teachers:
    """The run's teachers by route name: spec, model (a remote backend: its config), tokenizer."""

    specs: dict  # name -> opd.teachers.TeacherSpec
    models: dict  # name -> frozen nn.Module, or a PretrainedConfig for vllm|served
    tokenizers: dict  # name -> tokenizer
    own: object = None  # teacher=self: the opd.self_teacher.SelfTeacher its routes score with (else None)

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def only(self):
        """(model, tokenizer) of a run with one teacher; several are refused where one is needed (off-policy)."""
        if len(self.specs) != 1:
            raise ValueError(f"this needs exactly one teacher, the run has {len(self.specs)}: {', '.join(self.specs)}")
        name = self.names[0]
        return self.models[name], self.tokenizers[name]


class RoutedScorer:
    """Scores each rollout with the scorer of `rollout.teacher`; `head`: the one teacher's head, else None."""

    def __init__(self, scorers: dict[str, TeacherScorer]):
        self.scorers = scorers
        only = next(iter(scorers.values())) if len(scorers) == 1 else None
        self.head = getattr(only, "head", None)

    def score(self, rollouts: list[Rollout], temperature: float, topk: int = 0, full_logits: bool = False,
              at_sampler_topk: bool = False) -> list[TeacherScores] | None:
        extra = dict(at_sampler_topk=True) if at_sampler_topk else {}  # only then: a scorer may predate the keyword
        if len(self.scorers) == 1:
            return next(iter(self.scorers.values())).score(rollouts, temperature, topk=topk, full_logits=full_logits,
                                                           **extra)
        out: list[TeacherScores | None] = [None] * len(rollouts)
        for name, rows in rows_by_teacher(rollouts).items():
            if name not in self.scorers:
                raise ValueError(f"rollout routed to teacher {name!r}, the run has {', '.join(self.scorers)}")
            scorer = self.scorers[name]
            scores = scorer.score([rollouts[i] for i in rows], temperature, topk=topk, full_logits=full_logits, **extra)
            for i, s in zip(rows, scores, strict=True):
                out[i] = as_logits(s, getattr(scorer, "head", None)) if full_logits else s
        return out

    def generate_greedy(self, prompts_P: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        if len(self.scorers) != 1:
            raise ValueError("greedy traces come from one teacher: evaluate each teacher's rows with its own scorer")
        return next(iter(self.scorers.values())).generate_greedy(prompts_P, max_new_tokens)


def rows_by_teacher(rollouts: Sequence[Rollout]) -> dict[str, list[int]]:
    """teacher name -> indices of its rollouts, in order of first appearance."""
    rows: dict[str, list[int]] = {}
    for i, r in enumerate(rollouts):
        rows.setdefault(r.teacher, []).append(i)
    return rows


def as_logits(s: TeacherScores, head) -> TeacherScores:
    """The scores with factored logits (hidden states + the scorer's head) formed as `logits_R_V`."""
    if s.hidden_R_H is None:
        return s
    return dataclasses.replace(s, logits_R_V=s.full_logits(head), hidden_R_H=None)


def teacher_metrics(batch: Batch, rollouts: Sequence[Rollout], names: Sequence[str],
                    all_sum=lambda value: value) -> dict[str, float]:
    """Per teacher: `opd/<name>/active_tokens`, `/token_fraction` of the step's completion tokens and, when it has
    tokens, `/sampled_reverse_kl` (the mean of p - q over its tokens). Fractions sum to 1, tokens to the total, and
    the token-weighted KLs to the step's KL. A teacher with no rows this step has tokens 0 and no KL key.
    `all_sum`: the sum over ranks (`opd.distributed.all_sum`), so the shares are of the whole step's tokens."""
    tokens_B = batch.loss_mask_B_T.sum(dim=1)
    diff_B = None
    if batch.teacher_logprobs_B_T is not None:
        diff_B = ((batch.sampler_logprobs_B_T - batch.teacher_logprobs_B_T) * batch.loss_mask_B_T).sum(dim=1)
    total = max(all_sum(float(tokens_B.sum())), 1.0)
    teacher_of_B = [r.teacher for r in rollouts]
    metrics = {}
    for name in names:
        rows_B = torch.tensor([t == name for t in teacher_of_B], dtype=torch.bool)
        n = all_sum(float(tokens_B[rows_B].sum()))
        metrics |= {f"opd/{name}/active_tokens": n, f"opd/{name}/token_fraction": n / total}
        if diff_B is not None:
            kl_sum = all_sum(float(diff_B[rows_B].sum()))
            if n:
                metrics[f"opd/{name}/sampled_reverse_kl"] = kl_sum / n
    return metrics


class ShareWatch:
    """Warns once per teacher whose token fraction stayed under `floor` for `patience` steps in a row: a teacher
    that receives almost no rows still reports a healthy per-teacher KL (TRL #6987)."""

    def __init__(self, names: Sequence[str], floor: float = 0.01, patience: int = 10):
        self.names, self.floor, self.patience = list(names), floor, patience
        self.low = dict.fromkeys(self.names, 0)
        self.warned: set[str] = set()

    def __call__(self, step: int, metrics: dict) -> None:
        for name in self.names:
            share = metrics.get(f"opd/{name}/token_fraction")
            if share is None:
                continue
            self.low[name] = self.low[name] + 1 if share < self.floor else 0
            if self.low[name] >= self.patience and name not in self.warned:
                self.warned.add(name)
                log.warning("warning: step %d: teacher %r got under %.0f%% of the completion tokens for %d steps in "
                            "a row; its opd/%s/sampled_reverse_kl is measured on almost nothing: route more rows to "
                            "it, or weight it up with teacher_mix:", step, name, 100 * self.floor, self.patience, name)
