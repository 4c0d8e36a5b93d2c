"""Validators run before training (data, templates) and after it (a finished run folder).

Each raises ValueError with a message that says what is wrong and what to change.
"""

from __future__ import annotations

import math
from pathlib import Path

from opd.tasks import Example, extract_final_answer, normalize_answer
from opd.tokenization import render_prompt


def _text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m.get("content", "") for m in messages)


def validate_privileged(examples: list[Example]) -> None:
    """Every example has both prompts and an answer, and the privilege is real and not leaked."""
    for i, ex in enumerate(examples):
        if not _text(ex.prompt).strip() or not _text(ex.teacher_prompt).strip():
            raise ValueError(f"example {i}: empty student or teacher prompt")
        if not ex.answer.strip():
            raise ValueError(f"example {i}: no expected answer")
        if ex.teacher_prompt == ex.prompt:
            raise ValueError(f"example {i}: the teacher prompt equals the student prompt; a privileged task needs a "
                             f"richer teacher prompt (use task=gsm8k for plain distillation)")
        privileged = _text(ex.teacher_prompt).replace(_text(ex.prompt), "").strip()
        if privileged and privileged in _text(ex.prompt):
            raise ValueError(f"example {i}: the student prompt contains the privileged text {privileged[:60]!r}")
        if ex.solution and ex.solution in _text(ex.prompt):
            raise ValueError(f"example {i}: the student prompt leaks the worked solution")
        stated = extract_final_answer(ex.solution) if ex.solution else None
        if stated is not None and stated != normalize_answer(ex.answer):
            raise ValueError(f"example {i}: the privileged solution states Final: {stated}, the expected answer is "
                             f"{ex.answer}")


def chat_template_difference(teacher_tokenizer, student_tokenizer, example: Example) -> str | None:
    """Where the teacher's and the student's templates render the teacher prompt differently, or None.

    opd renders each prompt with its own model's template (the teacher prompt with the
    teacher's), so a difference is allowed; the loop logs it so that it is never a surprise.
    """
    theirs = render_prompt(teacher_tokenizer, example.teacher_prompt)
    ours = render_prompt(student_tokenizer, example.teacher_prompt)
    if theirs == ours:
        return None
    at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    return (f"the chat templates differ from token {at}: teacher renders "
            f"{teacher_tokenizer.decode(theirs[at:at + 8])!r}, student {student_tokenizer.decode(ours[at:at + 8])!r}")


def validate_run(run_dir: str | Path, expected_steps: int) -> list[dict]:
    """A finished run: every step logged once, all metrics finite, tokens trained, a step-0 eval."""
    from opd.metrics import read_metrics

    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    if steps != list(range(expected_steps + 1)):
        raise ValueError(f"{run_dir}: logged steps {steps[:3]}...{steps[-3:]}, expected 0..{expected_steps} once each")
    if not any(k.startswith("eval/") for k in records[0]):
        raise ValueError(f"{run_dir}: no step-0 evaluation")
    for r in records:
        bad = [k for k, v in r.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"{run_dir}: step {r['step']} has non-finite {bad}")
        if r["step"] and r.get("opd/active_tokens", 0) <= 0:
            raise ValueError(f"{run_dir}: step {r['step']} trained on no tokens")
    if not (Path(run_dir) / "final" / "config.json").is_file():
        raise ValueError(f"{run_dir}: no final student folder")
    return records
