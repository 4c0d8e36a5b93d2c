"""End-to-end runs of the one training loop on the bundled tiny teacher and student."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd import checkpoint
from opd.cli import main
from opd.config import load_config
from opd.metrics import plot_run, read_metrics
from opd.models import load_model
from opd.train import train

SMALL = ["prompts_per_step=4", "completions_per_prompt=2", "max_new_tokens=24", "eval_size=8", "train_size=64",
         "progress=false", "log_samples=0", "lr=1e-3"]


def run(tmp_path, name, *overrides):
    return train(load_config(None, [*SMALL, f"out_dir={tmp_path / name}", *overrides]))


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_two_steps_train_the_student_and_leave_the_teacher_alone(tmp_path):
    teacher_before = params(load_model("tiny:teacher"))
    student_before = params(load_model("tiny:student"))
    run_dir = run(tmp_path, "r", "steps=2", "eval_every=0", "save_every=0")
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "eval/student_accuracy" in records[0] and "eval/trace_gap" in records[0]  # step-0 eval before any update
    for r in records:
        assert all(math.isfinite(v) for v in r.values()), r
    assert all(r["train/active_tokens"] > 0 for r in records[1:])
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    after = params(final)
    assert any(not torch.equal(after[k], student_before[k]) for k in student_before)
    assert all(torch.equal(v, teacher_before[k]) for k, v in params(load_model("tiny:teacher")).items())
    ckpt = checkpoint.latest(run_dir)
    assert ckpt.name == "step_000002"
    assert all(torch.equal(v, after[k]) for k, v in params(AutoModelForCausalLM.from_pretrained(ckpt / "model")).items())
    assert json.loads((ckpt / "config.json").read_text())["steps"] == 2
    assert plot_run(run_dir).stat().st_size > 10_000


def test_resumed_run_matches_an_uninterrupted_one_step_for_step(tmp_path):
    common = ["eval_every=0", "save_every=2", "lr_schedule=constant"]
    whole = read_metrics(run(tmp_path, "whole", "steps=4", *common))
    run(tmp_path, "split", "steps=2", *common)
    (tmp_path / "split" / "checkpoints" / "step_000003.tmp").mkdir()  # a killed save: must be ignored
    split = read_metrics(run(tmp_path, "split", "steps=4", "resume=true", *common))
    assert [r["step"] for r in split] == [0, 1, 2, 3, 4]
    for a, b in zip(whole[1:], split[1:], strict=True):
        keys = [k for k in a if not k.startswith(("perf/", "eval/")) and k in b]
        assert len(keys) > 8
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)


@pytest.mark.parametrize("overrides", [
    ["loss=topk_kl", "topk=8", "tail_bucket=true"],
    ["loss=jsd", "jsd_beta=0.5"],
    ["loss=jsd", "jsd_beta=1.0", "temperature=0.8"],
    ["task_reward=true", "kl_coef=0.5"],
    ["opsm_delta=0.0", "micro_batch_size=3"],
    ["discount=0.9", "top_k=20", "top_p=0.95"],
])
def test_every_loss_variant_runs_a_step_with_finite_metrics(tmp_path, overrides):
    records = read_metrics(run(tmp_path, "v", "steps=1", "eval_every=0", "save_every=0", *overrides))
    step = records[1]
    assert all(math.isfinite(v) for v in step.values()), step
    assert step["train/grad_norm"] > 0
    if "loss=topk_kl" in overrides:
        assert 0 < step["opd/teacher_topk_mass"] <= 1.0 + 1e-5
    if "opsm_delta=0.0" in overrides:
        assert "opd/opsm_rejected" in step


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "recipes/demo.yaml", "bogus_key=1"], "Key 'bogus_key' not in 'TrainConfig'"),
    (["train", "loss=kl_magic"], "loss='kl_magic' is not accepted; choose one of reverse_kl, topk_kl, jsd"),
    (["train", "steps=many"], "steps"),
    (["train", "teacher=/no/such/folder"], "teacher='/no/such/folder' is not a model folder"),
    (["train", "missing_recipe.yaml"], "recipe 'missing_recipe.yaml' not found"),
    (["train", "temperature=0"], "temperature and loss_temperature must be > 0"),
    (["train", "jsd_beta=1.5"], "jsd_beta must be in [0, 1]"),
])
def test_bad_configs_stop_before_any_model_is_loaded(argv, message, capsys, monkeypatch):
    import opd.train

    def no_models(*args, **kwargs):
        raise AssertionError("models were loaded before the config was validated")

    monkeypatch.setattr(opd.train, "load_models", no_models)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
