"""Teacher scorers: the frozen teacher scores exactly the tokens the student sampled.

The backend is chosen here, once; the loop only sees the `TeacherScorer` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from opd.types import Rollout


@dataclass
class TeacherScores:
    """The teacher's view of one rollout's completion, aligned with `completion_ids` (R tokens)."""

    logprobs_R: torch.Tensor  # float32 teacher logprob of each sampled token
    topk_ids_R_K: torch.Tensor | None = None  # long, the teacher's own top-k tokens
    topk_logprobs_R_K: torch.Tensor | None = None  # float32, their teacher logprobs
    logits_R_V: torch.Tensor | None = None  # raw logits, for full-vocabulary losses
    # The same logits in factored form (in-process teachers): `scorer.head(hidden_R_H)`; the head stays with
    # the scorer, so no [R, V] tensor is stored and the scores are plain data.
    hidden_R_H: torch.Tensor | None = None
    # float32 [R, K], its logprobs at the student's top-k ids of each position (`Rollout.sampler_topk_ids`)
    logprobs_at_sampler_topk_R_K: torch.Tensor | None = None

    def full_logits(self, head=None) -> torch.Tensor | None:
        """logits_R_V, from either form (float32 on the CPU; `head`: the scorer's, for the factored form)."""
        if self.hidden_R_H is None:
            return self.logits_R_V
        device = head.params[0].device if head.params else self.hidden_R_H.device
        with torch.no_grad():
            return head(self.hidden_R_H.to(device)).float().cpu()


NEEDS_LOGPROBS_AT_IDS = ("loss=student_topk_rkl needs the teacher's logprobs at the student's top-k ids of each "
                         "position; this teacher backend returns only its own top-k (prompt_logprobs): use an "
                         "in-process teacher (teacher_backend=hf)")


class TeacherScorer(Protocol):
    def score(self, rollouts: list[Rollout], temperature: float, topk: int = 0, full_logits: bool = False,
              at_sampler_topk: bool = False) -> list[TeacherScores] | None:
        """Teacher logprobs at `temperature` of each rollout's completion under its teacher prompt (None: no teacher).

        `at_sampler_topk`: also its logprobs at each position's `rollout.sampler_topk_ids` (arbitrary given ids per
        position, loss=student_topk_rkl); a backend that cannot return them raises `NEEDS_LOGPROBS_AT_IDS`.
        """
        ...

    def generate_greedy(self, prompts_P: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """The teacher's greedy completion of each prompt (token ids, a generated eos kept), for evaluation."""
        ...


REMOTE_BACKENDS = ("vllm", "served")  # the teacher runs outside this process's torch: only tokenizer + config load


def greedy_traces(scorer: TeacherScorer, prompts_P: list[list[int]], max_new_tokens: int, temperature: float
                  ) -> tuple[list[list[int]], list[TeacherScores]]:
    """(the teacher's greedy trace of each prompt, the teacher's scores of that trace at `temperature`).

    The trace is scored by `score`, as training scores samples, rather than read from the decoder's
    own logprobs: a greedy decoder's logprobs are of no tempered distribution, and a server's depend on
    its `--logprobs-mode`.
    """
    traces = scorer.generate_greedy(prompts_P, max_new_tokens)
    if len(traces) != len(prompts_P) or not all(traces):
        raise ValueError(f"the teacher returned {len(traces)} greedy traces for {len(prompts_P)} prompts, "
                         f"lengths {[len(t) for t in traces]} (each needs >= 1 token)")
    rollouts = [Rollout(prompt_ids=p, completion_ids=t, sampler_logprobs=[0.0] * len(t), finish_reason="length",
                        prompt_index=i) for i, (p, t) in enumerate(zip(prompts_P, traces, strict=True))]
    return traces, scorer.score(rollouts, temperature)


class NoTeacher:
    """Pure RL (GRPO on the task reward): no teacher is run, so there is no teacher signal to log or train on.

    `score` returns None; `collate` then leaves `Batch.teacher_logprobs_B_T` None, the loss uses the
    task advantages alone and no reverse-KL metric is logged (docs/design.md §6). `config.validate`
    allows it only with task_reward=true and kl_coef=0.
    """

    def score(self, rollouts: list[Rollout], temperature: float, topk: int = 0, full_logits: bool = False,
              at_sampler_topk: bool = False) -> None:
        return None

    def generate_greedy(self, prompts_P: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        raise ValueError("teacher_backend=none runs no teacher, so it has no greedy traces to evaluate against")


def make_teacher_scorer(backend: str, model, batch_size: int = 64, url: str | None = None,
                        name: str | None = None, vocab_size: int | None = None, tokenizer=None, seed: int = 0,
                        dtype: str | None = None, timeout_s: float = 300.0, freeze_model: bool = True) -> TeacherScorer:
    """`model`: the frozen in-process teacher ('hf'), or for the remote backends its folder or its loaded
    config (`models.load_pair` loads no weights for them). `url`, `name`: for the served teacher, the
    `vllm serve` base URL(s) and its served model name. `vocab_size`: the teacher tokenizer's length; the
    in-process teacher forms its distributions over those ids only (a padded embedding's extra rows are
    no tokens, docs/design.md §5). `tokenizer`: the teacher's, for its greedy traces. `seed`, `dtype`: the
    in-process vLLM engine's. `freeze_model`: False scores an in-process model that is trained elsewhere
    (`teacher=self`, `self_teacher=live`) without freezing it.
    """
    if backend == "none":
        return NoTeacher()
    if backend == "hf":
        from opd.teacher.hf import HFTeacherScorer

        return HFTeacherScorer(model, batch_size=batch_size, vocab_size=vocab_size, tokenizer=tokenizer,
                               freeze_model=freeze_model)
    if backend == "vllm":
        from opd.teacher.vllm import VLLMTeacherScorer  # optional dependency, GPU only

        path = model if isinstance(model, str | torch.nn.Module) else model.name_or_path  # a config: its folder
        return VLLMTeacherScorer(path, dtype=dtype, seed=seed)
    if backend == "served":
        from opd.teacher.served import ServedTeacherScorer

        return ServedTeacherScorer(url.split(","), model_name=name, timeout_s=timeout_s)
    raise ValueError(f"unknown teacher backend {backend!r}; accepted: 'hf', 'vllm', 'served', 'none'")
