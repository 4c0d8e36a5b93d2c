"""Every validator rule (docs/design.md §5, issue #6) with a case that passes and one that fails."""

import json
import logging
from pathlib import Path

import pytest

from opd.cli import main
from opd.config import load_config
from opd.models import load_model, load_tokenizer
from opd.tasks import Example, gsm8k_examples
from opd.bundled.tiny import build_tokenizer
from opd.tokenization import check_embedding_covers_tokenizer, check_tokenizers_compatible
from opd.validate import chat_template_difference, validate_privileged, validate_run, validate_setup

Q = [{"role": "user", "content": "What is 2+3?"}]
T = [{"role": "user", "content": "What is 2+3?\n[Privileged solution, hidden from the student]\n2+3=5\nFinal: 5"}]
GOOD = Example(prompt=Q, teacher_prompt=T, answer="5", solution="2+3=5\nFinal: 5")


def msgs(text):
    return [{"role": "user", "content": text}]


# ---- privileged datasets -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("example", [
    GOOD,
    Example(Q, msgs("What is 2+3?\nHint: add the two numbers."), "5", ""),  # a hint, no stated answer
    Example(Q, msgs("What is 2+3?\nHint: 2+3=5"), "5", "2+3=5\nFinal: 5"),  # the solution is not in the teacher prompt
    # a solution line that restates the question is not a leak (GSM8K train row 551 does this)
    Example(msgs("She spent 6 hours hiking. How many hours?"), msgs("She spent 6 hours hiking. How many hours?\n"
            "She spent 6 hours hiking.\nFinal: 6"), "6", "She spent 6 hours hiking.\nFinal: 6"),
    Example(Q, msgs("What is 2+3?\n2+3=5\nFinal: 5.0"), "5", ""),  # answers compared after normalization
])
def test_privileged_examples_that_pass(example):
    validate_privileged([example])


def test_the_whole_privileged_gsm8k_data_passes_validation():
    validate_privileged(gsm8k_examples("train", privileged=True) + gsm8k_examples("test", privileged=True))


@pytest.mark.parametrize(("example", "message"), [
    (Example(msgs(""), T, "5", ""), "field 'prompt' is an empty prompt"),
    (Example(Q, msgs(" "), "5", ""), "field 'teacher_prompt' is an empty prompt"),
    (Example(Q, T, " ", "2+3=5\nFinal: 5"), "field 'answer' is empty"),
    (Example(Q, Q, "5", "2+3=5\nFinal: 5"), "field 'teacher_prompt' equals the student prompt.*task=gsm8k"),
    (Example(msgs("What is 2+3? 2+3=5\nFinal: 5"), T, "5", "2+3=5\nFinal: 5"),
     "field 'prompt' leaks the worked solution"),
    (Example(msgs(T[0]["content"] + "\nGo."), T, "5", ""), "field 'prompt' contains the whole teacher prompt"),
    (Example(msgs("What is 2+3? (Hint: carry nothing.)\nSolve."), msgs("What is 2+3?\nHint: carry nothing.\nSolve."),
             "5", ""), "field 'prompt' leaks the privileged text 'Hint: carry nothing.'"),
    (Example(msgs("What is 2+3?\nFinal: 5"), T, "5", ""),
     "field 'prompt' leaks the teacher prompt's answer line 'Final: 5'"),
    (Example(Q, T, "6", ""), "field 'teacher_prompt' states 'Final: 5', the expected answer is 6"),
    (Example(Q, msgs("What is 2+3?\nHint: add."), "5", "2+3=6\nFinal: 6"), "field 'solution' states Final: 6"),
])
def test_privileged_examples_that_fail_name_the_field(example, message):
    with pytest.raises(ValueError, match=message):
        validate_privileged([GOOD, example])  # the bad one is named by its index
    with pytest.raises(ValueError, match="example 1: "):
        validate_privileged([GOOD, example])


def test_training_a_privileged_task_validates_its_data_before_the_first_step(tmp_path, capsys):
    # the question of row 2 carries the answer line the privileged teacher prompt states: a leak
    rows = [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
            {"question": "What is 4+4?\nFinal: 8", "answer": "4+4=8\n#### 8"}]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "task=gsm8k_privileged", f"data_dir={tmp_path}", f"out_dir={tmp_path / 'run'}", "steps=1",
            "train_size=2", "eval_size=2", "progress=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err  # the rows are checked by opd.data before any model loads (#19)
    assert "task gsm8k_privileged (train): 1 bad row of 2" in err
    assert "row 1: field 'prompt' leaks the teacher prompt's answer line 'Final: 8'" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran


