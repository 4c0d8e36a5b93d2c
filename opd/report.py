"""Metric records as text: the held-out report of `opd eval`, the table printed at each training
evaluation, and a run's before/after table. Formatting only: no torch, no models."""

from __future__ import annotations

import statistics

SPANS = ("", "_pre_final", "_final")  # whole trace, before the final answer, the final answer (opd.evaluate)

# (metric name after `eval/`, label, format) of the table printed at each evaluation during training
EVAL_ROWS = (("student_accuracy", "student accuracy (greedy)", "{:.1%}"),
             ("teacher_accuracy", "teacher accuracy (greedy)", "{:.1%}"),
             ("trace_gap", "teacher-trace gap, nats/token", "{:.4f}"),
             ("trace_gap_pre_final", "  before the answer", "{:.4f}"),
             ("trace_gap_final", "  the answer", "{:.4f}"),
             ("sampled_reverse_kl", "sampled reverse KL, nats/token", "{:.4f}"),
             ("student_ppl", "student perplexity", "{:.3f}"),
             ("teacher_ppl", "teacher perplexity", "{:.3f}"),
             ("mean_length", "mean completion length", "{:.1f}"),
             ("truncated_fraction", "completions cut off", "{:.1%}"),
             ("teacher_truncated", "teacher traces cut off", "{:.0f}"))
PREFIXES = (("eval/", "held-out"), ("eval_train/", "training rows"))


def eval_table(step: int, record: dict) -> str:
    """One evaluation of a training run as an aligned table: a row per metric, a column per row set
    (`eval/*` held-out, `eval_train/*` the training rows when the run evaluates them)."""
    columns = [(prefix, title) for prefix, title in PREFIXES if any(k.startswith(prefix) for k in record)]
    teachers = dict.fromkeys(k.split("/")[1] for k in record if k.startswith("eval/") and k.count("/") == 2)
    columns[1:1] = [(f"eval/{name}/", f"  {name}") for name in teachers]  # several teachers: one column each
    lines = [f"{f'evaluation at step {step}':<32}" + "".join(f"{title:>15}" for _, title in columns)]
    for name, label, fmt in EVAL_ROWS:
        cells = [fmt.format(record[p + name]) if p + name in record else "-" for p, _ in columns]
        if any(cell != "-" for cell in cells):
            lines.append(f"  {label:<30}" + "".join(f"{cell:>15}" for cell in cells))
    return "\n".join(lines)


def format_report(metrics: dict) -> str:
    """The metrics of one `Evaluator` call as a readable table (what `opd eval` prints)."""
    lines = [f"{'teacher-trace gap (nats/token)':<34}{'student NLL':>12}{'teacher NLL':>12}{'gap':>9}{'tokens':>8}"]
    for span, label in zip(SPANS, ("whole trace", "before the final answer", "final-answer span"), strict=True):
        if f"eval/trace_gap{span}" in metrics:
            lines.append(f"  {label:<32}{metrics[f'eval/trace_student_nll{span}']:>12.4f}"
                         f"{metrics[f'eval/trace_teacher_nll{span}']:>12.4f}{metrics[f'eval/trace_gap{span}']:>9.4f}"
                         f"{metrics[f'eval/trace_tokens{span}']:>8.0f}")
        elif "eval/teacher_accuracy" in metrics:
            lines.append(f"  {label:<32}{'(no complete trace has a Final: line)':>41}")
        else:
            lines.append(f"  {label:<32}{'(reward=none: no final answer)':>41}")
    if "eval/teacher_truncated" in metrics:
        lines.append(f"  {'teacher traces cut off':<32}{metrics['eval/teacher_truncated']:>12.0f}"
                     f"  (at max_new_tokens: no final-answer span on them)")
    if "eval/teacher_accuracy" in metrics:
        lines += ["accuracy (greedy decoding, mean reward)",
                  f"  {'teacher, on its own prompt':<32}{metrics['eval/teacher_accuracy']:>12.1%}",
                  f"  {'student':<32}{metrics['eval/student_accuracy']:>12.1%}"]
    else:
        lines.append("accuracy: none (reward=none; set reward= to grade against the rows' answers)")
    lines += ["one student sample per prompt, at the temperature",
              f"  {'sampled reverse KL (nats/token)':<32}{metrics['eval/sampled_reverse_kl']:>12.4f}",
              f"  {'student perplexity':<32}{metrics['eval/student_ppl']:>12.3f}",
              f"  {'teacher perplexity':<32}{metrics['eval/teacher_ppl']:>12.3f}",
              f"  {'active tokens':<32}{metrics['eval/active_tokens']:>12.0f}",
              f"  {'mean completion length':<32}{metrics['eval/mean_length']:>12.2f}",
              f"  {'truncated fraction':<32}{metrics['eval/truncated_fraction']:>12.1%}"]
    if "preflight/teacher_noise_rms" in metrics:  # opd.noise_floor, on the same samples
        ratio = metrics.get("preflight/noise_to_signal")
        lines += ["the same samples, each scored alone and padded among the others (the teacher's noise floor)",
                  f"  {'teacher noise, RMS (nats/token)':<32}{metrics['preflight/teacher_noise_rms']:>12.3g}",
                  f"  {'sampled reverse KL, alone':<32}{metrics['preflight/sampled_reverse_kl']:>12.4f}",
                  f"  {'noise / signal':<32}{'-' if ratio is None else f'{ratio:.1%}':>12}"]
    return "\n".join(lines)


BEFORE_AFTER_EVAL = ("student_accuracy", "teacher_accuracy", "trace_gap", "trace_gap_pre_final", "trace_gap_final",
                     "sampled_reverse_kl")
BEFORE_AFTER_TRAIN = ("opd/sampled_reverse_kl", "task/reward", "sft/nll")


def _cell(key: str, value: float, when: str) -> str:
    return f"{value:.1%} ({when})" if key.endswith("accuracy") else f"{value:.4f} ({when})"


def summarize(records: list[dict]) -> str:
    """Before/after table of a run's records (`opd.metrics.read_metrics`): first vs last evaluation, mean of
    the first vs last 5 training steps."""
    evals = [r for r in records if "eval/trace_gap" in r or "eval/student_accuracy" in r]  # reward=none: no accuracy
    steps = [r for r in records if "train/loss" in r]
    rows = []
    if evals:
        first, last = evals[0], evals[-1]
        teachers = dict.fromkeys(k.split("/")[1] for k in first if k.startswith("eval/") and k.count("/") == 2)
        prefixes = ("eval", *(f"eval/{t}" for t in teachers), "eval_train")  # several teachers: each one's rows
        keys = [f"{prefix}/{name}" for prefix in prefixes for name in BEFORE_AFTER_EVAL]
        rows += [(k, f"step {first['step']}", first[k], f"step {last['step']}", last[k])
                 for k in keys if k in first and k in last]
    if steps:
        head, tail = steps[:5], steps[-5:]
        rows += [(k, "first 5 steps", statistics.mean(r[k] for r in head), "last 5 steps",
                  statistics.mean(r[k] for r in tail)) for k in BEFORE_AFTER_TRAIN if k in head[0] and k in tail[-1]]
    lines = [f"{'metric':<33}{'before':>26}{'after':>26}"]
    lines += [f"{k:<33}{_cell(k, a, la):>26}{_cell(k, b, lb):>26}" for k, la, a, lb, b in rows]
    return "\n".join(lines)
