"""The one loop (#20): off-policy is a sampler and a loss in `train()`, several updates per batch, its shape."""

import ast
import inspect
import math
from pathlib import Path

import pytest
import torch

import opd.train
from opd.cli import main
from opd.config import TrainConfig, load_config
from opd.metrics import read_metrics
from opd.models import load_tokenizer
from opd.rollout import Sampling
from opd.rollout.hf import HFRolloutEngine
from opd.runfolder import training_fields
from opd.sampler import completed
from opd.tasks import arithmetic_examples
from opd.tokenization import render_prompt
from opd.train import train, train_offpolicy

SMALL = ["prompts_per_step=4", "completions_per_prompt=2", "max_new_tokens=16", "eval_size=4", "train_size=32",
         "progress=false", "log_samples=0", "lr=1e-3", "steps=2", "eval_every=0", "save_every=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One on-policy and one off-policy run of two steps, on the same settings."""
    root = tmp_path_factory.mktemp("loop")
    on = train(load_config(None, [*SMALL, f"out_dir={root / 'on'}"]))
    off = train_offpolicy(load_config(None, [*SMALL, f"out_dir={root / 'off'}"]))
    return on, off


def test_opd_validate_passes_on_an_offpolicy_run(runs, capsys):
    _, off = runs
    assert main(["validate", str(off)]) == 0
    assert capsys.readouterr().out.startswith(f"OK: {off}")


def test_on_and_off_policy_runs_log_the_same_keys_for_shared_quantities(runs):
    on, off = (read_metrics(run)[1] for run in runs)
    # what only the on-policy objective measures is `opd/*`; what only cross-entropy measures is `sft/*`
    shared_on = {k for k in on if not k.startswith("opd/")}
    shared_off = {k for k in off if not k.startswith("sft/")}
    assert shared_on == shared_off
    assert {"train/active_tokens", "train/loss", "train/grad_norm", "train/lr", "gen/teacher_nll", "gen/sampler_nll",
            "gen/mean_length", "task/reward", "perf/step_s"} <= shared_on
    assert off["gen/sampler_nll"] == pytest.approx(off["gen/teacher_nll"])  # the teacher sampled: p = q


def test_offpolicy_is_loss_cross_entropy_of_the_one_loop_and_refuses_on_policy_settings():
    assert load_config(None, ["loss=cross_entropy"]).loss == "cross_entropy"
    with pytest.raises(ValueError, match="only act in the on-policy loop.*kl_coef"):
        load_config(None, ["loss=cross_entropy", "kl_coef=0.5"])
    load_config(None, ["loss=cross_entropy", "top_k=5"])  # the teacher may sample truncated, as the student does


def test_two_updates_per_batch_step_the_optimizer_twice_per_loop_step(tmp_path, monkeypatch):
    steps, step = [], torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    records = read_metrics(train(load_config(None, [*SMALL, "updates_per_batch=2", f"out_dir={tmp_path}"])))
    assert len(steps) == 2 * 2
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert all(math.isfinite(v) for v in r.values()), r
    assert records[2]["train/grad_norm"] > 0


@pytest.mark.parametrize("value", ["0", "-1"])
def test_updates_per_batch_must_be_an_integer_of_at_least_one(value):
    load_config(None, ["updates_per_batch=3"])
    with pytest.raises(ValueError, match="updates_per_batch must be an integer >= 1"):
        load_config(None, [f"updates_per_batch={value}"])
    with pytest.raises(ValueError, match="updates_per_batch must be an integer >= 1.*got 1.5"):
        TrainConfig(updates_per_batch=1.5).validate()


def test_updates_per_batch_is_checked_on_resume():
    assert "updates_per_batch" in training_fields(TrainConfig().to_dict())


def test_loss_temperature_is_the_one_name_and_defaults_to_the_sampling_temperature():
    assert load_config(None, ["temperature=0.7"]).loss_temperature == 0.7
    assert load_config(None, ["temperature=0.7", "loss_temperature=0.5"]).loss_temperature == 0.5
    assert not hasattr(TrainConfig(), "divergence_temperature")
    # a run recorded before the default was resolved (loss_temperature: null) is the same run
    old = {**TrainConfig().to_dict(), "loss_temperature": None}
    assert training_fields(old) == training_fields(TrainConfig().to_dict())


def test_completed_builds_new_rollouts_and_leaves_the_engine_output_alone(student):
    tokenizer = load_tokenizer("tiny:student")
    examples = arithmetic_examples(3, "test")
    prompts = [render_prompt(tokenizer, ex.prompt) for ex in examples]
    teacher_prompts = [render_prompt(tokenizer, [{"role": "user", "content": "hint\n" + ex.prompt[-1]["content"]}])
                       for ex in examples]
    chosen_P = [2, 0]
    generated = HFRolloutEngine(student, tokenizer).generate([prompts[i] for i in chosen_P], 2,
                                                             Sampling(max_new_tokens=8), seed=0)
    before = [(r.teacher_prompt_ids, r.expected_answer, r.reward) for r in generated]
    done = completed(generated, chosen_P, teacher_prompts, examples, tokenizer)
    assert [(r.teacher_prompt_ids, r.expected_answer, r.reward) for r in generated] == before  # untouched
    for r, g in zip(done, generated, strict=True):
        assert r is not g and r.completion_ids == g.completion_ids and r.prompt_ids == g.prompt_ids
        assert r.teacher_prompt_ids == teacher_prompts[chosen_P[r.prompt_index]]
        assert r.expected_answer == examples[chosen_P[r.prompt_index]].answer and r.reward in (0.0, 1.0)


def nesting(node: ast.AST, depth: int = 0) -> int:
    blocks = (ast.For, ast.While, ast.If, ast.With, ast.Try, ast.FunctionDef, ast.AsyncFor, ast.AsyncWith)
    inner = [nesting(child, depth + isinstance(child, blocks)) for child in ast.iter_child_nodes(node)]
    return max(inner, default=depth)


def test_train_is_one_short_loop():
    source = Path(inspect.getsourcefile(opd.train)).read_text()
    defs = {n.name: n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    body = defs["train"]
    assert body.end_lineno - body.lineno + 1 <= 100
    assert nesting(body, 1) <= 3  # the def, the step loop, a branch in it
    loops = [n for d in defs.values() for n in ast.walk(d) if isinstance(n, ast.For)
             and "step" in ast.unparse(n.target)]
    assert len(loops) == 1  # no second training loop in the module
