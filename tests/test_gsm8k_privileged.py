"""The privileged GSM8K recipe: its config, its rows, a short run, and the builder of its model."""

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.config import load_config
from opd.metrics import PLOTS, plot_run, read_metrics
from opd.models import load_model, load_tokenizer, resolve
from opd.tasks import load_task
from opd.bundled.gsm8k import GSM8K_DIR, SPEC, build_tiny_gsm8k, completion_nll
from opd.train import train
from opd.validate import validate_privileged

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "gsm8k_privileged.yaml"


def test_recipe_loads_as_the_reference_run():
    config = load_config(RECIPE)
    assert (config.teacher, config.self_teacher, config.student) == ("self", "frozen", "tiny:gsm8k")
    assert resolve(config.student) == GSM8K_DIR
    assert config.task == "gsm8k_privileged"
    assert (config.train_size, config.prompts_per_step, config.steps, config.completions_per_prompt) == (8, 8, 25, 4)
    assert config.eval_train_size == 8 and config.eval_size > 0  # the training rows and held-out rows
    assert config.eval_every == 5  # step 0 is always evaluated


def test_recipe_rows_give_the_solution_to_the_teacher_only():
    config = load_config(RECIPE)
    examples = load_task(config.task, "train", config.train_size, config.seed, config.data_dir)
    assert len(examples) == 8
    validate_privileged(examples)
    for ex in examples:
        student_text, teacher_text = ex.prompt[-1]["content"], ex.teacher_prompt[-1]["content"]
        body = ex.solution.rsplit("\nFinal:", 1)[0]  # the worked steps, without the stated answer
        assert ex.solution in teacher_text and body not in student_text
        assert student_text.split("\n")[0] in teacher_text  # the same question


def test_bundled_gsm8k_model_copies_the_privileged_solution():
    # The build's purpose: with the solution in its prompt the model predicts it far better
    # than from the question alone (a teacher-forced forward on the recipe's 8 rows).
    model, tokenizer = load_model("tiny:gsm8k").eval(), load_tokenizer("tiny:gsm8k")
    assert AutoTokenizer.from_pretrained(GSM8K_DIR).get_vocab() == load_tokenizer("tiny:teacher").get_vocab()
    examples = load_task("gsm8k_privileged", "train", 8)
    plain = completion_nll(model, tokenizer, examples)
    privileged = completion_nll(model, tokenizer, [replace(ex, prompt=ex.teacher_prompt) for ex in examples])
    assert privileged < 0.5 * plain, (privileged, plain)
    report = json.loads((GSM8K_DIR / "build_report.json").read_text())
    assert report["recipe_rows"]["teacher_nll_on_own_greedy_trace"] < report["recipe_rows"]["step0_eval"][
        "eval/trace_student_nll"]
    assert sum(f.stat().st_size for f in GSM8K_DIR.iterdir()) < 12e6  # bf16 weights


def test_two_steps_of_the_recipe_log_trace_gaps_on_both_sets(tmp_path):
    overrides = ["steps=2", "train_size=2", "prompts_per_step=2", "completions_per_prompt=2", "eval_train_size=2",
                 "eval_size=2", "max_new_tokens=16", "eval_every=0", "save_every=0", "progress=false",
                 "log_samples=0", f"out_dir={tmp_path / 'run'}"]
    records = read_metrics(train(load_config(RECIPE, overrides)))
    assert [r["step"] for r in records] == [0, 1, 2]
    for record in (records[0], records[-1]):
        for prefix in ("eval", "eval_train"):
            for key in ("trace_gap", "trace_student_nll", "trace_teacher_nll", "student_accuracy"):
                assert math.isfinite(record[f"{prefix}/{key}"]), (prefix, key)
            assert record[f"{prefix}/trace_tokens"] == 2 * 16  # two teacher traces, cut at 16 tokens
    assert all(math.isfinite(v) for r in records for v in r.values())
    # Same weights and the student prompt is a strict subset of the teacher's: at step 0 the
    # gap is the value of the privileged text alone, and it is not negative on these rows.
    assert records[0]["eval_train/trace_gap"] > 0
    assert any("eval_train/trace_gap" in keys for _, keys in PLOTS)
    assert plot_run(tmp_path / "run").stat().st_size > 10_000


def test_builder_with_a_tiny_budget_saves_a_loadable_bf16_folder(tmp_path):
    spec = replace(SPEC, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_steps=2, eval_every=1,
                   batch_size=2, n_eval=2, train_rows=16)
    report = build_tiny_gsm8k(tmp_path / "m", spec=spec, max_new_tokens=8)
    assert [h["step"] for h in report["history"]] == [1, 2]
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["held_out_nll_privileged"]) for h in report["history"])
    assert report["recipe_rows"]["n"] == 8 and math.isfinite(report["recipe_rows"]["teacher_nll_on_own_greedy_trace"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert next(model.parameters()).dtype == torch.bfloat16  # stored small; `load_model` casts to float32
    assert load_model(str(tmp_path / "m")).dtype == torch.float32
    assert AutoTokenizer.from_pretrained(tmp_path / "m").chat_template is not None
    assert json.loads((tmp_path / "m" / "build_report.json").read_text())["spec"]["hidden_size"] == 32
