"""Prompt sources with graders.

Every task yields `Example`s: the student's chat prompt, the teacher's (equal unless the
task is privileged), the expected answer, and a reference solution that ends in
`Final: <answer>` (used to pre-train the bundled models and by off-policy baselines).
"""

from opd.tasks.arithmetic import arithmetic_examples
from opd.tasks.base import FINAL_RE, Example, extract_final_answer, grade, normalize_answer
from opd.tasks.gsm8k import gsm8k_examples, load_gsm8k

__all__ = [
    "FINAL_RE",
    "Example",
    "arithmetic_examples",
    "extract_final_answer",
    "grade",
    "gsm8k_examples",
    "load_gsm8k",
    "normalize_answer",
]


def load_task(name: str, split: str, n: int | None = None, seed: int = 0, data_dir: str | None = None) -> list[Example]:
    """The one place that maps a task name from a config to its examples."""
    if name == "arithmetic":
        return arithmetic_examples(n or 1000, split=split, seed=seed)
    if name in ("gsm8k", "gsm8k_privileged"):
        return gsm8k_examples(split, n=n, data_dir=data_dir, privileged=name == "gsm8k_privileged")
    raise ValueError(f"unknown task {name!r}; accepted: 'arithmetic', 'gsm8k', 'gsm8k_privileged'")
