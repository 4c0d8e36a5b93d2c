"""The real pretrained pair (#21): 2 steps of recipes/smollm2_distill.yaml, when the converted model is here.

Skipped unless `./scripts/get-smollm2.sh` has converted SmolLM2-135M-Instruct into
models/smollm2-135m-instruct (540 MB, never in git); CI has no such folder, so it never runs there.
"""

import json
from pathlib import Path

import pytest

from opd.config import load_config
from opd.metrics import read_metrics
from opd.prune import init_student
from opd.train import train

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "models" / "smollm2-135m-instruct"
RECIPE = ROOT / "recipes" / "smollm2_distill.yaml"
ROWS = [("Ann has 3 bags of 4 apples. How many apples does she have?", "3 * 4 = 12\n#### 12"),
        ("Bo had 10 coins and spent 7. How many coins are left?", "10 - 7 = 3\n#### 3"),
        ("A pen costs 2 dollars. How much do 5 pens cost?", "5 * 2 = 10\n#### 10"),
        ("Cy reads 6 pages a day for 3 days. How many pages?", "6 * 3 = 18\n#### 18")]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (TEACHER / "model.safetensors").is_file(),
                                 reason=f"{TEACHER.relative_to(ROOT)} not found: run ./scripts/get-smollm2.sh first")]


def test_two_steps_of_the_recipe(tmp_path):
    for split in ("train", "test"):  # GSM8K-format rows, so the test needs no data folder
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in ROWS))
    init_student(str(TEACHER), tmp_path / "student", keep=6)
    config = load_config(RECIPE, [f"student={tmp_path / 'student'}", f"teacher={TEACHER}", f"data_dir={tmp_path}",
                                  f"out_dir={tmp_path / 'run'}", "steps=2", "train_size=4", "eval_size=2",
                                  "prompts_per_step=2", "max_new_tokens=16", "eval_every=0", "save_every=0",
                                  "progress=false"])
    run_dir = train(config)
    records = read_metrics(run_dir)
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    evals = [r for r in records if "eval/trace_gap" in r]
    assert [r["step"] for r in evals] == [0, 2] and all(r["eval/trace_gap"] == r["eval/trace_gap"] for r in evals)
    assert (run_dir / "final" / "model.safetensors").is_file()
