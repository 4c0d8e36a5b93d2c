"""Your own prompts (#19): the row schema on the peers' files, validation, rewards, epochs, and runs on them."""

import json
import shutil
from pathlib import Path

import datasets
import pytest

from opd.cli import main
from opd.config import load_config
from opd.data import epoch_prompts, load_data, read_table, validate_table
from opd.metrics import read_metrics
from opd.rewards import boxed, exact, final_answer, last_boxed, make_reward, score
from opd.rows import Keys, example_from_row, row_id
from opd.tasks import Example
from opd.tasks.gsm8k import DEFAULT_DATA_DIR

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
SHAPES = ("trl_prompt.jsonl", "fireworks_messages.jsonl", "verl.parquet", "questions.jsonl", "questions.csv")
TINY = ["prompts_per_step=2", "completions_per_prompt=2", "max_new_tokens=8", "eval_size=2", "progress=false",
        "log_samples=0", "eval_every=0", "save_every=0"]
USER = [{"role": "user", "content": "66+15"}]


def rows_of(source, keys=Keys(), reward="none"):
    table = read_table(str(source))
    validate_table(table, keys, reward)
    return [example_from_row(table[i], keys) for i in range(len(table))]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- each accepted shape gives the hand-written examples ------------------------------------------------------

def hashed(prompt, teacher_prompt, answer, **fields):
    return Example(prompt, teacher_prompt, answer, id=row_id(prompt, teacher_prompt, answer), **fields)


EXPECTED_FIRST_ROW = {  # row 0 of each file in examples/data, written out by hand
    "trl_prompt.jsonl": hashed([{"role": "system", "content": "Work one step a line."}, *USER],
                               [{"role": "system", "content": "Work one step a line."}, *USER], ""),
    "fireworks_messages.jsonl": Example(USER, [{"role": "system", "content": "First step: 66+15=81"}, *USER], "81",
                                        solution="66+15=81\nFinal: 81", id="fw-0"),
    "verl.parquet": hashed(USER, USER, "81", route="arithmetic",
                           metadata={"ability": "math", "reward_model": {"style": "rule", "ground_truth": "81"},
                                     "extra_info": {"split": "train", "index": 0}}),
    "questions.jsonl": hashed(USER, USER, "81"),
    "questions.csv": hashed(USER, USER, "81"),
}


@pytest.mark.parametrize("name", SHAPES)
def test_each_accepted_shape_gives_the_hand_written_examples(name):
    examples = rows_of(EXAMPLES / name)
    assert len(examples) == 12
    assert examples[0] == EXPECTED_FIRST_ROW[name]
    # the same question in three files is the same row: content ids do not depend on the file or the position
    assert examples[0].id == rows_of(EXAMPLES / "questions.jsonl")[0].id or name in ("trl_prompt.jsonl",
                                                                                      "fireworks_messages.jsonl")


def test_json_array_save_to_disk_folder_and_the_hub_cache_read_the_same_rows(tmp_path, monkeypatch):
    expected = rows_of(EXAMPLES / "verl.parquet")
    rows = datasets.load_dataset("parquet", data_files=str(EXAMPLES / "verl.parquet"), split="train").to_list()
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert rows_of(tmp_path / "rows.json") == expected
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert rows_of(tmp_path / "saved") == expected
    # hf:NAME: a dataset prepared in the local cache, read offline (the layout `load_dataset` leaves there)
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    datasets.load_dataset("parquet", data_files=str(EXAMPLES / "verl.parquet"), split="train", cache_dir=str(cache))
    built = next(cache.glob("parquet/default-*/0.0.0/*/"))
    target = cache / "someone___arith" / "default" / "0.0.0" / built.name
    shutil.copytree(built, target)
    (target / "parquet-train.arrow").rename(target / "arith-train.arrow")
    assert rows_of("hf:someone/arith:train") == expected
    with pytest.raises(ValueError, match="'nobody/nothing' .* is not in the local Hugging Face cache"):
        read_table("hf:nobody/nothing")


def test_a_prompt_column_that_is_a_string_in_one_row_and_messages_in_another(tmp_path):
    # Arrow cannot type such a column; the file is then parsed by hand, with the same result
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "66+15", "answer": 81}, {"prompt": USER, "answer": "81"}])
    a, b = rows_of(path)
    assert a == b == hashed(USER, USER, "81")


