"""A teacher that lives elsewhere (#18 item 7, #25 item 8): opd against a real HTTP server on 127.0.0.1.

The server (tests/fake_vllm_server.py) runs the bundled tiny teacher in a SUBPROCESS and answers in
vLLM 0.33's JSON, so these tests can check that the training process never holds the teacher's
weights. Faults: a late answer, a dropped connection, a wrong echo, a wrong model, a too-large top-k.
"""

import gc
import json

import pytest
import torch

from fake_vllm_server import running
from opd.config import load_config
from opd.evaluate import Evaluator
from opd.metrics import read_metrics
from opd.models import load_model, load_pair, load_tokenizer
from opd.tasks import load_task
from opd.teacher.hf import HFTeacherScorer
from opd.teacher.served import ServedTeacherScorer, request_json
from opd.train import train
from opd.types import Rollout

NAMES = ["tiny-teacher", "teacher-alias"]  # `--served-model-name tiny-teacher teacher-alias`
TEACHER_SHAPES = {(2048, 256), (768, 256), (256, 768)}  # the tiny teacher's embedding and MLP weights


@pytest.fixture(scope="module")
def server():
    """The fake `vllm serve tiny:teacher` in its own process, on a port the OS picked; stopped at the end."""
    with running("tiny:teacher", "--served-model-name", *NAMES, "--max-logprobs", "5", "--max-model-len", "512") as url:
        yield url


@pytest.fixture()
def url(server):
    fault(server, None, 0)  # every test starts from a well-behaved server
    return server


def fault(url: str, mode: str | None, count: int = 1, delay: float = 0.0) -> None:
    request_json(f"{url}/_fault", {"mode": mode, "count": count, "delay": delay}, timeout_s=5, retries=0, backoff=0)


def completions(url: str) -> int:
    return request_json(f"{url}/_stats", None, timeout_s=5, retries=0, backoff=0)["completions"]


def rollouts(tokenizer) -> list[Rollout]:
    prompts = [tokenizer("12+7=")["input_ids"], tokenizer("3*4=")["input_ids"]]
    return [Rollout(prompts[0], [50, 51, 52, 2], [-1.0] * 4, "stop", 0),
            Rollout(prompts[1], [60, 61], [-1.0] * 2, "length", 1, teacher_prompt_ids=prompts[1] + [9])]


def test_served_scores_equal_the_in_process_teachers_through_an_alias(url, teacher, tokenizer):
    # asked as the second name, answered as the first (vLLM's `model` field is always the first served name)
    scorer = ServedTeacherScorer(url, "teacher-alias", timeout_s=30, retries=0, batch_size=1)
    got = scorer.score(rollouts(tokenizer), temperature=1.0, topk=5)
    want = HFTeacherScorer(teacher).score(rollouts(tokenizer), temperature=1.0, topk=5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.logprobs_R, w.logprobs_R, atol=1e-4, rtol=0)
        assert torch.equal(g.topk_ids_R_K, w.topk_ids_R_K)
        torch.testing.assert_close(g.topk_logprobs_R_K, w.topk_logprobs_R_K, atol=1e-4, rtol=0)


def test_served_greedy_traces_are_the_in_process_teachers(url, teacher, tokenizer):
    prompts = [r.teacher_prompt_ids for r in rollouts(tokenizer)]
    got = ServedTeacherScorer(url, "tiny-teacher", timeout_s=30, retries=0).generate_greedy(prompts, 12)
    want = HFTeacherScorer(teacher, tokenizer=tokenizer).generate_greedy(prompts, 12)
    assert got == want and all(1 <= len(t) <= 12 for t in got)


def test_a_late_answer_and_a_dropped_connection_are_retried(url, tokenizer):
    scorer = ServedTeacherScorer(url, "tiny-teacher", timeout_s=1.0, retries=2, backoff=0.01)
    want = scorer.score(rollouts(tokenizer), 1.0)
    before = completions(url)
    fault(url, "late", count=1, delay=2.0)  # outlives the 1 s timeout once, then answers in time
    late = scorer.score(rollouts(tokenizer), 1.0)
    fault(url, "drop", count=1)  # hangs up without an answer once
    dropped = scorer.score(rollouts(tokenizer), 1.0)
    for a, b, c in zip(want, late, dropped, strict=True):
        assert torch.equal(a.logprobs_R, b.logprobs_R) and torch.equal(a.logprobs_R, c.logprobs_R)
    assert completions(url) - before == 4  # each fault cost exactly one extra attempt
    fault(url, "drop", count=3)  # more failures than retries: a clear error naming the URL
    with pytest.raises(RuntimeError, match=rf"{url}/v1/completions: no answer after 3 attempts"):
        scorer.score(rollouts(tokenizer), 1.0)


