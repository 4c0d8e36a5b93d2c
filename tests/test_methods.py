"""The four methods of bench/bench_opd_vs_rl.py: pure OPD, pure GRPO (no teacher), off-policy, OPD + GRPO."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.batch import collate
from opd.config import load_config
from opd.metrics import read_metrics
from opd.models import load_model
from opd.rollout import Sampling
from opd.rollout.hf import HFRolloutEngine
from opd.tasks import arithmetic_examples
from opd.teacher import make_teacher_scorer
from opd.tokenization import render_prompt
from opd.objectives import micro_loss
from opd.train import batch_metrics, task_advantages, train, train_offpolicy

SMALL = ["prompts_per_step=4", "completions_per_prompt=2", "max_new_tokens=24", "eval_size=8", "train_size=64",
         "progress=false", "log_samples=0", "lr=1e-3", "steps=2", "eval_every=0", "save_every=0"]
GRPO = ["teacher_backend=none", "task_reward=true", "kl_coef=0"]
METHODS = {"opd": (train, []), "grpo": (train, GRPO), "offpolicy": (train_offpolicy, []),
           "opd+grpo": (train, ["task_reward=true", "kl_coef=1"])}


@pytest.mark.parametrize("method", METHODS)
def test_two_steps_of_each_method_change_the_student_and_log_finite_metrics(tmp_path, method):
    loop, overrides = METHODS[method]
    before = load_model("tiny:student").state_dict()
    run_dir = loop(load_config(None, [*SMALL, *overrides, f"out_dir={tmp_path}"]))
    after = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert all(math.isfinite(v) for v in r.values()), r
    steps = records[1:]
    assert all(r["train/grad_norm"] > 0 and "eval/student_accuracy" in r for r in steps[-1:])
    if method == "grpo":  # no teacher scored: no reverse KL or teacher NLL may be reported
        assert not any(k in r for r in steps for k in ("opd/sampled_reverse_kl", "gen/teacher_nll"))
    elif method == "offpolicy":  # trained by cross-entropy: no on-policy (opd/*) metric at all
        assert all(r["sft/nll"] > 0 and not any(k.startswith("opd/") for k in r) for r in steps)
    else:
        assert all(r["opd/sampled_reverse_kl"] != 0 for r in steps)


def test_pure_grpo_is_the_mix_at_lambda_zero_without_running_the_teacher(teacher, student, tokenizer):
    # Same rollouts and rewards: the none scorer (no teacher) and the hf teacher at λ = kl_coef = 0 must
    # give the same loss and gradient, since Â = A_task - 0 · m (p - q) = A_task.
    prompts = [render_prompt(tokenizer, ex.prompt) for ex in arithmetic_examples(3, "test")]
    rollouts = HFRolloutEngine(student, tokenizer).generate(prompts, 2, Sampling(max_new_tokens=12), seed=0)
    for i, r in enumerate(rollouts):
        r.reward = float(i % 3 == 0)  # groups (0, 1), (2, 3), (4, 5): rewards (1, 0), (0, 1), (0, 0)
    grpo = load_config(None, GRPO)
    mix0 = load_config(None, ["task_reward=true", "kl_coef=0"])
    assert make_teacher_scorer("none", teacher).score(rollouts, 1.0) is None
    none_batch = collate(rollouts, None, tokenizer.pad_token_id, advantages_B=task_advantages(rollouts, grpo))
    hf_scores = make_teacher_scorer("hf", teacher).score(rollouts, 1.0)
    hf_batch = collate(rollouts, hf_scores, tokenizer.pad_token_id, advantages_B=task_advantages(rollouts, mix0))
    assert none_batch.teacher_logprobs_B_T is None and none_batch.teacher_topk_ids_B_T_K is None
    losses, grads = [], []
    for batch, config in ((none_batch, grpo), (hf_batch, mix0)):
        loss, _ = micro_loss(student, batch, config, batch.num_tokens)
        losses.append(loss.item())
        grads.append(torch.autograd.grad(loss, list(student.parameters())))
    assert losses[0] == pytest.approx(losses[1], abs=1e-7)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in grads[0])  # groups (0, 1) and (2, 3) carry signal
    assert "opd/sampled_reverse_kl" not in batch_metrics(none_batch, rollouts)
    assert "opd/sampled_reverse_kl" in batch_metrics(hf_batch, rollouts)


@pytest.mark.parametrize("overrides", [["teacher_backend=none"], ["teacher_backend=none", "task_reward=true"],
                                       ["teacher_backend=none", "kl_coef=0"]])
def test_pure_grpo_needs_the_task_reward_and_no_teacher_coefficient(overrides):
    with pytest.raises(ValueError, match="teacher_backend=none .* needs task_reward=true and kl_coef=0"):
        load_config(None, overrides)
