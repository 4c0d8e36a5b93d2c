"""The bundled models (opd/assets/tiny, built by opd/bundled/): load offline, score as reported, rebuild."""

import json

import pytest

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.cli import main
from opd.evaluate import greedy_accuracy
from opd.models import TINY_DIR
from opd.tasks import arithmetic_examples
from opd.tokenization import encode_completion, render_prompt


def test_bundled_pair_loads_offline_with_from_pretrained():
    for name in ("teacher", "student"):
        folder = TINY_DIR / name
        assert (folder / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert model.config.model_type == "llama"
        assert model.config.vocab_size == len(tokenizer)
        assert tokenizer.chat_template is not None
    teacher = AutoModelForCausalLM.from_pretrained(TINY_DIR / "teacher")
    student = AutoModelForCausalLM.from_pretrained(TINY_DIR / "student")
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters()) / 3


def test_bundled_accuracy_gap_as_reported():
    # The saved weights reproduce the accuracies the build reported and the README states
    # (teacher 91%, student 20.5% on the 200 held-out problems; greedy is deterministic).
    report = json.loads((TINY_DIR / "build_report.json").read_text())
    assert report["teacher"]["held_out_accuracy"] >= 0.9
    assert 0.2 <= report["student"]["held_out_accuracy"] <= 0.5
    examples = arithmetic_examples(200, "test")
    tokenizer = AutoTokenizer.from_pretrained(TINY_DIR / "teacher")
    for name in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(TINY_DIR / name)
        accuracy, _ = greedy_accuracy(model, tokenizer, examples, 32)
        assert accuracy == pytest.approx(report[name]["held_out_accuracy"], abs=0.02), name


def test_save_and_reload_give_identical_logits(tmp_path, student, tokenizer):
    ids = torch.tensor([render_prompt(tokenizer, [{"role": "user", "content": "12+34-5"}])])
    student.eval()
    before = student(input_ids=ids).logits
    student.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert torch.equal(reloaded(input_ids=ids).logits, before)
    assert AutoTokenizer.from_pretrained(tmp_path / "m").get_vocab() == tokenizer.get_vocab()


def test_chat_template_renders_the_same_ids_as_the_tokenizer(tokenizer):
    messages = [{"role": "user", "content": "12+34-5"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|user|>12+34-5<|assistant|>"
    assert render_prompt(tokenizer, messages) == tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "12+34=46\nFinal: 41"}],
                                         tokenize=False)
    # prompt + completion ids (what training uses) == the template's rendering of the whole conversation
    assert render_prompt(tokenizer, messages) + encode_completion(tokenizer, "12+34=46\nFinal: 41") == \
        tokenizer.encode(full, add_special_tokens=False)


def test_digits_are_single_tokens(tokenizer):
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("12345+678", add_special_tokens=False))
    assert pieces == ["1", "2", "3", "4", "5", "+", "6", "7", "8"]


def test_build_tiny_with_a_tiny_budget_produces_a_loadable_pair(tmp_path, capsys):
    assert main(["build-tiny", "--out", str(tmp_path), "--teacher-steps", "2", "--student-steps", "2", "--n-eval", "4"]) == 0
    report = json.loads((tmp_path / "build_report.json").read_text())
    assert report["teacher"]["cycles"][0]["history"][0]["step"] == 2
    for name in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / name)
        out = model(input_ids=torch.tensor([render_prompt(tokenizer, [{"role": "user", "content": "1+2"}])]))
        assert torch.isfinite(out.logits).all()
    assert "teacher:" in capsys.readouterr().out