def test_a_wrong_echo_a_wrong_model_and_a_topk_above_max_logprobs_fail_with_the_fix(url, tokenizer):
    scorer = ServedTeacherScorer(url, "tiny-teacher", timeout_s=30, retries=0)
    fault(url, "bad_echo")
    with pytest.raises(ValueError, match="row 0: .* scored other tokens than were sent"):
        scorer.score(rollouts(tokenizer), 1.0)
    fault(url, "bad_echo")
    with pytest.raises(ValueError, match="row 0: .* scored other tokens than were sent"):
        scorer.generate_greedy([r.prompt_ids for r in rollouts(tokenizer)], 4)
    fault(url, "wrong_model")
    with pytest.raises(ValueError, match="answered for model 'someone-else'"):
        scorer.score(rollouts(tokenizer), 1.0)
    with pytest.raises(ValueError, match="refused prompt_logprobs=6 .* --max-logprobs 6"):
        scorer.score(rollouts(tokenizer), 1.0, topk=6)  # the server was started with --max-logprobs 5
    with pytest.raises(ValueError, match="does not serve 'other'.*teacher_model_name"):
        ServedTeacherScorer(url, "other", timeout_s=30, retries=0).score(rollouts(tokenizer), 1.0)
    with pytest.raises(ValueError, match="batch_size <= 1024"):
        ServedTeacherScorer(url, "tiny-teacher", batch_size=1025)


def test_the_evaluator_through_a_served_teacher_equals_the_in_process_one(url, teacher, tokenizer):
    examples = load_task("arithmetic", "test", 4, 0, None)
    served = ServedTeacherScorer(url, "tiny-teacher", timeout_s=30, retries=0)
    student = load_model("tiny:student").eval()
    got = Evaluator(served, tokenizer, tokenizer, examples, temperature=1.0, max_new_tokens=10)(student)
    want = Evaluator(teacher, tokenizer, tokenizer, examples, temperature=1.0, max_new_tokens=10)(student)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, abs=1e-4), key
    assert got["eval/trace_tokens"] > 0


def teacher_free_overrides(url: str, tmp_path) -> list[str]:
    return ["teacher_backend=served", f"teacher_url={url}", "teacher_model_name=teacher-alias", "steps=3",
            "prompts_per_step=2", "completions_per_prompt=2", "max_new_tokens=8", "train_size=16", "eval_size=3",
            "eval_every=0", "save_every=0", "micro_batch_size=8", "progress=false", f"out_dir={tmp_path / 'run'}"]


def teacher_shaped_modules() -> set[int]:
    gc.collect()
    return {id(m) for m in gc.get_objects() if isinstance(m, torch.nn.Module)
            and any(tuple(p.shape) in TEACHER_SHAPES for p in m.parameters(recurse=False))}


def test_served_teacher_trains_3_steps_and_evaluates_without_its_weights(url, tmp_path):
    seen = []  # the shape of every parameter any nn.Module registers in this process during the run
    hook = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, param: seen.append(tuple(param.shape)) if param is not None else None)
    before, already_alive = completions(url), teacher_shaped_modules()  # e.g. the session `teacher` fixture's
    try:
        config = load_config(None, teacher_free_overrides(url, tmp_path))
        teacher, *_ = load_pair(config)
        assert not isinstance(teacher, torch.nn.Module) and teacher.vocab_size == 2048  # its config only
        run_dir = train(config)
        alive_after = teacher_shaped_modules()
    finally:
        hook.remove()
    assert (2048, 128) in seen  # the hook does see models load: the student's embedding
    assert not TEACHER_SHAPES & set(seen), "a teacher-shaped parameter was created in the training process"
    assert alive_after <= already_alive, "the run left a teacher-shaped nn.Module alive"
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all("eval/trace_gap" in records[s] and "eval/sampled_reverse_kl" in records[s] for s in (0, 3))
    assert all(r["train/active_tokens"] > 0 and "opd/sampled_reverse_kl" in r for r in records[1:])
    # step-0 eval (greedy traces, their scores, sampled scores), 3 scoring steps, final eval (sampled scores)
    assert completions(url) - before >= 3 + 3 + 1
    assert (run_dir / "final" / "config.json").is_file()


