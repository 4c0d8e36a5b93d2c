import json

import pytest

from opd.config import load_config
from opd.tasks import Example, gsm8k_examples
from opd.tiny import build_tokenizer
from opd.tokenization import check_tokenizers_compatible
from opd.validate import chat_template_difference, validate_privileged, validate_run

Q = [{"role": "user", "content": "What is 2+3?"}]
T = [{"role": "user", "content": "What is 2+3?\n[Privileged solution, hidden from the student]\n2+3=5\nFinal: 5"}]


def test_privileged_gsm8k_passes_validation():
    validate_privileged(gsm8k_examples("train", n=20, privileged=True))


@pytest.mark.parametrize(("example", "message"), [
    (Example(prompt=Q, teacher_prompt=Q, answer="5", solution="2+3=5\nFinal: 5"), "teacher prompt equals the student prompt"),
    (Example(prompt=[{"role": "user", "content": ""}], teacher_prompt=T, answer="5", solution=""), "empty student or teacher prompt"),
    (Example(prompt=Q, teacher_prompt=T, answer="", solution="2+3=5\nFinal: 5"), "no expected answer"),
    (Example(prompt=[{"role": "user", "content": "What is 2+3? 2+3=5\nFinal: 5"}], teacher_prompt=T, answer="5",
             solution="2+3=5\nFinal: 5"), "leaks the worked solution"),
    (Example(prompt=Q, teacher_prompt=T, answer="6", solution="2+3=5\nFinal: 5"), "states Final: 5, the expected answer is 6"),
])
def test_privileged_validator_rejects_with_the_reason(example, message):
    with pytest.raises(ValueError, match=message):
        validate_privileged([example])


def test_a_tokenizer_with_another_vocabulary_is_rejected_naming_the_token(tokenizer):
    validate = check_tokenizers_compatible
    validate(tokenizer, tokenizer)
    # same corpus, smaller vocabulary: BPE merges come in the same order, so its ids are a prefix
    # of the student's; the student's extra ids are allowed (like a padded vocabulary)
    validate(build_tokenizer(vocab_size=600), tokenizer)
    other = build_tokenizer(vocab_size=600, corpus=["the cat sat on the mat"] * 50 + ["12+34=46"] * 50)
    other_vocab = other.get_vocab()
    with pytest.raises(ValueError, match=r"teacher token '.+' \(id \d+\) is id") as err:
        validate(other, tokenizer)
    first_bad = min((i, t) for t, i in other_vocab.items() if tokenizer.get_vocab().get(t) != i)
    assert repr(first_bad[1]) in str(err.value)


def test_chat_template_difference_is_reported(tokenizer):
    assert chat_template_difference(tokenizer, tokenizer, Example(Q, T, "5", "")) is None
    other = build_tokenizer(vocab_size=600)
    other.chat_template = "{% for m in messages %}<|system|>{{ m['content'] }}{% endfor %}<|assistant|>"
    diff = chat_template_difference(other, tokenizer, Example(Q, T, "5", ""))
    assert diff is not None and "differ from token 0" in diff


@pytest.mark.parametrize(("overrides", "message"), [
    (["prompts_per_step=0"], "prompts_per_step must be >= 1"),
    (["kl_coef=-1"], "kl_coef must be >= 0"),
    (["loss_temperature=-0.5"], "must be > 0"),
    (["top_p=0"], "top_p must be in"),
    (["task_reward=true", "completions_per_prompt=1"], "needs completions_per_prompt >= 2"),
    (["loss=jsd", "opsm_delta=0.1"], "need loss=reverse_kl"),
    (["loss=jsd", "top_k=5"], "truncation is only supported with loss=reverse_kl"),
    (["teacher_backend=served"], "teacher_url is needed"),
    (["task=gsm8k", "data_dir=/nowhere"], "has no train.jsonl"),
])
def test_config_rules_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_run_validator(tmp_path):
    records = [{"step": 0, "eval/student_accuracy": 0.2}, {"step": 1, "opd/active_tokens": 10.0, "train/loss": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    assert len(validate_run(tmp_path, 1)) == 2
    with pytest.raises(ValueError, match="expected 0..2 once each"):
        validate_run(tmp_path, 2)
    records[1]["train/loss"] = float("nan")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=r"step 1 has non-finite \['train/loss'\]"):
        validate_run(tmp_path, 1)