def test_keys_override_the_column_names_and_system_prompt_fills_rows_without_one(tmp_path):
    path = write_jsonl(tmp_path / "own.jsonl", [
        {"instruction": "66+15", "hinted": "66+15 (hint: 81)", "meta": {"gold": 81}, "source": "x"},
        {"instruction": [{"role": "system", "content": "Be brief."}, *USER], "hinted": "66+15 (hint: 81)",
         "meta": {"gold": "81"}},
    ])
    keys = Keys(prompt="instruction", teacher_prompt="hinted", answer="meta.gold", system_prompt="You add numbers.")
    a, b = rows_of(path, keys, reward="exact")
    system = {"role": "system", "content": "You add numbers."}
    teacher = [system, {"role": "user", "content": "66+15 (hint: 81)"}]
    assert a == Example([system, *USER], teacher, "81", id=row_id([system, *USER], teacher, "81"),
                        metadata={"meta": {"gold": 81}, "source": "x"})
    assert b.prompt == [{"role": "system", "content": "Be brief."}, *USER]  # it had a system message: kept as is
    with pytest.raises(ValueError, match="field 'instruction' is missing"):
        rows_of(write_jsonl(tmp_path / "no.jsonl", [{"question": "1+1"}]), Keys(prompt="instruction"))


def test_a_trailing_assistant_turn_is_the_reference_and_a_gsm8k_answer_is_reduced():
    ex = example_from_row({"messages": [*USER, {"role": "assistant", "content": "81"}],
                           "answer": "66+15=81\n#### 81"})
    assert ex.prompt == USER and ex.solution == "81" and ex.answer == "81"
    ex = example_from_row({"question": "66+15", "answer": "66+15=<<66+15=81>>81\n#### 81"})
    assert ex.solution == "66+15=81\nFinal: 81" and ex.answer == "81"


# ---- validation before any model loads ----------------------------------------------------------------------------

BAD_ROWS = [  # (row, the field the error names, words of the fix)
    ({"prompt": 5}, "field 'prompt' is a int, not a string or a list of chat messages", ""),
    ({"prompt": "  "}, "field 'prompt' is an empty prompt", ""),
    ({"messages": [{"content": "hi"}]}, "field 'messages[0]' is not a message with 'role' and 'content'", "give"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "field 'messages[0].role' is 'bot', an unknown role", "use one of"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, "field 'messages[0].content' is a list, not a string", ""),
    ({"prompt": "66+15", "teacher_messages": [{"role": "user", "content": "66+15"}]},
     "field 'teacher_messages' equals the student prompt", "or drop it from the row"),
    ({"prompt": "What is 2+3?\nFinal: 5", "teacher_messages": [{"role": "user", "content": "What is 2+3?\nHint: add\n"
                                                                                           "Final: 5"}]},
     "field 'prompt' leaks the teacher prompt's answer line 'Final: 5'", ""),
    ({"prompt": "66+15", "answer": [81]}, "field 'answer' is a list, not a string or a number", ""),
]


@pytest.mark.parametrize(("bad", "message", "fix"), BAD_ROWS)
def test_each_bad_row_class_names_file_line_and_field_before_any_model_loads(tmp_path, capsys, bad, message, fix):
    good = {"prompt": "1+2"}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n" + json.dumps(good) + "\n")  # bad: line 3
    student = tmp_path / "no_weights"  # a model folder without weights: loading it would fail, so nothing loads
    shutil.copytree(Path(__file__).resolve().parent.parent / "opd" / "assets" / "tiny" / "student", student)
    (student / "model.safetensors").unlink()
    assert main(["train", f"data={path}", f"student={student}", f"out_dir={tmp_path / 'run'}", "steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: 1 bad row of 3, nothing loaded: line 3: {message}" in err and fix in err
    assert len(err.strip().splitlines()) == 1  # one line


def test_duplicated_ids_bad_json_and_many_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": 7, "prompt": "a"}, {"id": 8, "prompt": "b"},
                                                {"id": "7", "prompt": "c"}])
    with pytest.raises(ValueError, match=r"line 3: field 'id' '7' is duplicated; give each row its own id"):
        rows_of(path)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        rows_of(path)
    path = write_jsonl(tmp_path / "many.jsonl", [{"prompt": ""}] * 8 + [{"prompt": "ok"}])
    with pytest.raises(ValueError, match=r"8 bad rows of 9, nothing loaded: line 1: .*line 5: [^|]*\| and 3 more$"):
        rows_of(path)
    with pytest.raises(ValueError, match=r"no student prompt column; expected one of prompt, messages.*found text"):
        rows_of(write_jsonl(tmp_path / "text.jsonl", [{"text": "a"}]))
    with pytest.raises(ValueError, match=r"field 'expected_answer' is missing: reward=exact compares"):
        rows_of(EXAMPLES / "trl_prompt.jsonl", reward="exact")