def test_validate_setup_checks_privileged_tasks_only_and_warns_once_about_templates(teacher, tokenizer, caplog):
    student = load_model("tiny:student")
    plain = [Example(Q, Q, "5", "2+3=5\nFinal: 5")]
    with caplog.at_level(logging.WARNING, logger="opd.validate"):
        validate_setup("arithmetic", plain, teacher, student, tokenizer, tokenizer)
        assert not caplog.records  # same template: nothing to say
        with pytest.raises(ValueError, match="equals the student prompt"):
            validate_setup("gsm8k_privileged", plain, teacher, student, tokenizer, tokenizer)
        validate_setup("gsm8k_privileged", [GOOD], teacher, student, tokenizer, tokenizer)
        other = load_tokenizer("tiny:teacher")
        other.chat_template = "{% for m in messages %}<|system|>{{ m['content'] }}{% endfor %}<|assistant|>"
        validate_setup("gsm8k_privileged", [GOOD, GOOD], teacher, student, other, tokenizer)
    assert len(caplog.records) == 1 and "the chat templates differ from token 0" in caplog.records[0].getMessage()


# ---- tokenizers and vocabularies -----------------------------------------------------------------------------------

def test_compatible_tokenizers_pass(tokenizer):
    check_tokenizers_compatible(tokenizer, tokenizer)
    # same corpus, smaller vocabulary: BPE merges come in the same order, so its ids are a prefix
    # of the student's; the student's extra ids are allowed (like a padded vocabulary)
    check_tokenizers_compatible(build_tokenizer(vocab_size=600), tokenizer)
    # a student that adds tokens above the teacher's ids
    extended = load_tokenizer("tiny:student")
    extended.add_tokens(["<|tool|>", "<|think|>"])
    assert len(extended) == len(tokenizer) + 2
    check_tokenizers_compatible(tokenizer, extended)


def test_a_tokenizer_with_another_vocabulary_is_rejected_naming_the_first_mismatching_token(tokenizer):
    other = build_tokenizer(vocab_size=600, corpus=["the cat sat on the mat"] * 50 + ["12+34=46"] * 50)
    first_bad = min((i, t) for t, i in other.get_vocab().items() if tokenizer.get_vocab().get(t) != i)
    pattern = r"teacher token '.+' \(id \d+\) is (id \d+ in|missing from) the student"
    with pytest.raises(ValueError, match=pattern) as err:
        check_tokenizers_compatible(other, tokenizer)
    assert f"{first_bad[1]!r} (id {first_bad[0]})" in str(err.value)


def test_a_teacher_token_the_student_lacks_is_rejected_naming_it(tokenizer):
    teacher = load_tokenizer("tiny:teacher")
    teacher.add_tokens(["<|teacher_only|>"])
    with pytest.raises(ValueError, match=rf"teacher token '<\|teacher_only\|>' \(id {len(tokenizer)}\) is missing "
                                         r"from the student vocab"):
        check_tokenizers_compatible(teacher, tokenizer)


def test_special_token_ids_must_agree(tokenizer):
    student = load_tokenizer("tiny:student")
    student.pad_token = student.eos_token  # the pad token is never read (masks come from lengths): fine (#18)
    check_tokenizers_compatible(tokenizer, student)
    student.bos_token = student.eos_token
    with pytest.raises(ValueError, match=rf"disagree on bos_token_id: teacher {tokenizer.bos_token_id} .*, "
                                         rf"student {student.eos_token_id} .*set the student's bos_token"):
        check_tokenizers_compatible(tokenizer, student)


def test_a_model_needs_an_output_row_for_every_token_and_may_have_more(tokenizer):
    model = load_model("tiny:student")
    check_embedding_covers_tokenizer(model, tokenizer, "student")
    model.resize_token_embeddings(len(tokenizer) + 64)  # padded: fine
    check_embedding_covers_tokenizer(model, tokenizer, "student")
    model.resize_token_embeddings(len(tokenizer) - 8)
    with pytest.raises(ValueError, match=r"student: the model has 2040 output rows but its tokenizer has 2048 tokens"):
        check_embedding_covers_tokenizer(model, tokenizer, "student")


def test_chat_template_difference_is_reported(tokenizer):
    assert chat_template_difference(tokenizer, tokenizer, Example(Q, T, "5", "")) is None
    other = load_tokenizer("tiny:teacher")
    other.chat_template = "{% for m in messages %}<|system|>{{ m['content'] }}{% endfor %}<|assistant|>"
    diff = chat_template_difference(other, tokenizer, Example(Q, T, "5", ""))
    assert diff is not None and "differ from token 0" in diff


# ---- config rules (docs/design.md §5): each failing value next to a passing one ----------------------------------------

