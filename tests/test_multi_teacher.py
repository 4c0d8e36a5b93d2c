"""Several teachers in one run (#22): routing by a row's column, one batch from several scorers, per-teacher
metrics, the teacher manifest on resume. Real tiny models: tiny:teacher (arithmetic) and tiny:gsm8k share
the bundled tokenizer, so one student learns from both."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

import opd.train
from opd.batch import collate
from opd.config import load_config
from opd.data import load_data
from opd.metrics import read_metrics
from opd.models import TINY_DIR, load_model, load_models, load_teachers
from opd.objectives import micro_loss, teacher_scores
from opd.rollout import Sampling
from opd.rollout.hf import HFRolloutEngine
from opd.sampler import make_sampler
from opd.teacher import TeacherScores
from opd.teacher.hf import HFTeacherScorer
from opd.teacher.routed import RoutedScorer, ShareWatch, teacher_metrics
from opd.teachers import mixed_prompts
from opd.tokenization import pad_id, render_prompt
from opd.train import train
from opd.types import Rollout

ARITH = [{"prompt": p, "answer": a, "teacher": "arith"} for p, a in (("12+7", "19"), ("30-4", "26"), ("6+5+1", "12"))]
GSM = [{"prompt": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "7",
        "teacher": "gsm8k"},
       {"prompt": "A box holds 5 pens. How many pens are in 2 boxes?", "answer": "10", "teacher": "gsm8k"}]
TWO = ["teachers.arith.path=tiny:teacher", "teachers.gsm8k.path=tiny:gsm8k"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def small(tmp_path, *extra) -> list[str]:
    return [f"data={write_rows(tmp_path / 'rows.jsonl', ARITH + GSM)}", "eval_fraction=0", "eval_size=5", *TWO,
            "prompts_per_step=5", "completions_per_prompt=2", "max_new_tokens=8", "micro_batch_size=4",
            "device=cpu", "progress=false", "eval_every=0", "save_every=0", f"out_dir={tmp_path / 'run'}", *extra]


def test_rows_reach_the_teacher_their_column_names_and_each_is_scored_by_it(tmp_path):
    rows = ARITH + GSM + [{"prompt": "2+2", "answer": "4"}]  # no route: default_teacher
    config = load_config(None, small(tmp_path, f"data={write_rows(tmp_path / 'r.jsonl', rows)}", "prompts_per_step=6",
                                     "default_teacher=gsm8k"))
    data = load_data(config)
    teachers, student, tokenizer = load_models(config)
    rollouts = make_sampler(config, data, teachers, student, tokenizer).sample(1)
    by_prompt = {tuple(render_prompt(tokenizer, data.train[i].prompt)): data.train[i] for i in range(len(data.train))}
    want = {ex.id: ex.route or "gsm8k" for ex in by_prompt.values()}
    assert {r.teacher for r in rollouts} == {"arith", "gsm8k"}
    assert all(r.teacher == want[by_prompt[tuple(r.prompt_ids)].id] for r in rollouts)
    scorers = {name: HFTeacherScorer(teachers.models[name], vocab_size=len(tokenizer)) for name in teachers.names}
    routed = RoutedScorer(scorers).score(rollouts, 1.0, topk=3)
    for r, got in zip(rollouts, routed, strict=True):
        alone = scorers[r.teacher].score([r], 1.0, topk=3)[0]
        torch.testing.assert_close(got.logprobs_R, alone.logprobs_R, rtol=1e-5, atol=1e-5)  # padding: summation order
        assert torch.equal(got.topk_ids_R_K, alone.topk_ids_R_K)
    assert teachers.models["arith"] is not teachers.models["gsm8k"]


@pytest.mark.parametrize("rows, extra, match", [
    (ARITH + [{"prompt": "1+1", "teacher": "code"}], [], r"line 4: teacher 'code' is not one of the teachers"),
    (ARITH + [{"prompt": "1+1"}], [], r"line 4: the row names no teacher .* set default_teacher="),
])
def test_an_unknown_route_or_a_row_without_one_is_a_data_error_before_any_model_loads(tmp_path, monkeypatch, rows,
                                                                                    extra, match):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(opd.train, "load_models", refuse)
    config = load_config(None, small(tmp_path, f"data={write_rows(tmp_path / 'bad.jsonl', rows)}", *extra))
    with pytest.raises(ValueError, match=match):
        train(config)
    assert not (tmp_path / "run").exists()  # nothing written either


@pytest.mark.parametrize("overrides, match", [
    (["teachers.arith.pth=tiny:teacher"], r"teachers.arith.pth is not a teacher setting; accepted: path"),
    (["teachers.arith.path=/nowhere"], r"teachers.arith.path='/nowhere' is not a model folder"),
    (TWO + ["teachers.arith.temperature=0.7"], r"teachers.arith.temperature=0.7 differs from temperature=1.0"),
    (TWO + ["teachers.arith.kl_coef=0.5", "loss=topk_kl"], r"teachers.arith.kl_coef weighs the reverse-KL"),
    (TWO + ["teacher_mix.code=1"], r"teacher_mix.code: no such teacher"),
    (TWO + ["default_teacher=code"], r"default_teacher='code' is not in teachers"),
    (TWO + ["teachers.arith.backend=served"], r"teachers.arith.url is needed exactly when"),
    (TWO + ["loss=cross_entropy"], r"off-policy distillation \(loss=cross_entropy\) samples from one teacher"),
    (["teacher_mix.arith=1"], r"teacher_mix only acts with several teachers"),
])
def test_a_bad_teacher_setting_names_its_key_and_the_fix(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_a_teacher_named_twice_is_loaded_once():
    config = load_config(None, TWO + ["teachers.again.path=tiny:teacher", "teachers.bf16.path=tiny:teacher",
                                      "teachers.bf16.dtype=bfloat16", "device=cpu"])
    teachers = load_teachers(config)
    assert teachers.models["again"] is teachers.models["arith"]
    assert teachers.models["bf16"] is not teachers.models["arith"]  # another dtype is another copy
    assert next(teachers.models["bf16"].parameters()).dtype == torch.bfloat16


def mixed_rollouts(student, tokenizer) -> list[Rollout]:
    """Real student samples of 4 prompts, G = 2, the first two prompts routed to arith, the others to gsm8k."""
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in (ARITH[:2] + GSM)]
    sampled = HFRolloutEngine(student, tokenizer).generate(prompts, 2, Sampling(max_new_tokens=10), seed=3)
    return [Rollout(r.prompt_ids, r.completion_ids, r.sampler_logprobs, r.finish_reason, r.prompt_index,
                    teacher="arith" if r.prompt_index < 2 else "gsm8k") for r in sampled]


def by_hand(model, rollout: Rollout, temperature: float, vocab: int, topk: int) -> TeacherScores:
    """One teacher's plain forward over one rollout: logits at its completion targets, over the tokenizer's ids."""
    ids = torch.tensor([rollout.teacher_prompt_ids + rollout.completion_ids])
    P, R = len(rollout.teacher_prompt_ids), len(rollout.completion_ids)
    with torch.no_grad():
        logits_R_V = model(input_ids=ids).logits[0, P - 1:P - 1 + R, :vocab].float()
    logp_R_V = torch.log_softmax(logits_R_V / temperature, dim=-1)
    top = logp_R_V.topk(topk, dim=-1)
    return TeacherScores(logp_R_V.gather(-1, torch.tensor(rollout.completion_ids)[:, None])[:, 0], top.indices,
                         top.values, logits_R_V)


@pytest.mark.parametrize("loss", ["reverse_kl", "topk_kl", "jsd"])
def test_a_two_teacher_batch_has_the_loss_and_gradient_of_each_row_scored_alone_and_collated_by_hand(
        student, tokenizer, loss):
    config = load_config(None, TWO + [f"loss={loss}", "topk=5", "micro_batch_size=3", "device=cpu"])
    models = {"arith": load_model("tiny:teacher").eval(), "gsm8k": load_model("tiny:gsm8k").eval()}
    rollouts = mixed_rollouts(student, tokenizer)
    scorer = RoutedScorer({name: HFTeacherScorer(m, vocab_size=len(tokenizer)) for name, m in models.items()})
    assert scorer.head is None  # several heads: full-vocabulary scores come as logits, plain data
    routed = collate(rollouts, teacher_scores(scorer, rollouts, config), pad_id(tokenizer))
    hand = collate(rollouts, [by_hand(models[r.teacher], r, 1.0, len(tokenizer), 5) for r in rollouts],
                   pad_id(tokenizer))
    grads = []
    for batch, rows in ((routed, [slice(0, None)]), (hand, [slice(i, i + 1) for i in range(len(rollouts))])):
        student.zero_grad()
        total = 0.0
        for row in rows:  # the hand batch one row at a time, each divided by the step-global token count
            loss_value, _ = micro_loss(student, batch.select(row), config, routed.num_tokens, len(tokenizer))
            loss_value.backward()
            total += loss_value.item()
        grads.append((total, torch.cat([p.grad.flatten() for p in student.parameters()])))
    (routed_loss, routed_grad), (hand_loss, hand_grad) = grads
    assert routed_loss == pytest.approx(hand_loss, rel=1e-4, abs=1e-6)
    # one batch against one row at a time sums in another order: fp32 noise of ~1e-6 on elements near 0
    # (one of 688,768 missed atol=1e-6 by 1.4e-7 here), so atol is relative to the gradient's scale
    torch.testing.assert_close(routed_grad, hand_grad, rtol=1e-3, atol=1e-4 * hand_grad.abs().max().item())
    assert routed_grad.abs().sum() > 0


def test_a_teachers_kl_coef_weighs_only_its_rows(student, tokenizer):
    # gsm8k's kl_coef 0: its rows' advantage -0·(p - q) is 0, exactly as if its teacher agreed with every sample
    config = load_config(None, TWO + ["teachers.gsm8k.kl_coef=0", "device=cpu"])
    teachers = load_teachers(config)
    rollouts = mixed_rollouts(student, tokenizer)
    scores = RoutedScorer({n: HFTeacherScorer(m) for n, m in teachers.models.items()}).score(rollouts, 1.0)
    weighted = collate(rollouts, scores, pad_id(tokenizer), kl_coef_B=opd.train.kl_coefs(rollouts, teachers))
    agreeing = [s if r.teacher == "arith" else TeacherScores(torch.tensor(r.sampler_logprobs))
                for r, s in zip(rollouts, scores, strict=True)]
    unweighted = collate(rollouts, agreeing, pad_id(tokenizer))
    assert weighted.kl_coef_B.tolist() == [1.0] * 4 + [0.0] * 4
    values = []
    for batch in (weighted, unweighted):
        student.zero_grad()
        loss_value, _ = micro_loss(student, batch, config, batch.num_tokens, len(tokenizer))
        loss_value.backward()
        values.append((loss_value.item(), torch.cat([p.grad.flatten() for p in student.parameters()])))
    assert values[0][0] == pytest.approx(values[1][0], abs=1e-6)
    torch.testing.assert_close(values[0][1], values[1][1], rtol=1e-5, atol=1e-7)


def test_per_teacher_metrics_sum_to_the_steps_totals_and_evaluation_is_per_teacher(tmp_path):
    run = train(load_config(None, small(tmp_path, "steps=2", "loss=topk_kl", "topk=5", "reward=final_answer")))
    records = read_metrics(run)
    for r in records[1:]:
        tokens = {name: r[f"opd/{name}/active_tokens"] for name in ("arith", "gsm8k")}
        assert sum(tokens.values()) == r["train/active_tokens"] and min(tokens.values()) > 0
        assert r["opd/arith/token_fraction"] + r["opd/gsm8k/token_fraction"] == pytest.approx(1.0)
        pooled = sum(r[f"opd/{n}/sampled_reverse_kl"] * tokens[n] for n in tokens) / r["train/active_tokens"]
        assert pooled == pytest.approx(r["gen/teacher_nll"] - r["gen/sampler_nll"], rel=1e-4)  # p - q
    last = records[-1]
    for name in ("arith", "gsm8k"):
        assert f"eval/{name}/trace_gap" in last and f"eval/{name}/sampled_reverse_kl" in last
    n = {name: last[f"eval/{name}/active_tokens"] for name in ("arith", "gsm8k")}
    assert last["eval/active_tokens"] == sum(n.values())
    assert last["eval/sampled_reverse_kl"] == pytest.approx(
        sum(last[f"eval/{k}/sampled_reverse_kl"] * v for k, v in n.items()) / sum(n.values()))
    assert last["eval/student_accuracy"] == pytest.approx(
        (3 * last["eval/arith/student_accuracy"] + 2 * last["eval/gsm8k/student_accuracy"]) / 5)


def test_resume_with_the_same_teachers_is_bit_exact_and_with_a_changed_one_is_refused(tmp_path):
    folder = tmp_path / "gsm_teacher"
    shutil.copytree(TINY_DIR / "gsm8k", folder)
    base = small(tmp_path, "teachers.gsm8k.path=" + str(folder), "steps=4", "save_every=2", "keep_last=0")
    whole = train(load_config(None, base + [f"out_dir={tmp_path / 'whole'}"]))
    assert json.loads((whole / "checkpoints" / "step_000002" / "teachers.json").read_text())["gsm8k"]["path"] == str(folder)
    part = tmp_path / "part"
    train(load_config(None, base + [f"out_dir={part}", "steps=2"]))
    train(load_config(None, base + [f"out_dir={part}", "resume=true"]))
    a, b = (load_file(str(r / "final" / "model.safetensors")) for r in (whole, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same path, another model behind it: the manifest's config hash differs
    config_json = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config_json | {"rope_theta": 12345.0}))
    with pytest.raises(ValueError, match=r"trained against other teachers: teacher 'gsm8k'.*resume_allow_changed=teachers"):
        train(load_config(None, base + [f"out_dir={part}", "resume=true", "steps=6"]))


def test_teacher_mix_sets_each_teachers_share_of_a_step():
    routes = ["a"] * 30 + ["b"] * 10
    chosen = mixed_prompts(routes, {"a": 1, "b": 3}, 8, seed=0, step=5)
    assert sorted(routes[i] for i in chosen) == ["a"] * 2 + ["b"] * 6 and len(set(chosen)) == 8
    assert chosen == mixed_prompts(routes, {"a": 1, "b": 3}, 8, seed=0, step=5)  # a pure function of (seed, step)
    assert chosen != mixed_prompts(routes, {"a": 1, "b": 3}, 8, seed=0, step=6)
    with pytest.raises(ValueError, match="no training row is routed to c"):
        mixed_prompts(routes, {"c": 1}, 4, seed=0, step=1)


def test_a_teacher_that_gets_almost_no_tokens_is_warned_about_after_10_steps(caplog):
    watch = ShareWatch(["big", "starved"])
    with caplog.at_level(logging.WARNING):
        for step in range(1, 10):
            watch(step, {"opd/big/token_fraction": 0.995, "opd/starved/token_fraction": 0.005})
        assert "starved" not in caplog.text
        watch(10, {"opd/big/token_fraction": 0.995, "opd/starved/token_fraction": 0.005})
        watch(11, {"opd/big/token_fraction": 0.995, "opd/starved/token_fraction": 0.005})
    assert caplog.text.count("teacher 'starved' got under 1% of the completion tokens for 10 steps") == 1
    assert "'big'" not in caplog.text


def test_teacher_metrics_of_a_step_with_a_teacher_absent():
    batch = collate([Rollout([1, 2], [5, 6], [-1.0, -2.0], "stop", 0, teacher="a")],
                    [TeacherScores(torch.tensor([-1.5, -2.5]))], 0)
    got = teacher_metrics(batch, [Rollout([1, 2], [5, 6], [-1.0, -2.0], "stop", 0, teacher="a")], ["a", "b"])
    # a: 2 tokens, (p - q) = (0.5 + 0.5) / 2; b: no rows, so no KL key (not a NaN, not a 0)
    assert got == {"opd/a/active_tokens": 2.0, "opd/a/token_fraction": 1.0, "opd/a/sampled_reverse_kl": 0.5,
                   "opd/b/active_tokens": 0.0, "opd/b/token_fraction": 0.0}