def test_config_says_how_task_and_data_relate():
    with pytest.raises(ValueError, match="task='gsm8k' and data=.* both name the prompts"):
        load_config(None, ["task=gsm8k", "data=x.jsonl"])
    with pytest.raises(ValueError, match="prompt_key only act on your own prompts: set data=PATH"):
        load_config(None, ["prompt_key=q"])
    with pytest.raises(ValueError, match="reward='nope' is not accepted"):
        load_config(None, ["reward=nope"])
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_x'"):
        load_config(None, ["reward=no_such_module_x:f"])
    with pytest.raises(ValueError, match="task_reward=true .* set reward="):
        load_config(None, ["data=x.jsonl", "task_reward=true"])
    assert load_config(None, []).steps == 100 and load_config(None, ["epochs=2"]).steps is None


# ---- rewards ------------------------------------------------------------------------------------------------------

def test_the_built_in_rewards():
    ex = Example(USER, USER, "81")
    assert final_answer("66+15=81\nFinal: 81", ex) == 1.0 and final_answer("Final: 81\nmore", ex) == 0.0
    assert last_boxed(r"so \boxed{\frac{1}{2}} or \boxed{8{1}}") == "8{1}" and last_boxed(r"\boxed{81") is None
    assert boxed(r"66+15 is $\boxed{81}$.", ex) == 1.0 and boxed(r"\boxed{82}", ex) == 0.0
    assert boxed(r"\boxed{81.0}", ex) == 1.0  # normalized as the final_answer grader normalizes
    assert exact(" 81. ", ex) == 1.0 and exact("81 apples", ex) == 0.0
    assert make_reward("none") is None


