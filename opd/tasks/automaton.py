"""A long-horizon task where one wrong line makes every later line wrong: an elementary cellular automaton.

The problem is a row of 12 cells (0 or 1); the worked solution copies it (`Now: [<row>]`), then writes the
row after each of 5 steps of Wolfram's rule 30 (a cell's next value is `left XOR (centre OR right)`, cells
past either edge are 0), one a line, `Then: [<row>]`, the last one `Final: [<row>]`. Every line has the same
token layout (`Now`, `Then` and `Final` are one token each), so every cell's three parents are the same
distance back (19, 18 and 17 tokens) on every line, the answer line included: a first build that
*copied* the last row into a differently laid out `Final:` line learned every rule cell exactly and
failed on the copy. Rule 30 is chaotic: a wrong cell at step s spreads
one cell further each way at every later step, so an early mistake changes everything after it, the
regime where on-policy distillation is claimed to beat training on teacher traces (Thinking Machines,
"On-Policy Distillation", 2025). Completions are 108 tokens with the bundled tokenizer (a token per
digit, eos included). Each output cell is a fixed function of three cells a fixed distance back, so a tiny
model can learn the rule exactly; what it cannot afford is one slip in 60 cells. Train and test are split
by a hash of the start row (10% test), as `opd.tasks.arithmetic` does, so no held-out start is seen.
"""

from __future__ import annotations

import hashlib
import random

from opd.tasks.base import privileged_messages

CELLS, STEPS, RULE = 12, 5, 30
PROMPT = f"Rule {RULE}, {STEPS} steps: {{row}}"


def step(cells: list[int], rule: int = RULE) -> list[int]:
    """One step of an elementary cellular automaton with 0 past both edges (Wolfram's rule numbering)."""
    padded = [0, *cells, 0]
    return [(rule >> (padded[i] * 4 + padded[i + 1] * 2 + padded[i + 2])) & 1 for i in range(len(cells))]


def solve(start: str, steps: int = STEPS) -> tuple[str, str]:
    """(worked solution, answer) for a start row such as '011010011010'."""
    cells, rows = [int(c) for c in start], [start]
    for _ in range(steps):
        cells = step(cells)
        rows.append("".join(map(str, cells)))
    answer = f"[{rows[-1]}]"  # bracketed: the grader reads a bare 0110 as the number 110
    labels = ["Now", *["Then"] * (steps - 1), "Final"]
    return "\n".join(f"{label}: [{row}]" for label, row in zip(labels, rows, strict=True)), answer


def _is_test_start(start: str) -> bool:
    return int(hashlib.sha1(f"automaton-{start}".encode()).hexdigest(), 16) % 10 == 0


def automaton_rows(n: int, split: str = "train", seed: int = 0, privileged: bool = False) -> list[dict]:
    """`n` distinct start rows of one split as data rows (the worked solution as the reference turn).

    The split has 4,096 · 0.9 or 0.1 distinct starts (~3,690 train, ~410 test); asking for more raises.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    starts = [s for s in (format(i, f"0{CELLS}b") for i in range(1 << CELLS)) if _is_test_start(s) == (split == "test")]
    if n > len(starts):
        raise ValueError(f"the automaton task's {split} split has {len(starts)} distinct problems, asked for {n}; "
                         f"lower train_size / eval_size")
    random.Random(f"automaton-{split}-{seed}").shuffle(starts)
    rows = []
    for start in starts[:n]:
        problem, (solution, answer) = PROMPT.format(row=start), solve(start)
        rows.append({"id": f"automaton-{start}", "answer": answer,
                     "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": solution}]})
        if privileged:
            rows[-1]["teacher_messages"] = privileged_messages(problem, solution)
    return rows
