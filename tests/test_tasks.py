import json

import pytest

from opd.tasks import arithmetic_examples, extract_final_answer, grade, gsm8k_examples, load_gsm8k, load_task, normalize_answer
from opd.tasks.arithmetic import _is_test_problem


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("12+3=15\nFinal: 15", "15"),
        ("Final: 1,234.", "1234"),  # thousands separator and trailing period
        ("Final: 3\nthinking again\nFinal: 4\n\n  \n", "4"),  # the last Final: line wins, blank lines skipped
        ("Final:   -12  ", "-12"),
        ("Final: 41.0", "41"),  # numeric equality
        ("Final: $1,000", "1000"),
    ],
)
def test_grader_accepts(completion, expected):
    assert grade(completion, expected)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("the answer is 15", "15"),  # no Final: line
        ("Final: 15\nbut wait, it is 16", "15"),  # the last non-empty line must be the Final: line
        ("Final: 14", "15"),
        ("Final:", "15"),
        ("", "15"),
    ],
)
def test_grader_rejects(completion, expected):
    assert not grade(completion, expected)


def test_extract_and_normalize_edge_cases():
    assert extract_final_answer("no answer here") is None
    assert extract_final_answer("Final: 1,234.") == "1234"
    assert extract_final_answer("Final: 3\nFinal: 4") == "4"
    assert normalize_answer("  12   apples. ") == "12 apples"
    assert normalize_answer("0.50") == "0.5"


def test_arithmetic_worked_solution_is_correct_and_splits_are_disjoint():
    train = arithmetic_examples(500, "train", seed=3)
    test = arithmetic_examples(200, "test", seed=3)
    assert not {ex.prompt[0]["content"] for ex in train} & {ex.prompt[0]["content"] for ex in test}
    assert all(_is_test_problem(ex.prompt[0]["content"]) for ex in test)
    for ex in train[:50]:
        assert grade(ex.solution, ex.answer)
        assert eval(ex.prompt[0]["content"]) == int(ex.answer)  # the problem text is plain Python arithmetic
        assert len(ex.solution.splitlines()) >= 2  # at least one worked step before the answer
    assert arithmetic_examples(20, "test", seed=3) == test[:20]  # deterministic in the seed


def test_gsm8k_reads_shared_data_with_privileged_teacher_prompt():
    examples = gsm8k_examples("train", n=5, privileged=True)
    ex = examples[0]
    assert ex.answer == "72"
    assert ex.privileged and "Privileged" in ex.teacher_prompt[0]["content"]
    assert "Privileged" not in ex.prompt[0]["content"] and ex.solution not in ex.prompt[0]["content"]
    assert ex.solution in ex.teacher_prompt[0]["content"]
    assert "<<" not in ex.solution and ex.solution.endswith("Final: 72")
    assert grade(ex.solution, ex.answer)
    assert not gsm8k_examples("train", n=1)[0].privileged
    assert len(load_task("gsm8k", "test", n=3)) == 3


def test_malformed_jsonl_reports_file_line_and_field(tmp_path):
    good = {"question": "q?", "answer": "a\n#### 3"}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"train.jsonl:3: not valid JSON"):
        load_gsm8k(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({"question": "q?"}) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl:2: missing or empty string field 'answer'"):
        load_gsm8k(path)
    path.write_text(json.dumps({"question": "q?", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=r":1: field 'answer' has no '#### <answer>' line"):
        load_gsm8k(path)
    with pytest.raises(FileNotFoundError, match="data_dir"):
        gsm8k_examples("train", data_dir=tmp_path / "missing")


@pytest.mark.parametrize(("line", "message"), [
    ('["q?", "a\\n#### 3"]', r"train.jsonl:3: expected a JSON object, got list"),
    ('{"question": 7, "answer": "a\\n#### 3"}', r"train.jsonl:3: missing or empty string field 'question'"),
    ('{"question": "q?", "answer": "  "}', r"train.jsonl:3: missing or empty string field 'answer'"),
    ('{"question": "q?", "answer": "a\\n#### 3"', r"train.jsonl:3: not valid JSON \(.* at column \d+\)"),
])
def test_a_bad_last_line_fails_the_whole_file_and_its_fix_loads_every_row(tmp_path, line, message):
    # two good rows, then the bad one: the error names file, line and field, and no examples come
    # back (all or nothing); with the line fixed (and a blank line, which is skipped) all rows load
    good = json.dumps({"question": "q?", "answer": "a\n#### 3"})
    (tmp_path / "train.jsonl").write_text(f"{good}\n{good}\n{line}\n")
    with pytest.raises(ValueError, match=message):
        gsm8k_examples("train", data_dir=tmp_path)
    (tmp_path / "train.jsonl").write_text(f"{good}\n{good}\n\n{good}\n")
    assert [ex.answer for ex in gsm8k_examples("train", data_dir=tmp_path)] == ["3", "3", "3"]
