"""Evaluation: greedy accuracy, the teacher-trace log-prob gap, and sampled reverse KL.

The teacher-trace gap (the validation signal of privileged-context OPD): the teacher
decodes greedily from its own (possibly privileged) prompt; the same tokens are scored by
the teacher under its prompt and by the student under the student prompt. The gap is the
token-weighted student NLL minus teacher NLL over the whole trace, the part before the
final answer, and the final-answer span. It falls as the student learns what the
teacher knows; it is 0 for a student identical to the teacher on the same prompt.
Accuracy and the final-answer span exist only when the run has a reward (`opd.rewards`; with
`reward=none` they are absent, not 0); a teacher trace cut off by `max_new_tokens` is counted and
gets no final-answer span (its answer was never written).
Every distribution is formed over each model's tokenizer range (`len(tokenizer)`), so a
padded embedding changes nothing (docs/design.md §5).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import torch

from opd.rollout import Sampling
from opd.rollout.hf import HFRolloutEngine
from opd.report import SPANS
from opd.rewards import Reward, final_answer, make_reward, reward_name, score
from opd.tasks import FINAL_RE, Example
from opd.teacher import greedy_traces
from opd.teacher.hf import HFTeacherScorer, score_tokens
from opd.teachers import SINGLE, route_of
from opd.tokenization import render_prompt, stop_token_ids
from opd.types import Rollout

log = logging.getLogger(__name__)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, examples: list[Example], max_new_tokens: int = 64, teacher_prompt: bool = False,
                    batch_size: int = 256, reward: Reward | None = final_answer) -> tuple[float | None, list[str]]:
    """(mean reward, None without one; decoded completions) of greedy decoding from each prompt."""
    prompts = [render_prompt(tokenizer, ex.teacher_prompt if teacher_prompt else ex.prompt) for ex in examples]
    engine = HFRolloutEngine(model, tokenizer, batch_size=batch_size)
    rollouts = engine.generate(prompts, n=1, sampling=Sampling(greedy=True, max_new_tokens=max_new_tokens), seed=0)
    return graded(tokenizer, [r.completion_ids for r in rollouts], examples, reward)


def graded(tokenizer, completions: list[list[int]], examples: list[Example],
           reward: Reward | None = final_answer) -> tuple[float | None, list[str]]:
    """(mean reward, the fraction correct for a 0/1 reward, or None without a reward; decoded texts)."""
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    if reward is None:
        return None, texts
    total = sum(score(reward, text, ex) for text, ex in zip(texts, examples, strict=True))
    return total / max(len(examples), 1), texts


def final_answer_span(tokenizer, completion_ids: list[int]) -> tuple[int, int] | None:
    """Token range [start, end) of the answer on the last `Final:` line, or None if there is none.

    Character offsets come from decoding prefixes of the very ids generated, so a token
    that merges the answer's first character with a space (`Ġ-`) is counted in the span.
    """
    text = tokenizer.decode(completion_ids, skip_special_tokens=True)
    lines = text.splitlines(keepends=True)
    offset = len(text)
    for line in reversed(lines):
        offset -= len(line)
        match = FINAL_RE.match(line.rstrip("\r\n"))
        if line.strip() and match:
            answer_start, answer_end = offset + match.start(1), offset + match.end(1)
            break
        if line.strip():
            return None
    else:
        return None
    if answer_end <= answer_start:
        return None
    start = end = None
    for i in range(len(completion_ids)):
        decoded = len(tokenizer.decode(completion_ids[: i + 1], skip_special_tokens=True))  # chars up to token i
        if start is None and decoded > answer_start:
            start = i
        if decoded >= answer_end:
            end = i + 1
            break
    return (start, end) if start is not None and end is not None else None


class Evaluator:
    """Held-out metrics of a student against a frozen teacher; the teacher's side is computed once.

    `teacher`: an in-process model, or any `TeacherScorer` (a vLLM engine, a served teacher): its greedy
    traces and their scores come through the scorer protocol, so a remote teacher loads nothing here.
    """

    def __init__(self, teacher, tokenizer, teacher_tokenizer, examples: list[Example], temperature: float,
                 max_new_tokens: int, seed: int = 0, reward: Reward | None = final_answer):
        self.tokenizer, self.examples, self.temperature, self.reward = tokenizer, examples, temperature, reward
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.vocab_size, self.teacher_vocab_size = len(tokenizer), len(teacher_tokenizer)
        if isinstance(teacher, torch.nn.Module):
            teacher = HFTeacherScorer(teacher, vocab_size=self.teacher_vocab_size, tokenizer=teacher_tokenizer,
                                      freeze_model=False)
        self.teacher = teacher
        self.prompts = [render_prompt(tokenizer, ex.prompt) for ex in examples]
        self.teacher_prompts = [render_prompt(teacher_tokenizer, ex.teacher_prompt) for ex in examples]
        self.traces, teacher_scores = greedy_traces(teacher, self.teacher_prompts, max_new_tokens, temperature)
        # a trace that used the whole budget without a stop token was cut off: no final-answer span on it.
        # The stop set is the run's (every eos of the tokenizer and of an in-process teacher's generation config)
        teacher_model = getattr(teacher, "model", None)  # an in-process scorer's model; None for a remote teacher
        stops = set(stop_token_ids(teacher_tokenizer, getattr(teacher_model, "generation_config", None)))
        self.truncated = [len(t) >= max_new_tokens and t[-1] not in stops for t in self.traces]
        self.teacher_accuracy, self.trace_texts = graded(teacher_tokenizer, self.traces, examples, reward)
        self.teacher_nll = [-s.logprobs_R for s in teacher_scores]
        self.spans = [final_answer_span(teacher_tokenizer, t) if reward is not None and ex.answer and not cut else None
                      for t, ex, cut in zip(self.traces, examples, self.truncated, strict=True)]

    @torch.no_grad()
    def __call__(self, student) -> dict:
        accuracy, texts = greedy_accuracy(student, self.tokenizer, self.examples, self.max_new_tokens,
                                          reward=self.reward)
        student_scores = score_tokens(student, self.prompts, self.traces, self.temperature, vocab_size=self.vocab_size)
        student_nll = [-s.logprobs_R for s in student_scores]
        metrics = {}
        if self.reward is not None:  # accuracy only with a reward (reward=none: absent, not 0)
            metrics |= {"eval/student_accuracy": accuracy, "eval/teacher_accuracy": self.teacher_accuracy}
        metrics |= trace_gap(student_nll, self.teacher_nll, self.spans)
        metrics["eval/teacher_truncated"] = float(sum(self.truncated))
        metrics |= self.sampled_metrics(student)
        metrics["eval/samples"] = self.transcripts(texts)
        return metrics

    def transcripts(self, texts: list[str]) -> list[str]:
        """Prompt and the student's greedy completion per row; the first also shows the teacher's trace,
        so a reader sees what the student is compared with."""
        out = [f"{_short(ex.prompt[-1]['content'])} -> student: {t!r}" for ex, t in zip(self.examples, texts)]
        if out:
            cut = " (cut off at max_new_tokens)" if self.truncated[0] else ""
            out[0] += f"\n   teacher's trace{cut}: {self.trace_texts[0]!r}"
        return out

    def samples(self, student) -> list[Rollout]:
        """One student sample per held-out prompt at the temperature, with its teacher prompt (the same samples
        on every call for the same weights: the seed is the evaluator's)."""
        engine = HFRolloutEngine(student, self.tokenizer)
        sampling = Sampling(temperature=self.temperature, max_new_tokens=self.max_new_tokens)
        rollouts = engine.generate(self.prompts, 1, sampling, seed=self.seed)
        return [dataclasses.replace(r, teacher_prompt_ids=self.teacher_prompts[r.prompt_index]) for r in rollouts]

    def sampled_metrics(self, student) -> dict:
        """Sampled reverse KL and perplexities on one student sample per held-out prompt."""
        rollouts = self.samples(student)
        teacher = self.teacher.score(rollouts, self.temperature)
        p = torch.cat([torch.tensor(r.sampler_logprobs) for r in rollouts])
        q = torch.cat([s.logprobs_R for s in teacher])
        n = max(p.numel(), 1)
        return {"eval/sampled_reverse_kl": ((p - q).sum() / n).item(), "eval/student_ppl": torch.exp(-p.sum() / n).item(),
                "eval/teacher_ppl": torch.exp(-q.sum() / n).item(), "eval/active_tokens": float(p.numel()),
                "eval/mean_length": p.numel() / len(rollouts),
                "eval/truncated_fraction": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts)}