def test_a_reward_that_raises_or_returns_junk_names_the_row_and_the_callable(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def bad(c, ex):\n    return ex.metadata['missing']\n"
                                            "def junk(c, ex):\n    return 'yes'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ex = Example(USER, USER, "81", id="row-9")
    with pytest.raises(ValueError, match=r"reward my_rewards:bad raised on row 'row-9': KeyError"):
        score(make_reward("my_rewards:bad"), "81", ex)
    with pytest.raises(ValueError, match=r"reward my_rewards:junk returned 'yes' on row 'row-9'"):
        score(make_reward("my_rewards:junk"), "81", ex)


def test_a_module_function_reward_is_called_and_its_value_reaches_task_reward(tmp_path, monkeypatch):
    # the reward reads a column of the row (kept as metadata): every row weighs 0.25, so task/reward is 0.25
    (tmp_path / "weights.py").write_text("def weight(completion, example):\n"
                                         "    assert isinstance(completion, str)\n"
                                         "    return example.metadata['weight']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_jsonl(tmp_path / "w.jsonl", [{"question": f"{i}+1", "weight": 0.25} for i in range(6)])
    assert main(["train", f"data={path}", "reward=weights:weight", "steps=2", f"out_dir={tmp_path / 'run'}",
                 *TINY]) == 0
    records = read_metrics(tmp_path / "run")
    assert [r["task/reward"] for r in records[1:]] == [0.25, 0.25]
    assert records[0]["eval/student_accuracy"] == records[0]["eval/teacher_accuracy"] == 0.25


def test_reward_none_logs_no_accuracy_and_no_reward_key(tmp_path):
    assert main(["train", f"data={EXAMPLES / 'trl_prompt.jsonl'}", "steps=2", f"out_dir={tmp_path / 'run'}",
                 *TINY]) == 0
    records = read_metrics(tmp_path / "run")
    assert not [k for r in records for k in r if "accuracy" in k or k == "task/reward"]
    assert "eval/trace_gap" in records[0] and "eval/sampled_reverse_kl" in records[-1]
    assert "eval/trace_gap_final" not in records[0]  # no reward, no final-answer span


# ---- epochs -------------------------------------------------------------------------------------------------------

def test_epochs_cover_every_row_exactly_once_per_epoch_and_are_a_pure_function_of_seed_and_step():
    n, k, epochs = 10, 3, 3
    steps = -(-n * epochs // k)  # ceil(rows · E / P) = 10
    walked = [i for step in range(1, steps + 1) for i in epoch_prompts(n, k, 0, step)]
    for e in range(epochs):
        assert sorted(walked[e * n:(e + 1) * n]) == list(range(n))
    assert walked[:n] != walked[n:2 * n]  # reshuffled each epoch
    assert epoch_prompts(n, k, 0, 4) == epoch_prompts(n, k, 0, 4) != epoch_prompts(n, k, 1, 4)


def test_a_run_resumed_mid_epoch_sees_the_same_prompts_as_an_uninterrupted_one(tmp_path, monkeypatch):
    # the reward logs each training row it grades; eval rows come from another file and are not logged
    (tmp_path / "seen.py").write_text("import os\n"
                                      "def log(completion, example):\n"
                                      "    if not example.id.startswith('ev'):\n"
                                      "        open(os.environ['SEEN'], 'a').write(example.id + '\\n')\n"
                                      "    return 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    train_rows = write_jsonl(tmp_path / "t.jsonl", [{"id": f"r{i}", "question": f"{i}+{i}"} for i in range(5)])
    eval_rows = write_jsonl(tmp_path / "e.jsonl", [{"id": "ev0", "question": "1+1"}])
    common = [f"data={train_rows}", f"eval_data={eval_rows}", "reward=seen:log", "epochs=2", "prompts_per_step=2",
              "completions_per_prompt=2", "max_new_tokens=8", "progress=false", "log_samples=0", "eval_every=0"]

    def seen(name, *extra):
        monkeypatch.setenv("SEEN", str(tmp_path / f"{name}.txt"))
        assert main(["train", *common, f"out_dir={tmp_path / name}", *extra]) == 0
        return (tmp_path / f"{name}.txt").read_text().split()

    whole = seen("whole", "save_every=0")
    assert len(read_metrics(tmp_path / "whole")) == 1 + 5  # steps = ceil(5 rows · 2 epochs / 2) = 5
    assert main(["validate", str(tmp_path / "whole")]) == 0  # the derived steps are read from its checkpoint
    first = whole[::2]  # two completions per prompt: each row is graded twice in a row
    assert sorted(first[:5]) == sorted(first[5:10]) == [f"r{i}" for i in range(5)]
    seen("split", "steps=2", "save_every=2")  # stops at prompt 4 of epoch 1
    split = seen("split", "resume=true", "save_every=0")
    assert split == whole


# ---- a 3-step run on each shape, and opd eval --data ---------------------------------------------------------------

@pytest.mark.parametrize("name", SHAPES)
def test_three_steps_of_opd_train_on_each_example_file(tmp_path, name, capsys):
    reward = [] if name == "trl_prompt.jsonl" else ["reward=final_answer"]
    assert main(["train", f"data={EXAMPLES / name}", "steps=3", f"out_dir={tmp_path / 'run'}", *TINY, *reward]) == 0
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1, 2, 3] and all(r["train/active_tokens"] > 0 for r in records[1:])
    assert ("task/reward" in records[1]) == bool(reward)


def test_opd_eval_on_a_data_file_prints_what_was_read_and_a_teacher_trace(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="opd.data")
    assert main(["eval", "--data", str(EXAMPLES / "fireworks_messages.jsonl"), "--reward", "final_answer", "--n", "3",
                 "--max-new-tokens", "6", "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 rows of" in out and "teacher traces cut off" in out and "teacher's trace (cut off at max_new_tokens)" in out
    assert "12 rows (the first 3 evaluated): 12 with teacher prompts, 12 with answers" in caplog.text
    assert main(["eval", "--data", "x.jsonl", "--task", "gsm8k"]) == 2


def test_gsm8k_ships_inside_the_package():
    assert DEFAULT_DATA_DIR == Path(__file__).resolve().parent.parent / "opd" / "assets" / "data" / "gsm8k"
    assert "MIT License" in (DEFAULT_DATA_DIR / "LICENSE").read_text()
    assert sum(1 for _ in (DEFAULT_DATA_DIR / "test.jsonl").open()) == 1319


def test_load_data_holds_out_by_a_hash_of_the_row(tmp_path):
    rows = [{"question": f"{i}+1"} for i in range(200)]
    config = load_config(None, [f"data={write_jsonl(tmp_path / 'a.jsonl', rows)}", "eval_size=200"])
    data = load_data(config)
    held = {ex.id for ex in data.eval}
    assert 5 < len(held) < 40 and len(data.train) + len(held) == 200 and not held & {ex.id for ex in data.train}
    shuffled = load_data(load_config(None, [f"data={write_jsonl(tmp_path / 'b.jsonl', rows[::-1])}", "eval_size=200"]))
    assert {ex.id for ex in shuffled.eval} == held  # the same rows, whatever their order


def test_truncated_teacher_traces_are_counted_and_get_no_final_answer_span(teacher, tokenizer):
    from opd.evaluate import Evaluator
    from opd.report import format_report
    from opd.tasks import arithmetic_examples

    examples = arithmetic_examples(4, "test")
    whole = Evaluator(teacher, tokenizer, tokenizer, examples, 1.0, max_new_tokens=40)(teacher)
    assert whole["eval/teacher_truncated"] == 0 and "eval/trace_gap_final" in whole
    cut = Evaluator(teacher, tokenizer, tokenizer, examples, 1.0, max_new_tokens=4)(teacher)
    assert cut["eval/teacher_truncated"] == 4 and "eval/trace_gap_final" not in cut
    assert "(cut off at max_new_tokens)" in cut["eval/samples"][0] and "teacher's trace" not in cut["eval/samples"][1]
    pure = Evaluator(teacher, tokenizer, tokenizer, examples, 1.0, max_new_tokens=40, reward=None)(teacher)
    pure.pop("eval/samples")
    assert not [k for k in pure if "accuracy" in k or "final" in k]
    assert "accuracy: none (reward=none" in format_report(pure)
