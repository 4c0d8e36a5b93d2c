"""The teacher signal's noise floor (opd/noise_floor.py): each sample scored alone and padded among the others.

Real objects only: the bundled tiny pair with the in-process scorer in fp32 and bf16, a served teacher
(tests/fake_vllm_server.py, a real HTTP server in a subprocess) whose batched requests are scored under a
template its single ones are not, and `opd train` end to end with the check on and off.
"""

import json
import logging
import math

import pytest
import torch

from fake_vllm_server import running
from opd import noise_floor
from opd.config import load_config
from opd.metrics import read_metrics
from opd.models import load_model, load_tokenizer
from opd.rollout import Sampling
from opd.rollout.hf import HFRolloutEngine
from opd.tasks import arithmetic_examples
from opd.teacher.hf import HFTeacherScorer
from opd.teacher.served import ServedTeacherScorer, request_json
from opd.tokenization import render_prompt
from opd.train import train, train_offpolicy

SMALL = ["prompts_per_step=4", "completions_per_prompt=2", "max_new_tokens=24", "eval_size=8", "train_size=64",
         "progress=false", "log_samples=0", "lr=1e-3", "eval_every=0", "save_every=0"]
WARN = noise_floor.WARN_FRACTION


def student_samples(tokenizer, n_prompts: int = 8, g: int = 2, seed: int = 0, **sampling) -> list:
    """G samples of the bundled student for each of `n_prompts` arithmetic prompts (teacher prompt = prompt)."""
    prompts = [render_prompt(tokenizer, ex.prompt) for ex in arithmetic_examples(n_prompts, "test")]
    engine = HFRolloutEngine(load_model("tiny:student").eval(), tokenizer)
    return engine.generate(prompts, g, Sampling(**({"max_new_tokens": 24} | sampling)), seed=seed)


def hf_scorer(dtype: str = "float32") -> HFTeacherScorer:
    teacher = load_model("tiny:teacher", dtype=dtype)
    return HFTeacherScorer(teacher, vocab_size=len(load_tokenizer("tiny:teacher")))


def test_an_fp32_teacher_is_layout_invariant_and_does_not_warn(tokenizer):
    rollouts = student_samples(tokenizer)
    floor = noise_floor.teacher_noise_floor(hf_scorer(), rollouts, temperature=1.0)
    assert floor.rows == len(rollouts) and floor.tokens == sum(len(r.completion_ids) for r in rollouts)
    assert floor.noise_rms < 1e-4  # float32 rounding between batch shapes
    assert floor.signal > 0.1 and floor.abs_signal >= floor.signal  # the student is far from the teacher
    assert floor.ratio < 1e-3
    assert noise_floor.warning(floor) is None
    assert set(noise_floor.metrics(floor)) == {"preflight/teacher_noise_rms", "preflight/sampled_reverse_kl",
                                               "preflight/abs_log_ratio", "preflight/active_tokens",
                                               "preflight/noise_to_signal"}


def test_a_bf16_teacher_is_measurably_noisier_than_fp32(tokenizer):
    rollouts = student_samples(tokenizer)
    fp32 = noise_floor.teacher_noise_floor(hf_scorer(), rollouts, temperature=1.0)
    bf16 = noise_floor.teacher_noise_floor(hf_scorer("bfloat16"), rollouts, temperature=1.0)
    assert bf16.noise_rms > 1e-4 and bf16.noise_rms > 100 * fp32.noise_rms, (fp32, bf16)
    assert bf16.signal == pytest.approx(fp32.signal, abs=0.05)  # the same samples, the same signal
    assert noise_floor.warning(bf16) is None  # measured 0.3% of the signal on the tiny pair: below 10%


def test_the_padded_layout_is_undone_so_scores_stay_with_their_rollouts(tokenizer, teacher):
    scorer = HFTeacherScorer(teacher, vocab_size=len(tokenizer), freeze_model=False)
    for sampling in ({}, {"min_new_tokens": 12, "max_new_tokens": 12}):  # varied lengths; all of one length
        rollouts = student_samples(tokenizer, n_prompts=5, g=2, seed=3, **sampling)
        order = noise_floor.padded_layout(rollouts)
        assert order[1:] == list(reversed(range(len(rollouts))))
        assert len(rollouts[order[0]].completion_ids) == max(len(r.completion_ids) for r in rollouts)
        alone, padded = noise_floor.layout_scores(scorer, rollouts, temperature=1.0)
        for r, a, b in zip(rollouts, alone, padded, strict=True):
            expected = scorer.score([r], 1.0)[0].logprobs_R
            assert a.numel() == b.numel() == len(r.completion_ids)
            torch.testing.assert_close(a, expected, rtol=0, atol=0)
            torch.testing.assert_close(b, expected, rtol=0, atol=1e-4)  # row i's scores, not its neighbour's