def trace_gap(student_nll: list[torch.Tensor], teacher_nll: list[torch.Tensor], spans: list[tuple[int, int] | None]) -> dict:
    """Token-weighted NLLs and gap (student - teacher) over the whole trace, pre-final and final spans."""
    sums = {name: [0.0, 0.0, 0] for name in SPANS}  # student, teacher, tokens
    for s, t, span in zip(student_nll, teacher_nll, spans, strict=True):
        parts = {"": slice(None)}
        if span is not None:
            parts |= {"_pre_final": slice(0, span[0]), "_final": slice(span[0], span[1])}
        for name, part in parts.items():
            sums[name][0] += s[part].sum().item()
            sums[name][1] += t[part].sum().item()
            sums[name][2] += s[part].numel()
    out = {}
    for name, (s, t, n) in sums.items():
        if n:
            out |= {f"eval/trace_student_nll{name}": s / n, f"eval/trace_teacher_nll{name}": t / n,
                    f"eval/trace_gap{name}": (s - t) / n, f"eval/trace_tokens{name}": float(n)}
    return out


def _short(text: str, limit: int = 200) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


# ---------------------------------------------------------------- the run's evaluation, per teacher (#22)

POOLED = {"student_accuracy": None, "teacher_accuracy": None, "truncated_fraction": None, "mean_length": None,
          "sampled_reverse_kl": "active_tokens", "trace_gap": "trace_tokens",
          "trace_gap_pre_final": "trace_tokens_pre_final", "trace_gap_final": "trace_tokens_final"}  # None: by rows
