"""The long-horizon task (opd.tasks.automaton) and its bundled pair (opd.bundled.automaton)."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.bundled.automaton import MAX_NEW_TOKENS, STUDENT_NAME, TEACHER_NAME, automaton_examples
from opd.cli import main
from opd.config import TrainConfig
from opd.evaluate import greedy_accuracy
from opd.models import TINY_DIR
from opd.tasks import grade, load_task, task_rows
from opd.tasks.automaton import CELLS, STEPS, automaton_rows, solve, step
from opd.tokenization import encode_completion


def test_rule_30_by_hand():
    # next = left XOR (centre OR right), 0 past the edges. From a lone 1 at cell 3 of 7:
    # cell 2: 0 ^ (0|1) = 1; cell 3: 0 ^ (1|0) = 1; cell 4: 1 ^ (0|0) = 1; every other cell 0.
    assert step([0, 0, 0, 1, 0, 0, 0]) == [0, 0, 1, 1, 1, 0, 0]
    # and on: cell 1: 0 ^ (0|1) = 1; 2: 0 ^ (1|1) = 1; 3: 1 ^ (1|1) = 0; 4: 1 ^ (1|0) = 0; 5: 1 ^ (0|0) = 1
    assert step([0, 0, 1, 1, 1, 0, 0]) == [0, 1, 1, 0, 0, 1, 0]
    # the edges: cell 0 sees a 0 on its left, the last cell a 0 on its right
    assert step([1, 0, 0, 0]) == [1, 1, 0, 0]  # cell 0: 0 ^ (1|0) = 1, cell 1: 1 ^ (0|0) = 1
    assert step([0, 0, 0, 1]) == [0, 0, 1, 1]  # cell 2: 0 ^ (0|1) = 1, cell 3: 0 ^ (1|0) = 1


def test_solution_copies_the_start_then_writes_every_step_the_last_as_a_bracketed_final():
    solution, answer = solve("000001000000")
    lines = solution.split("\n")
    assert lines[0] == "Now: [000001000000]" and len(lines) == STEPS + 1
    assert lines[1] == "Then: [000011100000]" and lines[2] == "Then: [000110010000]"
    rows = [line.split("[")[1].rstrip("]") for line in lines]
    assert all(len(row) == CELLS and set(row) <= {"0", "1"} for row in rows)
    assert [step([int(c) for c in a]) == [int(c) for c in b] for a, b in zip(rows, rows[1:])] == [True] * STEPS
    assert lines[-1] == f"Final: [{rows[-1]}]" and answer == f"[{rows[-1]}]"
    # bracketed so the grader compares the row, not the number it spells: 0110 is not 110
    assert grade(solution, answer)
    assert grade("Final: 0110", "110") and not grade("Final: [0110]", "[110]")


def test_one_wrong_cell_changes_every_later_row():
    # rule 30 XORs in the left neighbour, so a flipped cell always flips the cell to its right one step
    # later: the error walks right one cell a step and every later row is wrong until it falls off the edge.
    start = [int(c) for c in "011010011010"]
    rows = [start]
    for _ in range(STEPS):
        rows.append(step(rows[-1]))
    for cell in range(CELLS - STEPS + 1):
        wrong = [*rows[1][:cell], 1 - rows[1][cell], *rows[1][cell + 1:]]
        later = [wrong]
        for _ in range(STEPS - 1):
            later.append(step(later[-1]))
        assert all(a != b for a, b in zip(later, rows[1:], strict=True)), cell


def test_splits_are_disjoint_deterministic_and_bounded():
    train, test = automaton_rows(3000, "train"), automaton_rows(400, "test")
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert automaton_rows(5, "test", seed=3) == automaton_rows(5, "test", seed=3)
    assert automaton_rows(5, "test", seed=3) != automaton_rows(5, "test", seed=4)
    with pytest.raises(ValueError, match=r"test split has \d+ distinct problems, asked for 5000; lower"):
        automaton_rows(5000, "test")


def test_task_is_a_config_choice_with_privileged_rows():
    config = TrainConfig(task="automaton", teacher="tiny:automaton_teacher", student="tiny:automaton_student")
    config.validate()  # the bundled pair's names resolve like tiny:teacher's
    examples = load_task("automaton", "test", 4)
    assert all(grade(ex.solution, ex.answer) and ex.prompt[0]["content"].startswith("Rule 30, 5 steps: ")
               for ex in examples)
    privileged = task_rows("automaton_privileged", "test", 2)
    assert examples[0].solution in privileged[0]["teacher_messages"][0]["content"]
    with pytest.raises(ValueError, match="'automaton'"):
        task_rows("automata", "test", 2)


def test_completions_are_long_with_one_token_layout_per_line(tokenizer):
    ids = encode_completion(tokenizer, automaton_examples(1, "test")[0].solution)
    assert len(ids) >= 80
    pieces = tokenizer.convert_ids_to_tokens(ids)
    # a line is label, ':', ' ', '[', 12 cells, ']', newline: 18 tokens for Now, Then and Final alike, so a
    # cell's parents are 19, 18 and 17 tokens back on every line (the last one has eos for its newline)
    width = CELLS + 6
    assert len(pieces) == width * (STEPS + 1)
    lines = [pieces[i:i + width] for i in range(0, len(pieces), width)]
    assert [line[0] for line in lines] == ["Now", *["Then"] * (STEPS - 1), "Final"]
    assert all(line[1:4] == [":", "Ġ", "["] and set(line[4:4 + CELLS]) <= {"0", "1"} and line[4 + CELLS] == "]"
               for line in lines)


def test_bundled_automaton_pair_scores_as_reported():
    # the committed weights reproduce the build's accuracies (greedy is deterministic) and the task's bands:
    # a teacher >= 90% right on held-out problems, a student <= 30%
    report = json.loads((TINY_DIR / "automaton_build_report.json").read_text())
    assert report[TEACHER_NAME]["held_out_accuracy"] >= 0.9 and report[STUDENT_NAME]["held_out_accuracy"] <= 0.3
    held_out = automaton_examples(report["n_eval"], "test", seed=report["seed"])
    tokenizer = AutoTokenizer.from_pretrained(TINY_DIR / TEACHER_NAME)
    for name in (TEACHER_NAME, STUDENT_NAME):
        model = AutoModelForCausalLM.from_pretrained(TINY_DIR / name)
        accuracy, _ = greedy_accuracy(model, tokenizer, held_out, MAX_NEW_TOKENS)
        assert accuracy == pytest.approx(report[name]["held_out_accuracy"], abs=0.02), name
    ceiling = report["student_sft_ceiling"]
    assert ceiling["best_accuracy"] >= ceiling["history"][0]["accuracy"]


def test_build_tiny_automaton_with_a_tiny_budget(tmp_path, capsys):
    assert main(["build-tiny-automaton", "--out", str(tmp_path), "--teacher-steps", "2", "--student-steps", "2",
                 "--ceiling-steps", "0", "--n-eval", "4"]) == 0
    report = json.loads((tmp_path / "automaton_build_report.json").read_text())
    assert report[TEACHER_NAME]["history"][0]["step"] == 2 and "student_sft_ceiling" not in report
    assert report["teacher_traces"]["n"] > 0
    for name in (TEACHER_NAME, STUDENT_NAME):
        assert (tmp_path / name / "model.safetensors").is_file()
    assert "automaton_teacher:" in capsys.readouterr().out
