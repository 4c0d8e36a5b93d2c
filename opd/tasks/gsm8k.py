"""GSM8K (MIT licence) from local JSONL files, with a privileged teacher prompt.

Each line holds `question` and `answer`; the answer's `#### <n>` line gives the expected
answer and the lines above it the worked solution (calculator annotations `<<...>>`
removed). The student sees the question; the privileged teacher also sees the worked
solution, clearly marked, and both are asked to end with `Final: <answer>`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from opd.tasks.base import INSTRUCTION, PRIVILEGED_HEADER, Example, normalize_answer, privileged_messages

__all__ = ["INSTRUCTION", "PRIVILEGED_HEADER", "gsm8k_examples", "gsm8k_rows", "load_gsm8k", "split_solution"]
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "assets" / "data" / "gsm8k"  # shipped in the package (MIT)
_CALC_RE = re.compile(r"<<[^>]*>>")
REQUIRED_FIELDS = ("question", "answer")


def load_gsm8k(path: str | Path) -> list[dict[str, str]]:
    """All rows of one JSONL file; a bad line raises with file, line number and field.

    The whole file is parsed before anything is returned, so nothing is half-loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file not found: {path} (set task.data_dir to the folder holding train.jsonl/test.jsonl)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            for field in REQUIRED_FIELDS:
                if not isinstance(row.get(field), str) or not row[field].strip():
                    raise ValueError(f"{path}:{line_no}: missing or empty string field {field!r}")
            if "####" not in row["answer"]:
                raise ValueError(f"{path}:{line_no}: field 'answer' has no '#### <answer>' line")
            rows.append(row)
    return rows


def split_solution(answer_field: str) -> tuple[str, str]:
    """(worked solution ending in `Final: <answer>`, normalized answer) from a GSM8K answer field."""
    body, _, final = answer_field.rpartition("####")
    answer = normalize_answer(final)
    lines = [_CALC_RE.sub("", line).strip() for line in body.strip().splitlines()]
    lines = [line for line in lines if line]
    return "\n".join([*lines, f"Final: {answer}"]), answer


def gsm8k_examples(split: str, n: int | None = None, data_dir: str | Path | None = None, privileged: bool = False) -> list[Example]:
    """The first `n` rows of `split` as examples; the teacher prompt is privileged if asked."""
    from opd.rows import example_from_row  # the one path from a row to an example (opd.rows imports this package)

    return [example_from_row(row) for row in gsm8k_rows(split, n, data_dir, privileged)]


def gsm8k_rows(split: str, n: int | None = None, data_dir: str | Path | None = None, privileged: bool = False) -> list[dict]:
    """The first `n` rows of `split` as data rows (docs/design.md §7): the worked solution is the reference turn."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rows = load_gsm8k(Path(data_dir or DEFAULT_DATA_DIR) / f"{split}.jsonl")
    out = []
    for i, row in enumerate(rows[:n]):
        solution, answer = split_solution(row["answer"])
        question = row["question"].strip()
        prompt = f"{question}\n{INSTRUCTION}"
        out.append({"id": f"gsm8k-{split}-{i}", "answer": answer,
                    "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": solution}]})
        if privileged:
            out[-1]["teacher_messages"] = privileged_messages(question, solution)
    return out