ADDED = ("active_tokens", "teacher_truncated", "trace_tokens", "trace_tokens_pre_final", "trace_tokens_final")


def make_evaluator(config, teachers, scorers: dict, tokenizer, eval_examples, examples):
    """The run's evaluation: held-out rows, plus the first `eval_train_size` training rows as `eval_train/*`.

    With several teachers each teacher's rows are judged against it (`eval/<teacher>/*`), and the headline
    metrics are pooled (`eval/*`, token- or row-weighted). A teacher that lives elsewhere is only its config
    in `teachers.models`: it evaluates through its scorer (#18).
    """
    reward = make_reward(reward_name(config))

    def routed(rows):
        by_teacher: dict[str, list[Example]] = {}
        for ex in rows:
            by_teacher.setdefault(route_of(ex, config), []).append(ex)
        evaluators = {}
        for name in teachers.names:
            if not by_teacher.get(name):
                log.warning("warning: teacher %r has no evaluation rows: it gets no eval/%s/* metrics", name, name)
                continue
            teacher = teachers.models[name]
            evaluators[name] = Evaluator(teacher if isinstance(teacher, torch.nn.Module) else scorers[name], tokenizer,
                                         teachers.tokenizers[name], by_teacher[name], config.temperature,
                                         config.max_new_tokens, seed=config.seed, reward=reward)
        return evaluators[SINGLE] if not config.teachers else per_teacher(evaluators)

    evaluate = routed(list(eval_examples))
    if config.eval_train_size:
        evaluate = with_training_rows(evaluate, routed(examples[: config.eval_train_size]))
    return evaluate


def per_teacher(evaluators: dict[str, Evaluator]):
    """One evaluation over several teachers' rows: `eval/<name>/<metric>` per teacher, and `eval/<metric>` pooled."""
    def evaluate(student) -> dict:
        results = {name: ev(student) for name, ev in evaluators.items()}
        out, texts = {}, {}
        for name, metrics in results.items():
            texts[name] = [f"[{name}] {text}" for text in metrics.pop("eval/samples", [])]
            out |= {f"eval/{name}/{key.removeprefix('eval/')}": v for key, v in metrics.items()}
        samples = [t for row in itertools.zip_longest(*texts.values()) for t in row if t]  # the teachers in turn
        out |= pooled(results, {name: len(ev.examples) for name, ev in evaluators.items()})
        return out | {"eval/samples": samples}
    return evaluate


def pooled(results: dict[str, dict], rows: dict[str, int]) -> dict:
    """The teachers' metrics as if measured on all rows at once: sums of counts, and means weighted by the tokens
    (or rows) each was measured on; a metric some teacher lacks is not pooled."""
    out = {}
    for metric in ADDED:
        if all(f"eval/{metric}" in m for m in results.values()):
            out[f"eval/{metric}"] = sum(m[f"eval/{metric}"] for m in results.values())
    for metric, weight in POOLED.items():
        key = f"eval/{metric}"
        if not all(key in m for m in results.values()) or (weight and f"eval/{weight}" not in out):
            continue
        w = {name: (m[f"eval/{weight}"] if weight else rows[name]) for name, m in results.items()}
        out[key] = sum(m[key] * w[name] for name, m in results.items()) / max(sum(w.values()), 1)
    return out


def with_training_rows(held_out, training_rows):
    """One evaluation: held-out metrics as `eval/*`, the training rows' as `eval_train/*` (no transcripts).

    The privileged recipe judges distillation by the teacher-trace gap on the very rows it
    trains on (as the reference run does); the held-out set shows what carries over.
    """
    def evaluate(student) -> dict:
        on_train = training_rows(student)
        on_train.pop("eval/samples", None)
        return held_out(student) | {key.replace("eval/", "eval_train/", 1): v for key, v in on_train.items()}
    return evaluate