def test_served_teacher_config_is_checked_before_anything_loads(tmp_path):
    base = ["teacher_backend=served", "teacher_url=http://127.0.0.1:9"]
    with pytest.raises(ValueError, match="teacher_backend=served scores at temperature 1 only"):
        load_config(None, base + ["temperature=0.7"])
    with pytest.raises(ValueError, match="loss_temperature=0.5"):
        load_config(None, base + ["loss=topk_kl", "loss_temperature=0.5"])
    assert load_config(None, base + ["loss_temperature=0.5"]).loss_temperature == 0.5  # unused by reverse_kl
    with pytest.raises(ValueError, match="teacher_timeout_s must be > 0"):
        load_config(None, base + ["teacher_timeout_s=0"])


def test_load_pair_loads_the_teacher_in_process_only_for_hf(tmp_path):
    teacher, *_ = load_pair(load_config(None, []))
    assert isinstance(teacher, torch.nn.Module) and not teacher.training
    teacher, student, tokenizer, teacher_tokenizer = load_pair(load_config(None, ["teacher_backend=vllm"]))
    assert not isinstance(teacher, torch.nn.Module) and teacher.name_or_path.endswith("tiny/teacher")
    assert len(teacher_tokenizer) == len(load_tokenizer("tiny:teacher"))


def test_opd_eval_against_a_served_teacher(url, capsys):
    from opd.cli import main

    assert main(["eval", "--teacher-url", url, "--teacher-model-name", "tiny-teacher", "--n", "3",
                 "--max-new-tokens", "6", "--samples", "0"]) == 0
    assert "teacher-trace gap" in capsys.readouterr().out


def test_a_remote_teachers_config_is_checked_against_its_tokenizer():
    from transformers import AutoConfig

    from opd.models import resolve
    from opd.tokenization import check_embedding_covers_tokenizer

    config, tokenizer = AutoConfig.from_pretrained(resolve("tiny:teacher")), load_tokenizer("tiny:teacher")
    check_embedding_covers_tokenizer(config, tokenizer, "teacher")  # 2048 rows for 2048 tokens
    config.vocab_size = len(tokenizer) - 1
    with pytest.raises(ValueError, match="teacher: the model has 2047 output rows but its tokenizer has 2048"):
        check_embedding_covers_tokenizer(config, tokenizer, "teacher")


def test_one_teacher_served_and_one_in_process_in_one_run(url, tmp_path):
    # arith rows go to the served tiny:teacher (its weights never load here), gsm8k rows to tiny:gsm8k in-process
    rows = [{"prompt": p, "teacher": t} for p, t in (("12+7", "arith"), ("30-4", "arith"), ("6+5+1", "arith"),
                                                     ("Tom has 3 apples and buys 4 more. How many?", "gsm8k"),
                                                     ("A box holds 5 pens. How many in 2 boxes?", "gsm8k"))]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    hook = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, param: seen.append(tuple(param.shape)) if param is not None else None)
    before = completions(url)
    try:
        run_dir = train(load_config(None, [
            f"data={tmp_path / 'rows.jsonl'}", "eval_fraction=0", "eval_size=5", "teachers.arith.path=tiny:teacher",
            "teachers.arith.backend=served", f"teachers.arith.url={url}", "teachers.arith.model_name=tiny-teacher",
            "teachers.gsm8k.path=tiny:gsm8k", "steps=2", "prompts_per_step=5", "completions_per_prompt=2",
            "max_new_tokens=6", "eval_every=0", "save_every=0", "progress=false", "device=cpu",
            f"out_dir={tmp_path / 'run'}"]))
    finally:
        hook.remove()
    assert not TEACHER_SHAPES & set(seen), "the served teacher's weights were created in the training process"
    records = read_metrics(run_dir)
    assert all(r["opd/arith/active_tokens"] > 0 and r["opd/gsm8k/active_tokens"] > 0 for r in records[1:])
    assert all(f"eval/{name}/trace_gap" in records[-1] for name in ("arith", "gsm8k"))
    assert completions(url) - before >= 2 + 3  # 2 scoring steps; step-0 eval: traces, their scores, samples
