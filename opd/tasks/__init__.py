"""Built-in prompt sources with the `Final: <answer>` grader.

Every task produces data rows of the one schema a user's file has (docs/design.md §7, `opd.data`):
the student's chat prompt with the reference solution as a trailing assistant turn (ending in
`Final: <answer>`; it pre-trains the bundled models), a teacher prompt when privileged, the
answer and an id. `opd.rows.example_from_row` turns each into an `Example`, as for a file.
"""

from opd.tasks.arithmetic import arithmetic_examples, arithmetic_rows
from opd.tasks.automaton import automaton_rows
from opd.tasks.base import FINAL_RE, Example, extract_final_answer, grade, normalize_answer
from opd.tasks.gsm8k import gsm8k_examples, gsm8k_rows, load_gsm8k

__all__ = [
    "FINAL_RE",
    "Example",
    "arithmetic_examples",
    "arithmetic_rows",
    "automaton_rows",
    "extract_final_answer",
    "grade",
    "gsm8k_examples",
    "gsm8k_rows",
    "load_gsm8k",
    "normalize_answer",
    "task_rows",
]


def task_rows(name: str, split: str, n: int | None = None, seed: int = 0, data_dir: str | None = None) -> list[dict]:
    """The one place that maps a task name from a config to its data rows."""
    if name in ("arithmetic", "arithmetic_privileged"):
        return arithmetic_rows(n or 1000, split=split, seed=seed, privileged=name == "arithmetic_privileged")
    if name in ("automaton", "automaton_privileged"):
        return automaton_rows(n or 1000, split=split, seed=seed, privileged=name == "automaton_privileged")
    if name in ("gsm8k", "gsm8k_privileged"):
        return gsm8k_rows(split, n=n, data_dir=data_dir, privileged=name == "gsm8k_privileged")
    raise ValueError(f"unknown task {name!r}; accepted: 'arithmetic', 'arithmetic_privileged', 'automaton', "
                     f"'automaton_privileged', 'gsm8k', 'gsm8k_privileged'")


def load_task(name: str, split: str, n: int | None = None, seed: int = 0, data_dir: str | None = None) -> list[Example]:
    """A task's examples: its rows through the same conversion as a user's file."""
    from opd.rows import example_from_row  # opd.rows imports this package

    return [example_from_row(row) for row in task_rows(name, split, n, seed, data_dir)]