def test_a_served_teacher_that_templates_batched_requests_warns_with_both_numbers(tokenizer, caplog):
    rollouts = student_samples(tokenizer, n_prompts=4)
    with running("tiny:teacher", "--served-model-name", "tiny-teacher") as url:
        scorer = ServedTeacherScorer(url, "tiny-teacher")
        honest = noise_floor.teacher_noise_floor(scorer, rollouts, temperature=1.0)
        request_json(f"{url}/_fault", {"mode": "batch_template", "count": 10**6}, timeout_s=5, retries=0, backoff=0)
        with caplog.at_level(logging.WARNING, logger="opd.noise_floor"):
            floor = noise_floor.check(scorer, rollouts, temperature=1.0)
    assert honest.noise_rms < 1e-4 and noise_floor.warning(honest) is None  # scored per sequence: invariant
    assert floor.noise_rms > WARN * floor.signal > 0, floor
    assert floor.signal == pytest.approx(honest.signal, abs=1e-5)  # alone, the template is not applied
    [record] = [r for r in caplog.records if r.name == "opd.noise_floor"]
    text = record.getMessage()
    assert f"{floor.noise_rms:.4f}" in text and f"{floor.signal:.4f}" in text and "teacher_dtype=float32" in text
    assert "\n" not in text


def test_opd_train_checks_its_first_batch_and_trains_exactly_as_without_the_check(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="opd.noise_floor"):
        on = train(load_config(None, [*SMALL, "steps=2", f"out_dir={tmp_path / 'on'}"]))
    off = train(load_config(None, [*SMALL, "steps=2", f"out_dir={tmp_path / 'off'}", "preflight_noise=false"]))
    with_check, without = read_metrics(on), read_metrics(off)
    first = with_check[0]
    assert first["preflight/teacher_noise_rms"] < 1e-4 and first["preflight/noise_to_signal"] < 1e-3
    assert first["preflight/active_tokens"] == with_check[1]["train/active_tokens"]  # the first step's batch...
    assert first["preflight/sampled_reverse_kl"] == pytest.approx(with_check[1]["opd/sampled_reverse_kl"], abs=1e-5)
    assert not any(k.startswith("preflight/") for r in without for k in r)
    for a, b in zip(with_check, without, strict=True):  # ...and the run samples and trains as it would without it
        assert {k: v for k, v in a.items() if not k.startswith(("perf/", "preflight/"))} == \
               {k: v for k, v in b.items() if not k.startswith("perf/")}
    weights_on, weights_off = (load_model(str(run / "final")).state_dict() for run in (on, off))
    assert all(torch.equal(v, weights_off[k]) for k, v in weights_on.items())
    assert any("teacher noise floor:" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("run", ["offpolicy", "grpo", "resume"])
def test_no_check_where_no_scoring_pass_exists_or_the_run_resumes(tmp_path, run):
    out = [f"out_dir={tmp_path / run}"]
    if run == "offpolicy":  # the teacher's samples carry their own logprobs: nothing is scored
        records = read_metrics(train_offpolicy(load_config(None, [*SMALL, "steps=1", *out])))
    elif run == "grpo":  # teacher_backend=none: no teacher
        records = read_metrics(train(load_config(None, [*SMALL, "steps=1", "teacher_backend=none", "task_reward=true",
                                                        "kl_coef=0", *out])))
    else:  # checked when the run started; a resumed run does not log step 0 again
        train(load_config(None, [*SMALL, "steps=1", "preflight_noise=false", *out]))
        records = read_metrics(train(load_config(None, [*SMALL, "steps=2", "resume=true", *out])))
    assert [r["step"] for r in records][:2] == [0, 1]
    assert not any(k.startswith("preflight/") for r in records for k in r)
    assert all(math.isfinite(v) for r in records for v in r.values())


def test_opd_eval_reports_the_noise_floor_of_its_own_samples(tmp_path, capsys):
    from opd.cli import main

    report = tmp_path / "report.json"
    assert main(["eval", "--n", "6", "--max-new-tokens", "12", "--samples", "0", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "teacher's noise floor" in out and "teacher noise, RMS (nats/token)" in out
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["preflight/teacher_noise_rms"] < 1e-4
    assert metrics["preflight/active_tokens"] == metrics["eval/active_tokens"]  # the report's samples, scored again
    assert metrics["preflight/sampled_reverse_kl"] == pytest.approx(metrics["eval/sampled_reverse_kl"], abs=1e-5)
