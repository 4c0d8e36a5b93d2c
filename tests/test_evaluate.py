import pytest
import torch

from opd.evaluate import Evaluator, final_answer_span, trace_gap
from opd.tasks import arithmetic_examples


@pytest.mark.parametrize(("text", "answer"), [
    ("33-85=-52\n-52+40=-12\nFinal: -12", "-12"),  # 'Ġ-' merges the space with the answer's sign
    ("12+3=15\nFinal: 15", "15"),
    ("Final: 7\n\n", "7"),
    ("Final: 3\nFinal: 1,234.", "1,234."),  # the last Final: line; its whole answer text
])
def test_final_answer_span_covers_exactly_the_answer_tokens(tokenizer, text, answer):
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    start, end = final_answer_span(tokenizer, ids)
    inside = tokenizer.decode(ids[start:end], skip_special_tokens=True)
    assert inside.strip() == answer  # no other token, no missing digit
    assert "Final" in tokenizer.decode(ids[:start]) and answer not in tokenizer.decode(ids[:start]).split("Final:")[-1]


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


def test_a_student_identical_to_the_teacher_has_zero_gap(teacher, tokenizer):
    evaluator = Evaluator(teacher, tokenizer, tokenizer, arithmetic_examples(8, "test"), temperature=1.0,
                          max_new_tokens=40)
    metrics = evaluator(teacher)
    for span in ("", "_pre_final", "_final"):
        assert metrics[f"eval/trace_tokens{span}"] > 0
        assert metrics[f"eval/trace_gap{span}"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval/student_accuracy"] == metrics["eval/teacher_accuracy"]
    assert metrics["eval/sampled_reverse_kl"] == pytest.approx(0.0, abs=1e-4)  # p == q on every sampled token
