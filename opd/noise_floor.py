"""The teacher signal's noise floor: a pre-flight check of `opd train` and a section of `opd eval` (design.md §5).

OPD learns from `p - q` per token (docs/design.md §4). If the teacher's logprob `q` of a token depends on
how its row was batched (bf16 matmuls whose reduction order follows the batch shape, a server that is not
batch invariant, a chat template or BOS applied to batched requests only), part of `q` is noise the
student is trained on. The issue that asked for this check reports ~0.03 nats/token of trainer-vs-server
noise in bf16 against a per-token signal of 0.11-0.22, and +0.29 from a mismatched chat template.

The check scores one batch of student samples twice, through the `TeacherScorer` protocol only, so every
backend (in-process, vLLM, served, several routed teachers, the student as its own teacher) is checked the
same way: each rollout alone (a batch of one, `score` once per rollout), and all of them in one `score`
call, reversed behind a copy of the longest row, so each row is padded and batched as it never is alone.
It reports the RMS over active tokens of the difference of the two `q`s against the sampled reverse KL
`mean(p - q)` (`q` of the batch of one: the layout nothing else shares) and warns when the noise exceeds
`WARN_FRACTION` of it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch

from opd import distributed
from opd.types import Rollout

log = logging.getLogger(__name__)

WARN_FRACTION = 0.1  # teacher noise above this fraction of the signal warns
EXACT = 1e-4  # nats/token: float32 rounding is far below it; noise under it never warns, even against a signal near 0


@dataclasses.dataclass(frozen=True)
class NoiseFloor:
    """The teacher-logprob noise of one batch against its signal, both in nats/token over `tokens` active tokens."""

    noise_rms: float  # sqrt(mean((q_alone - q_padded)^2))
    signal: float  # the sampled reverse KL, mean(p - q_alone)
    abs_signal: float  # mean |p - q_alone|
    tokens: int
    rows: int

    @property
    def ratio(self) -> float:
        """noise_rms / signal; inf when the signal is <= 0 and there is noise."""
        if self.signal > 0:
            return self.noise_rms / self.signal
        return 0.0 if self.noise_rms == 0 else math.inf


def padded_layout(rollouts: list[Rollout]) -> list[int]:
    """The rows of the one `score` call: a copy of the longest row first, then the batch reversed.

    Every row then shares its call with the others (another batch shape than alone) and all but the
    longest are padded to its length; reversed, so a scorer that chunks a long batch chunks it differently.
    """
    lengths = [len(r.teacher_prompt_ids) + len(r.completion_ids) for r in rollouts]
    longest = lengths.index(max(lengths))
    return [longest, *reversed(range(len(rollouts)))]


def layout_scores(scorer, rollouts: list[Rollout], temperature: float
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """(q_R of each rollout scored alone, q_R of it scored in `padded_layout`), both in the rollouts' order;
    None when the scorer runs no teacher (teacher_backend=none)."""
    alone = [scorer.score([r], temperature) for r in rollouts]
    if any(s is None for s in alone):
        return None
    order = padded_layout(rollouts)
    together = scorer.score([rollouts[i] for i in order], temperature)
    if together is None or len(together) != len(order):
        raise ValueError(f"the teacher returned {None if together is None else len(together)} scores for "
                         f"{len(order)} rollouts")
    padded: list[torch.Tensor | None] = [None] * len(rollouts)
    for j, i in enumerate(order[1:], start=1):  # undo the reversal; the leading copy only pads
        padded[i] = together[j].logprobs_R
    alone_R = [s[0].logprobs_R for s in alone]
    for row, (r, a, b) in enumerate(zip(rollouts, alone_R, padded, strict=True)):
        if not len(r.completion_ids) == a.numel() == b.numel():
            raise ValueError(f"row {row}: {len(r.completion_ids)} completion tokens, scored {a.numel()} alone and "
                             f"{b.numel()} in a batch: the teacher's scores are not aligned with the rollouts")
    return alone_R, padded


def teacher_noise_floor(scorer, rollouts: list[Rollout], temperature: float,
                        total: Callable[[float], float] = lambda v: v) -> NoiseFloor | None:
    """The noise floor of `rollouts` (student samples with their sampler logprobs p); None without a teacher.

    `total` sums a value over the processes that each scored their share (`distributed.all_sum`).
    """
    scores = layout_scores(scorer, rollouts, temperature)
    if scores is None:
        return None
    alone, padded = scores
    p_N = torch.cat([torch.tensor(r.sampler_logprobs, dtype=torch.float64) for r in rollouts])
    q_N = torch.cat(alone).double()
    noise_N = q_N - torch.cat(padded).double()
    tokens = total(p_N.numel())
    n = max(tokens, 1)
    return NoiseFloor(noise_rms=math.sqrt(total(noise_N.square().sum().item()) / n),
                      signal=total((p_N - q_N).sum().item()) / n, abs_signal=total((p_N - q_N).abs().sum().item()) / n,
                      tokens=int(tokens), rows=int(total(len(rollouts))))


def describe(floor: NoiseFloor) -> str:
    """The check as one line."""
    return (f"teacher noise floor: {floor.noise_rms:.3g} nats/token RMS between batch layouts (each of {floor.rows} "
            f"samples alone vs padded among the others, {floor.tokens} tokens), against a sampled reverse KL of "
            f"{floor.signal:.4f} (mean |p - q| {floor.abs_signal:.4f}): {ratio_text(floor)} of the signal")


def ratio_text(floor: NoiseFloor) -> str:
    return "all" if math.isinf(floor.ratio) else f"{floor.ratio:.1%}"


def warning(floor: NoiseFloor) -> str | None:
    """The warning when the noise exceeds WARN_FRACTION of the signal (never below EXACT), else None."""
    if floor.noise_rms <= EXACT or floor.ratio <= WARN_FRACTION:
        return None
    return (f"warning: the teacher's logprobs move by {floor.noise_rms:.4f} nats/token RMS with the batch layout, "
            f"{ratio_text(floor)} of the sampled reverse KL ({floor.signal:.4f} nats/token) the student learns from: "
            f"score the teacher in float32 (teacher_dtype=float32; a served one with --dtype float32), and check that "
            f"a served teacher is batch invariant and renders the same chat template for batched requests "
            f"(opd train: preflight_noise=false skips this check)")


def metrics(floor: NoiseFloor) -> dict[str, float]:
    """`preflight/*` (docs/design.md §6); no noise_to_signal when the signal is <= 0 (it would be infinite)."""
    out = {"preflight/teacher_noise_rms": floor.noise_rms, "preflight/sampled_reverse_kl": floor.signal,
           "preflight/abs_log_ratio": floor.abs_signal, "preflight/active_tokens": float(floor.tokens)}
    return out | ({"preflight/noise_to_signal": floor.ratio} if math.isfinite(floor.ratio) else {})


def check(scorer, rollouts: list[Rollout], temperature: float, d: distributed.Dist = distributed.Dist(),
          announce: bool = False) -> NoiseFloor | None:
    """`teacher_noise_floor` of this process's `rollouts`, summed over processes; rank 0 logs its line (with
    `announce`) and the warning if there is one. None without a teacher."""
    floor = teacher_noise_floor(scorer, rollouts, temperature, total=lambda v: distributed.all_sum(v, d))
    if floor is not None and d.main:
        if announce:
            log.info(describe(floor))
        if text := warning(floor):
            log.warning(text)
    return floor


@dataclasses.dataclass
class Replay:
    """A sampler that returns the batch the pre-flight drew at `step`, once, and asks `sampler` for every other one.

    The batch is what `sampler.sample(step)` would return in the loop (the engine's weights and the step's
    seed are the same), so the run samples and trains exactly as it would without the check.
    """

    sampler: object
    step: int
    rollouts: list[Rollout] | None

    def sample(self, step: int, d: distributed.Dist = distributed.Dist()) -> list[Rollout]:
        if step == self.step and self.rollouts is not None:
            rollouts, self.rollouts = self.rollouts, None
            return rollouts
        return self.sampler.sample(step, d)

    def sync(self, student: torch.nn.Module) -> None:
        self.sampler.sync(student)


def preflight(config, sampler, scorer, start_step: int, d: distributed.Dist) -> tuple[object, dict]:
    """`opd train`'s check of its first batch: (a sampler that replays that batch at the first step, the
    step-0 `preflight/*` metrics).

    Skipped ({}, the sampler itself) with `preflight_noise=false`, on resume (the run was checked when it
    started; step 0 is logged already) and off-policy: the teacher's samples carry their own logprobs as
    scores there, so no scoring pass exists whose layout could add noise. Without a teacher
    (teacher_backend=none) the scorer returns no scores: {}, and the batch is still replayed.
    """
    if not config.preflight_noise or start_step or not sampler.on_policy:
        return sampler, {}
    rollouts = sampler.sample(start_step + 1, d)
    floor = check(scorer, rollouts, config.temperature, d, announce=True)
    return Replay(sampler, start_step + 1, rollouts), {} if floor is None else metrics(floor)
