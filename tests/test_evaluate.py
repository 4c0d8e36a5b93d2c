import copy
import json
import math

import pytest
import torch

from opd.evaluate import Evaluator, final_answer_span, trace_gap
from opd.tasks import arithmetic_examples


@pytest.mark.parametrize(("text", "answer"), [
    ("33-85=-52\n-52+40=-12\nFinal: -12", "-12"),  # 'Ġ-' merges the space with the answer's sign
    ("12+3=15\nFinal: 15", "15"),
    ("Final: 7\n\n", "7"),
    ("Final: 3\nFinal: 1,234.", "1,234."),  # the last Final: line; its whole answer text
    ("Final: $1,234.50", "$1,234.50"),  # 'Ġ$' merges the space with the currency sign
    ("Final:  -5\n", "-5"),  # two spaces: 'Ġ' then 'Ġ-'
    ("x\nFinal:15", "15"),  # no space at all
])
def test_final_answer_span_covers_exactly_the_answer_tokens(tokenizer, text, answer):
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    start, end = final_answer_span(tokenizer, ids)
    inside = tokenizer.decode(ids[start:end], skip_special_tokens=True)
    assert inside.strip() == answer  # no other token, no missing digit
    assert "Final" in tokenizer.decode(ids[:start]) and answer not in tokenizer.decode(ids[:start]).split("Final:")[-1]


def test_an_answer_that_tokenizes_differently_after_final_than_at_a_line_start(tokenizer):
    # "-12" opens line 2 as '-', '1', '2' but follows "Final:" as 'Ġ-', '1', '2'; the span holds the latter
    text = "5-17=-12\n-12+0=-12\nFinal: -12"
    ids = tokenizer.encode(text, add_special_tokens=False)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[tokens.index("Ċ") + 1] == "-" and tokens[-3:] == ["Ġ-", "1", "2"]
    start, end = final_answer_span(tokenizer, ids)
    assert (start, end) == (len(ids) - 3, len(ids))
    # a model may also generate the space and the sign as two tokens: the space is then not in the span
    space, minus = tokenizer.convert_tokens_to_ids(["Ġ", "-"])
    split_ids = ids[:-3] + [space, minus] + ids[-2:]
    assert tokenizer.decode(split_ids) == text
    assert final_answer_span(tokenizer, split_ids) == (len(split_ids) - 3, len(split_ids))


@torch.no_grad()
def test_final_answer_span_on_the_teachers_own_generated_traces(teacher, tokenizer):
    # real traces (ids as generated, not re-encoded text): the span decodes to the Final: line's answer
    from opd.rollout import Sampling
    from opd.rollout.hf import HFRolloutEngine
    from opd.tasks import extract_final_answer
    from opd.tokenization import render_prompt

    examples = arithmetic_examples(24, "test")
    prompts = [render_prompt(tokenizer, ex.prompt) for ex in examples]
    traces = HFRolloutEngine(teacher, tokenizer).generate(prompts, 1, Sampling(greedy=True, max_new_tokens=40), seed=0)
    negatives = 0
    for r in traces:
        start, end = final_answer_span(tokenizer, r.completion_ids)
        answer = tokenizer.decode(r.completion_ids[start:end], skip_special_tokens=True).strip()
        assert answer == extract_final_answer(tokenizer.decode(r.completion_ids, skip_special_tokens=True))
        assert not tokenizer.decode(r.completion_ids[start + 1:end]).startswith(answer)  # no token too many
        negatives += answer.startswith("-")
    assert negatives >= 2  # the 'Ġ-' case occurs in real traces


def test_final_answer_span_is_none_without_a_final_line(tokenizer):
    assert final_answer_span(tokenizer, tokenizer.encode("12+3=15\n", add_special_tokens=False)) is None
    assert final_answer_span(tokenizer, tokenizer.encode("Final: 3\nmore text", add_special_tokens=False)) is None


def test_trace_gap_is_token_weighted_per_span():
    # two traces: NLLs student [1, 2, 3] vs teacher [0, 0, 0] with answer span [2, 3); student [4] vs teacher [1], no span
    s = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0])]
    t = [torch.zeros(3), torch.tensor([1.0])]
    out = trace_gap(s, t, [(2, 3), None])
    assert out["eval/trace_gap"] == pytest.approx((1 + 2 + 3 + 4 - 1) / 4)  # 9 / 4 tokens
    assert out["eval/trace_gap_pre_final"] == pytest.approx((1 + 2) / 2)
    assert out["eval/trace_gap_final"] == pytest.approx(3.0)
    assert out["eval/trace_tokens_final"] == 1


def test_a_student_identical_to_the_teacher_has_zero_gap(teacher, student, tokenizer):
    evaluator = Evaluator(teacher, tokenizer, tokenizer, arithmetic_examples(8, "test"), temperature=1.0,
                          max_new_tokens=40)
    metrics = evaluator(copy.deepcopy(teacher))  # another object with the same weights, scored on its own
    for span in ("", "_pre_final", "_final"):
        assert metrics[f"eval/trace_tokens{span}"] > 0
        assert metrics[f"eval/trace_teacher_nll{span}"] > 0 or span == "_final"  # nothing trivially 0 on both sides
        assert metrics[f"eval/trace_gap{span}"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval/student_accuracy"] == metrics["eval/teacher_accuracy"]
    assert metrics["eval/sampled_reverse_kl"] == pytest.approx(0.0, abs=1e-4)  # p == q on every sampled token
    # the control: the bundled (weaker) student has a clear gap on the same traces
    other = evaluator(student.eval())
    assert other["eval/trace_gap"] > 0.1 and other["eval/sampled_reverse_kl"] > 0.1


def test_opd_eval_prints_the_full_report_and_writes_json(tmp_path, capsys):
    from opd.cli import main

    path = tmp_path / "report.json"
    assert main(["eval", "--n", "6", "--max-new-tokens", "40", "--temperature", "0.9", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for row in ("whole trace", "before the final answer", "final-answer span", "teacher, on its own prompt",
                "sampled reverse KL", "student perplexity", "teacher perplexity", "active tokens",
                "mean completion length", "truncated fraction"):
        assert row in out
    report = json.loads(path.read_text())
    assert report["n"] == 6 and report["temperature"] == 0.9 and report["task"] == "arithmetic"
    metrics = report["metrics"]
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["eval/trace_tokens"] >= metrics["eval/trace_tokens_pre_final"] + metrics["eval/trace_tokens_final"]
    assert metrics["eval/active_tokens"] == pytest.approx(6 * metrics["eval/mean_length"])
    assert metrics["eval/trace_gap"] > 0 and 0 <= metrics["eval/student_accuracy"] <= 1
    assert f"{metrics['eval/teacher_accuracy']:.1%}" in out and len(report["samples"]) == 6


def test_opd_eval_on_the_privileged_gsm8k_task(capsys):
    # the teacher's prompt holds the worked solution; a few tokens keep it fast
    from opd.cli import main

    assert main(["eval", "--task", "gsm8k_privileged", "--n", "2", "--max-new-tokens", "6", "--samples", "0"]) == 0
    out = capsys.readouterr().out
    assert "2 held-out gsm8k_privileged examples" in out and "whole trace" in out
