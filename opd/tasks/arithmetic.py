"""Synthetic multi-step arithmetic: 2-3 operand addition/subtraction of numbers below 100.

The worked solution does one operation a line, so a tiny model gains from its own
reasoning tokens; the last line is `Final: <answer>`. Train and test are split by a
hash of the problem text, so no held-out problem is ever seen in training.
"""

from __future__ import annotations

import hashlib
import random

from opd.tasks.base import Example, privileged_messages


def _is_test_problem(problem: str) -> bool:
    return int(hashlib.sha1(problem.encode()).hexdigest(), 16) % 10 == 0


def make_problem(rng: random.Random, max_operand: int = 100) -> tuple[str, str, str]:
    """(problem text, worked solution, answer) for one random problem, operands in [0, max_operand)."""
    n_operands = rng.choice((2, 3))
    operands = [rng.randrange(max_operand) for _ in range(n_operands)]
    ops = [rng.choice("+-") for _ in range(n_operands - 1)]
    problem = str(operands[0]) + "".join(f"{op}{x}" for op, x in zip(ops, operands[1:], strict=True))
    lines, value = [], operands[0]
    for op, x in zip(ops, operands[1:], strict=True):
        new = value + x if op == "+" else value - x
        lines.append(f"{value}{op}{x}={new}")
        value = new
    lines.append(f"Final: {value}")
    return problem, "\n".join(lines), str(value)


def arithmetic_examples(n: int, split: str = "train", seed: int = 0, max_operand: int = 100,
                        privileged: bool = False) -> list[Example]:
    """`n` distinct problems of one split ('train' or 'test'), deterministic in `seed`, as examples."""
    from opd.rows import example_from_row  # the one path from a row to an example (opd.rows imports this package)

    return [example_from_row(row) for row in arithmetic_rows(n, split, seed, max_operand, privileged)]


def arithmetic_rows(n: int, split: str = "train", seed: int = 0, max_operand: int = 100,
                    privileged: bool = False) -> list[dict]:
    """`n` distinct problems as data rows: the worked solution is the reference (trailing assistant) turn.

    `privileged`: the teacher prompt also holds the worked solution, in GSM8K's privileged format
    (`opd.tasks.base.privileged_messages`); the student's prompt is the problem alone, as without it.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"arithmetic-{split}-{seed}")
    want_test = split == "test"
    examples, seen = [], set()
    while len(examples) < n:
        problem, solution, answer = make_problem(rng, max_operand)
        if _is_test_problem(problem) != want_test or problem in seen:
            continue
        seen.add(problem)
        examples.append({"id": f"arithmetic-{split}-{seed}-{len(examples)}", "answer": answer,
                         "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": solution}]})
        if privileged:
            examples[-1]["teacher_messages"] = privileged_messages(problem, solution)
    return examples
