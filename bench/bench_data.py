"""Reading and validating a million chat rows: `opd.data.load_data` on a JSONL file (issue #19).

    python bench/bench_data.py [--rows 1000000] [--keep]

Writes a JSONL file of `--rows` Fireworks-style rows (`messages`: a user turn and the reference
assistant turn, ~200 characters of content, plus `expected_answer`), then, in a fresh process each,
runs the real path of `opd train data=FILE` up to the first model load: read with `datasets` (Arrow,
memory-mapped), every row through the schema and the validation rules, the hash split, the token
summary on a sample. Cold = the first read (JSON -> Arrow cache), warm = the cached Arrow read again.
Peak RSS is the child's `ru_maxrss`. Targets: <= 30 s and <= 1 GB. Writes bench/results/bench_data.json.
The machine's cores are shared with other work: wall times are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "bench_data.json"
WORDS = "the of and to in is was for on that with as by at from his her an which or be are this had not".split()

CHILD = r"""
import json, logging, resource, sys, time
t0 = time.perf_counter()
from opd.config import load_config
from opd.data import load_data
import datasets
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
data = load_data(load_config(None, [f"data={sys.argv[1]}", "reward=exact"]))
t2 = time.perf_counter()
example = data.train[len(data.train) // 2]  # a row read back, converted on demand
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "train_rows": len(data.train), "eval_rows": len(data.eval),
                  "rss_after_imports_mb": rss0 / 1024, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "summary": data.summary}))
"""


def write_rows(path: Path, n: int, seed: int = 0) -> float:
    """n rows of ~200 characters of chat content; returns the mean content length."""
    rng = random.Random(seed)
    total = 0
    with path.open("w") as f:
        for i in range(n):
            question = f"Q{i}: " + " ".join(rng.choice(WORDS) for _ in range(38)) + "?"
            answer = f"{rng.randrange(10**6)}"
            reasoning = " ".join(rng.choice(WORDS) for _ in range(6)) + f". Final: {answer}"
            total += len(question) + len(reasoning)
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": reasoning}],
                                "expected_answer": answer}) + "\n")
    return total / n


def measure(path: Path, cache: Path) -> dict:
    env = os.environ | {"HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True, text=True, check=True)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record["wall_s"] = time.perf_counter() - start
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help="keep the generated file and cache")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        path, cache = Path(tmp) / "rows.jsonl", Path(tmp) / "cache"
        t = time.perf_counter()
        chars = write_rows(path, args.rows)
        print(f"wrote {args.rows:,} rows ({path.stat().st_size / 1e6:.0f} MB, {chars:.0f} characters of content a row) "
              f"in {time.perf_counter() - t:.0f}s")
        cold, warm = measure(path, cache), measure(path, cache)
        if args.keep:
            os.system(f"cp -r {tmp} {tmp}_kept")
    print(f"\n{'':<6}{'load_data s':>12}{'imports s':>11}{'peak RSS MB':>13}{'RSS after imports MB':>22}")
    for name, r in (("cold", cold), ("warm", warm)):
        print(f"{name:<6}{r['load_s']:>12.1f}{r['import_s']:>11.1f}{r['peak_rss_mb']:>13.0f}{r['rss_after_imports_mb']:>22.0f}")
    print(f"\ntargets: <= 30 s and <= 1024 MB for {args.rows:,} rows (2 shared CPU cores: noisy)\n{cold['summary']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": args.rows, "content_chars_per_row": chars, "cold": cold, "warm": warm,
                                   "targets": {"seconds": 30, "peak_rss_mb": 1024},
                                   "machine": "2 CPU cores shared with other jobs"}, indent=2) + "\n")
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