@pytest.mark.parametrize(("bad", "good", "message"), [
    (["topk=0"], ["topk=1"], "topk must be >= 1"),
    (["kl_coef=-1"], ["kl_coef=0"], "kl_coef must be >= 0"),
    (["discount=-0.1"], ["discount=0.5"], "discount must be >= 0"),
    (["discount=1.0"], ["discount=0.99"], "discount must be in \\[0, 1\\)"),
    (["temperature=0"], ["temperature=0.01"], "temperature and loss_temperature must be > 0"),
    (["temperature=-1"], ["temperature=2"], "temperature and loss_temperature must be > 0"),
    (["loss_temperature=-0.5"], ["loss_temperature=0.5"], "must be > 0"),
    (["prompts_per_step=0"], ["prompts_per_step=1"], "prompts_per_step must be >= 1"),
    (["top_p=0"], ["top_p=0.5"], "top_p must be in"),
    (["jsd_beta=1.5"], ["jsd_beta=1.0"], "jsd_beta must be in \\[0, 1\\]"),
    (["opsm_delta=-1"], ["opsm_delta=0"], "opsm_delta must be >= 0"),
    (["task_reward=true", "completions_per_prompt=1"], ["task_reward=true", "completions_per_prompt=2"],
     "needs completions_per_prompt >= 2"),
    (["loss=jsd", "opsm_delta=0.1"], ["loss=reverse_kl", "opsm_delta=0.1"], "need loss=reverse_kl"),
    (["loss=jsd", "top_k=5"], ["loss=reverse_kl", "top_k=5"], "truncation is only supported with loss=reverse_kl"),
    (["teacher_backend=served"], ["teacher_backend=served", "teacher_url=http://h:8000"], "teacher_url is needed"),
    (["teacher_url=http://h:8000"], ["teacher_backend=hf"], "teacher_url is needed"),
    (["task=gsm8k", "data_dir=/nowhere"], ["task=gsm8k"], "has no train.jsonl"),
    (["student=/no/such/folder"], ["student=tiny:student"], "student='/no/such/folder' is not a model folder"),
    # pure OPD has no reference model: a reference-KL coefficient is not a key at all
    (["ref_kl_coef=0.1"], ["kl_coef=0.1"], "Key 'ref_kl_coef' not in 'TrainConfig'"),
])
def test_config_rules_name_the_field_and_the_fix(bad, good, message):
    load_config(None, good)
    with pytest.raises(ValueError, match=message):
        load_config(None, bad)


# ---- the run validator ---------------------------------------------------------------------------------------------

def write_run(path: Path, records: list[dict], final: bool = True, steps: int | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if final:
        (path / "final").mkdir(exist_ok=True)
        (path / "final" / "config.json").write_text("{}")
    if steps is not None:
        (path / "config.json").write_text(json.dumps({"steps": steps}))
    return path


RUN = [{"step": 0, "eval/student_accuracy": 0.2}, {"step": 1, "train/active_tokens": 10.0, "train/loss": 0.1},
       {"step": 2, "train/active_tokens": 12.0, "train/loss": 0.05, "eval/student_accuracy": 0.3}]


@pytest.mark.parametrize(("records", "final", "message"), [
    (RUN[:2], True, "expected 0..2 once each"),  # a step missing
    (RUN + [RUN[2]], True, "expected 0..2 once each"),  # a step twice
    ([{"step": 0, "train/lr": 1.0}, *RUN[1:]], True, "no step-0 evaluation"),
    ([RUN[0], {**RUN[1], "train/loss": float("nan")}, RUN[2]], True, r"step 1 has non-finite \['train/loss'\]"),
    ([RUN[0], {**RUN[1], "train/active_tokens": 0.0}, RUN[2]], True, "step 1 trained on no tokens"),
    ([RUN[0], {"step": 1, "train/loss": 0.1}, RUN[2]], True, "step 1 trained on no tokens"),
    (RUN, False, "no final student folder"),
])
def test_run_validator_rules(tmp_path, records, final, message):
    assert len(validate_run(write_run(tmp_path / "ok", RUN), 2)) == 3
    with pytest.raises(ValueError, match=message):
        validate_run(write_run(tmp_path / "bad", records, final), 2)


def test_opd_validate_prints_ok_or_the_error_with_exit_code_2(tmp_path, capsys):
    good = write_run(tmp_path / "good", RUN, steps=2)
    assert main(["validate", str(good)]) == 0  # steps from the run's config.json
    assert capsys.readouterr().out.startswith(f"OK: {good}")
    assert main(["validate", str(good), "--steps", "3"]) == 2
    assert "expected 0..3 once each" in capsys.readouterr().err
    bad = write_run(tmp_path / "bad", [RUN[0], {**RUN[1], "train/loss": float("inf")}, RUN[2]], steps=2)
    assert main(["validate", str(bad)]) == 2
    assert "step 1 has non-finite ['train/loss']" in capsys.readouterr().err
    assert main(["validate", str(write_run(tmp_path / "no_config", RUN))]) == 2
    assert "pass --steps N" in capsys.readouterr().err
