"""Writes examples/data/multi_teacher.jsonl, the rows of recipes/multi_teacher.yaml (#22), deterministically.

1500 arithmetic rows routed to the teacher `arith` and 500 GSM8K train rows routed to `gsm8k`, shuffled
with seed 0; each row is {"prompt", "answer", "teacher"}. The GSM8K questions are the bundled copy of
GSM8K (MIT). Run: .venv/bin/python scripts/make_multi_teacher_data.py
"""

import json
import random
from pathlib import Path

from opd.tasks import task_rows

OUT = Path(__file__).resolve().parent.parent / "examples" / "data" / "multi_teacher.jsonl"


def main() -> None:
    rows = [{"prompt": r["messages"][0]["content"], "answer": r["answer"], "teacher": route}
            for task, route, n in (("arithmetic", "arith", 1500), ("gsm8k", "gsm8k", 500))
            for r in task_rows(task, "train", n, 0, None)]
    random.Random(0).shuffle(rows)
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{OUT}: {len(rows)} rows")


if __name__ == "__main__":
    main()
