"""The example type and the one grader every task shares.

A completion's answer is on its last non-empty line, which must read `Final: <answer>`
(docs/design.md §6: an answer followed by more text is not final); answers
are compared after normalization (whitespace collapsed, trailing period, thousands
separators, and numeric equality so that `41.0` equals `41`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

FINAL_RE = re.compile(r"^\s*Final:\s*(.*?)\s*$")
PRIVILEGED_HEADER = "[Privileged solution, hidden from the student]"
INSTRUCTION = "Solve step by step. End with a line 'Final: <answer>'."
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    """One prompt row (docs/design.md §7 "Data rows"). `teacher_prompt` equals `prompt` unless privileged.

    Built-in tasks and user files produce the same rows (`opd.rows.example_from_row`); the last
    four fields are those a user file may add: a stable id, a teacher route (read and kept for a
    multi-teacher run) and every other column, which a reward may read.
    """

    prompt: Messages  # the student's chat messages
    teacher_prompt: Messages  # the teacher's chat messages (richer when privileged)
    answer: str = ""  # the expected final answer ("" = none)
    solution: str = ""  # a reference completion (a trailing assistant turn; built-ins end it in `Final: <answer>`)
    id: str = ""  # the row's `id` column, else a hash of its prompts and answer
    route: str | None = None  # which teacher scores this row: `teacher` > `teacher_id` > `data_source`
    metadata: dict = field(default_factory=dict, hash=False)  # every other column of the row

    @property
    def privileged(self) -> bool:
        return self.teacher_prompt != self.prompt


def privileged_messages(question: str, solution: str) -> Messages:
    """The privileged teacher prompt of the built-in tasks: the question, then its worked solution, marked."""
    return [{"role": "user", "content": f"{question}\n{PRIVILEGED_HEADER}\n{solution}\n{INSTRUCTION}"}]


def normalize_answer(text: str) -> str:
    """Collapse whitespace, drop a trailing period and thousands separators; canonical numbers."""
    text = " ".join(text.split()).rstrip(".").strip()
    text = _THOUSANDS_RE.sub("", text)
    candidate = text.lstrip("$").rstrip("%").strip()
    try:
        number = Decimal(candidate)
    except InvalidOperation:
        return text
    if not number.is_finite():
        return text
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


def extract_final_answer(completion: str) -> str | None:
    """The normalized answer if the last non-empty line is `Final: <answer>`, else None."""
    lines = [line for line in completion.splitlines() if line.strip()]
    match = FINAL_RE.match(lines[-1]) if lines else None
    return (normalize_answer(match.group(1)) or None) if match else None


def grade(completion: str, expected: str) -> bool:
    """Exact match of the extracted final answer against the expected one, both normalized."""
    found = extract_final_answer(completion)
    return found is not None and found == normalize_answer(expected)
