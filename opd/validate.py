"""Validators run before training (data, templates) and after it (a finished run folder).

Each raises ValueError with a message that says what is wrong and what to change.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from opd.tasks import FINAL_RE, Example, extract_final_answer, normalize_answer
from opd.tokenization import check_embedding_covers_tokenizer, render_prompt

log = logging.getLogger(__name__)


def _text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m.get("content", "") for m in messages)


def privileged_text(example: Example) -> str:
    """The teacher prompt's text with the prefix and suffix it shares with the student prompt removed."""
    teacher, student = _text(example.teacher_prompt), _text(example.prompt)
    prefix = len(os.path.commonprefix([teacher, student]))
    suffix = len(os.path.commonprefix([teacher[prefix:][::-1], student[prefix:][::-1]]))
    return teacher[prefix: len(teacher) - suffix].strip()


def answer_lines(text: str) -> list[str]:
    """The `Final: <answer>` lines (with an answer) anywhere in `text`, stripped, in order."""
    return [line.strip() for line in text.splitlines() if (m := FINAL_RE.match(line)) and m.group(1)]


def validate_privileged(examples: list[Example]) -> None:
    """Every example has both prompts and an answer, and the privilege is real and not leaked (issue #6)."""
    for i, ex in enumerate(examples):
        if (problem := privileged_problem(ex)) is not None:
            raise ValueError(f"example {i}: {problem}")


def privileged_problem(ex: Example, need_answer: bool = True) -> str | None:
    """What is wrong with one privileged example ("field ...: ... fix"), or None; `opd.data` checks rows with it.

    A user's file may give teacher prompts without answers (pure OPD): `need_answer=False` skips that rule.
    """
    for field in ("prompt", "teacher_prompt"):
        if not _text(getattr(ex, field)).strip():
            return (f"field {field!r} is an empty prompt; give the "
                    f"{'student' if field == 'prompt' else 'teacher'} prompt's messages")
    if need_answer and not ex.answer.strip():
        return "field 'answer' is empty; a privileged task needs the expected answer"
    if ex.teacher_prompt == ex.prompt:
        return ("field 'teacher_prompt' equals the student prompt; a privileged task needs a richer teacher prompt "
                "(or use the plain task, e.g. task=gsm8k, for plain distillation)")
    student_text, privileged = _text(ex.prompt), privileged_text(ex)
    if _text(ex.teacher_prompt).strip() in student_text:
        return ("field 'prompt' contains the whole teacher prompt, so nothing is privileged; remove the privileged "
                "text from the student prompt")
    if privileged and privileged in student_text:
        return f"field 'prompt' leaks the privileged text {privileged[:60]!r}; only the teacher prompt may hold it"
    if ex.solution and ex.solution.strip() in student_text:
        return "field 'prompt' leaks the worked solution; only the teacher prompt may hold it"
    statements = answer_lines(_text(ex.teacher_prompt))
    if any(line in student_text for line in statements):
        return f"field 'prompt' leaks the teacher prompt's answer line {statements[-1]!r}"
    if not ex.answer.strip():
        return None
    expected = normalize_answer(ex.answer)
    stated = extract_final_answer(statements[-1]) if statements else None
    if stated is not None and stated != expected:
        return (f"field 'teacher_prompt' states {statements[-1]!r}, the expected answer is {ex.answer}; fix the "
                f"privileged solution or the answer")
    stated = extract_final_answer(ex.solution) if ex.solution else None
    if stated is not None and stated != expected:
        return f"field 'solution' states Final: {stated}, the expected answer is {ex.answer}; fix the solution or the answer"
    return None


def validate_setup(task: str, examples: list[Example], teacher, student, teacher_tokenizer, student_tokenizer) -> None:
    """Checks before training that need the loaded models and data (docs/design.md §5; tokenizers: `load_pair`).

    Each model needs an output row per token id of its tokenizer (extra, padded rows are fine);
    a privileged task (its name ends in `_privileged`, or any example has its own teacher
    prompt) must pass `validate_privileged`; a chat-template difference is logged once.
    """
    check_embedding_covers_tokenizer(teacher, teacher_tokenizer, "teacher")
    check_embedding_covers_tokenizer(student, student_tokenizer, "student")
    if task.endswith("_privileged") or any(ex.privileged for ex in examples):
        validate_privileged(examples)
    if examples and (difference := chat_template_difference(teacher_tokenizer, student_tokenizer, examples[0])):
        log.warning("teacher prompts are rendered with the teacher's chat template; %s", difference)


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
    """A finished run: every step logged once, a step-0 eval, all metrics finite, tokens trained, a final student."""
    from opd.metrics import read_metrics

    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    if steps != list(range(expected_steps + 1)):
        raise ValueError(f"{run_dir}: logged steps {steps[:3]}...{steps[-3:]}, expected 0..{expected_steps} once each")
    if not any(k.startswith("eval/") for k in records[0]):
        raise ValueError(f"{run_dir}: no step-0 evaluation (the loop evaluates before any update)")
    for r in records:
        bad = [k for k, v in r.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"{run_dir}: step {r['step']} has non-finite {bad}")
        if r["step"] and not r.get("train/active_tokens", 0) > 0:
            raise ValueError(f"{run_dir}: step {r['step']} trained on no tokens (train/active_tokens "
                             f"{r.get('train/active_tokens')})")
    if not (Path(run_dir) / "final" / "config.json").is_file():
        raise ValueError(f"{run_dir}: no final student folder (final/config.json)")
    return records
