"""The off-policy distillation baseline: the student learns the teacher's sampled tokens, and nothing else."""

import pytest
import torch

from opd.batch import collate
from opd.cli import main
from opd.config import TrainConfig, load_config
from opd.metrics import read_metrics
from opd.objectives import cross_entropy_micro_loss
from opd.offpolicy import check_offpolicy_config, on_student_prompts, own_scores
from opd.train import train_offpolicy
from opd.rollout import Sampling
from opd.rollout.hf import HFRolloutEngine
from opd.tasks import arithmetic_examples
from opd.teacher.hf import score_tokens
from opd.tokenization import render_prompt


def test_offpolicy_batch_trains_on_the_teacher_completion_only(teacher, student, tokenizer):
    # The teacher samples after its own prompt (longer: a hint line, as a privileged prompt would be);
    # the student's rows must hold the student's prompt, then exactly the teacher's tokens, with the
    # mask on the teacher's tokens only.
    examples = arithmetic_examples(3, "test")
    prompts = [render_prompt(tokenizer, ex.prompt) for ex in examples]
    teacher_prompts = [render_prompt(tokenizer, [{"role": "user", "content": "hint: one step a line\n"
                                                  + ex.prompt[-1]["content"]}]) for ex in examples]
    chosen_P = [2, 0]  # the step's prompts, as indices into the pool
    samples = HFRolloutEngine(teacher, tokenizer).generate([teacher_prompts[i] for i in chosen_P], 2,
                                                           Sampling(max_new_tokens=16), seed=0)
    rollouts = on_student_prompts(samples, chosen_P, prompts)
    batch = collate(rollouts, own_scores(samples), tokenizer.pad_token_id)
    for b, (r, s) in enumerate(zip(rollouts, samples, strict=True)):
        prompt, completion = prompts[chosen_P[s.prompt_index]], s.completion_ids
        P, R = len(prompt), len(completion)
        assert r.prompt_ids == prompt and r.teacher_prompt_ids == teacher_prompts[chosen_P[s.prompt_index]]
        assert P < len(s.prompt_ids) and R > 0
        assert batch.tokens_B_L[b, :P].tolist() == prompt
        assert batch.tokens_B_L[b, P : P + R].tolist() == completion  # labels of targets [P-1, P-1+R): the teacher's
        assert batch.loss_mask_B_T[b].nonzero().flatten().tolist() == list(range(P - 1, P - 1 + R))
        assert batch.teacher_logprobs_B_T[b, P - 1 : P - 1 + R].tolist() == pytest.approx(s.sampler_logprobs)
    # The teacher's sampler logprobs are its own scores of those tokens (so no second teacher pass is needed).
    rescored = score_tokens(teacher, [s.prompt_ids for s in samples], [s.completion_ids for s in samples], 1.0)
    for s, t in zip(samples, rescored, strict=True):
        torch.testing.assert_close(torch.tensor(s.sampler_logprobs), t.logprobs_R, atol=1e-4, rtol=1e-4)
    # The loss is the student's NLL of exactly the teacher's tokens after the student prompt, scored independently.
    N = batch.num_tokens
    loss, metrics = cross_entropy_micro_loss(student, batch, TrainConfig(), N)
    with torch.no_grad():
        ref = score_tokens(student, [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], 1.0)
    expected = -sum(s.logprobs_R.sum().item() for s in ref) / N
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["sft/nll"].item() == pytest.approx(expected, rel=1e-5)  # one micro-batch: mean = loss


@pytest.mark.parametrize("override", ["task_reward=true", "loss=topk_kl", "kl_coef=0.5", "discount=0.5",
                                      "opsm_delta=0.1", "fsdp=true"])
def test_offpolicy_refuses_settings_of_the_on_policy_loss(override):
    config = load_config(None, [override])
    with pytest.raises(ValueError, match=f"only act in the on-policy loop.*{override.split('=')[0]}"):
        check_offpolicy_config(config)


def test_offpolicy_cli_stops_before_loading_models(capsys, monkeypatch):
    import opd.train

    def no_models(*args, **kwargs):
        raise AssertionError("models were loaded before the config was checked")

    monkeypatch.setattr(opd.train, "load_models", no_models)
    assert main(["train-offpolicy", "task_reward=true"]) == 2
    assert "off-policy distillation trains by cross-entropy on teacher samples" in capsys.readouterr().err


def test_offpolicy_resume_continues_exactly(tmp_path):
    # The same checkpoint format as `opd train`: 3 steps in one go equal 2 steps, then a resume for the third.
    small = ["prompts_per_step=4", "completions_per_prompt=2", "max_new_tokens=16", "eval_size=4", "train_size=32",
             "progress=false", "log_samples=0", "lr=1e-3", "eval_every=0", "save_every=2", "lr_schedule=constant"]
    whole = read_metrics(train_offpolicy(load_config(None, [*small, "steps=3", f"out_dir={tmp_path / 'whole'}"])))
    first = read_metrics(train_offpolicy(load_config(None, [*small, "steps=2", f"out_dir={tmp_path / 'split'}"])))
    split = read_metrics(train_offpolicy(load_config(None, [*small, "steps=3", "resume=true",
                                                           f"out_dir={tmp_path / 'split'}"])))
    assert [r["step"] for r in split] == [0, 1, 2, 3]
    assert split[:3] == first  # steps 0-2 were not re-run (their wall-clock timings would differ)
    for key in ("train/loss", "sft/nll", "gen/teacher_nll", "train/grad_norm"):
        assert split[3][key] == pytest.approx(whole[3][key], rel=1e-5), key
