"""Every stop id ends a sample and is trained; tokenizers need no pad token (issue #18 items 2 and 4)."""

import json
import logging
import shutil

import pytest

from opd.batch import collate
from opd.config import TrainConfig, load_config
from opd.models import TINY_DIR, load_pair, load_tokenizer
from opd.rollout import Sampling
from opd.rollout.hf import HFRolloutEngine
from opd.tasks import load_task
from opd.teacher.hf import score_tokens
from opd.tokenization import check_tokenizers_compatible, pad_id, render_prompt, stop_token_ids
from opd.train import train

NEWLINE = 204  # "\n" in the bundled tokenizer: every worked solution has several, so samples reach it early
EOS = 2


def folder_with(tmp_path, name, source="student", generation=None, drop_pad=False):
    folder = tmp_path / name
    shutil.copytree(TINY_DIR / source, folder)
    if generation is not None:
        path = folder / "generation_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | generation))
    if drop_pad:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer_config.pop("pad_token")
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        for file in ("config.json", "generation_config.json"):
            config = json.loads((folder / file).read_text())
            config.pop("pad_token_id", None)
            (folder / file).write_text(json.dumps(config))
    return str(folder)


def prompts(tokenizer, n=8):
    return [render_prompt(tokenizer, ex.prompt) for ex in load_task("arithmetic", "train", n, 0)]


def test_stop_set_is_every_eos_and_the_extras():
    tokenizer = load_tokenizer("tiny:student")

    class Generation:
        eos_token_id = [NEWLINE, EOS]

    assert stop_token_ids(tokenizer, Generation(), extra=[7]) == (EOS, 7, NEWLINE)
    Generation.eos_token_id = 9
    assert stop_token_ids(tokenizer, Generation()) == (EOS, 9)
    assert stop_token_ids(tokenizer, None) == (EOS,)
    with pytest.raises(ValueError, match=r"stop token ids \[5000\] are outside .* fix stop_token_ids"):
        stop_token_ids(tokenizer, None, extra=[5000])


def test_a_student_with_two_eos_ids_stops_at_either_and_trains_on_it(tmp_path):
    student_dir = folder_with(tmp_path, "student", generation={"eos_token_id": [EOS, NEWLINE]})
    teacher, student, tokenizer, _ = load_pair(TrainConfig(student=student_dir, device="cpu"))
    assert student.generation_config.eos_token_id == [EOS, NEWLINE]
    rollouts = HFRolloutEngine(student, tokenizer).generate(prompts(tokenizer), 4, Sampling(max_new_tokens=24), seed=0)
    stopped = [r for r in rollouts if r.finish_reason == "stop"]
    assert {r.completion_ids[-1] for r in stopped} == {NEWLINE}  # the first line of a solution ends in "\n"
    assert all(not {EOS, NEWLINE} & set(r.completion_ids[:-1]) for r in rollouts)
    # the tokenizer's eos stops too: after a whole solution ending in its Final: line, the student says eos
    eos_rollouts = HFRolloutEngine(student, tokenizer, stop_ids=[EOS, NEWLINE]).generate(
        [p + tokenizer.encode("1+1=2\nFinal: 2", add_special_tokens=False) for p in prompts(tokenizer, 4)], 2,
        Sampling(max_new_tokens=4), seed=0)
    assert any(r.finish_reason == "stop" and r.completion_ids[-1] == EOS for r in eos_rollouts)
    scores = score_tokens(teacher, [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], 1.0)
    batch = collate(rollouts, scores, pad_id(tokenizer))
    for b, r in enumerate(rollouts):  # the stop token is the last trained target; nothing after it is
        last = len(r.prompt_ids) - 1 + len(r.completion_ids) - 1
        assert batch.tokens_B_L[b, last + 1] == r.completion_ids[-1]
        assert batch.loss_mask_B_T[b, last] == 1 and batch.loss_mask_B_T[b, last + 1 :].sum() == 0


def test_min_new_tokens_forbids_every_stop_id(tokenizer, student):
    rollouts = HFRolloutEngine(student, tokenizer, stop_ids=[EOS, NEWLINE]).generate(
        prompts(tokenizer), 2, Sampling(max_new_tokens=12, min_new_tokens=6), seed=0)
    assert all(not {EOS, NEWLINE} & set(r.completion_ids[:6]) for r in rollouts)
    assert any(r.finish_reason == "stop" for r in rollouts)  # allowed again after 6 tokens


def test_stop_token_ids_config_adds_a_stop(tmp_path):
    config = TrainConfig(stop_token_ids=[NEWLINE], device="cpu")
    _, student, tokenizer, _ = load_pair(config)
    assert student.generation_config.eos_token_id == [EOS, NEWLINE]
    rollouts = HFRolloutEngine(student, tokenizer).generate(prompts(tokenizer, 4), 2, Sampling(max_new_tokens=24), seed=0)
    assert all(NEWLINE not in r.completion_ids[:-1] for r in rollouts)


def test_padless_tokenizers_train_and_say_so_once(tmp_path, caplog):
    student_dir = folder_with(tmp_path, "student", drop_pad=True)
    teacher_dir = folder_with(tmp_path, "teacher", source="teacher", drop_pad=True)
    tokenizer, teacher_tokenizer = load_tokenizer(student_dir), load_tokenizer(teacher_dir)
    assert tokenizer.pad_token_id is None
    check_tokenizers_compatible(teacher_tokenizer, tokenizer)  # both lack a pad token
    check_tokenizers_compatible(load_tokenizer("tiny:teacher"), tokenizer)  # one pads with <|pad|>, one has none
    with caplog.at_level(logging.INFO, logger="opd.tokenization"):
        run_dir = train(load_config(None, [f"student={student_dir}", f"teacher={teacher_dir}", "steps=1",
                                           "prompts_per_step=2", "completions_per_prompt=2", "max_new_tokens=12",
                                           "eval_size=2", "train_size=8", "progress=false", "log_samples=0",
                                           f"out_dir={tmp_path / 'run'}"]))
    assert (run_dir / "final" / "model.safetensors").is_file()
    said = [r.message for r in caplog.records if "no pad token" in r.message]
    assert len(said) <= 1 and pad_id(tokenizer) == EOS  # once per process (an earlier test may have said it)


def test_pad_equal_to_eos_is_fine_and_a_real_mismatch_names_the_fix(tmp_path):
    tokenizer = load_tokenizer("tiny:student")
    same = load_tokenizer("tiny:student")
    same.pad_token = same.eos_token
    check_tokenizers_compatible(tokenizer, same)
    other = load_tokenizer("tiny:student")
    other.eos_token = "<|system|>"
    with pytest.raises(ValueError, match=r"eos_token_id: teacher 2 \('<\|eos\|>'\), student 5 .*set the student's "
                                         r"eos_token to the teacher's \('<\|eos\|>'\) in its tokenizer_config.json"):
        check_tokenizers_compatible(tokenizer, other)
