"""teacher=self (#24): the student scores its own samples under the teacher (privileged) prompt.

Real tiny models throughout: tiny:student as the self-distilled student, on the privileged arithmetic
task (the teacher prompt holds the worked solution, the student's only the problem).
"""

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opd.config import load_config
from opd.data import load_data
from opd.models import load_models
from opd.sampler import make_sampler
from opd.self_teacher import SELF_TEACHER_FILE, SelfTeacher
from opd.tasks import arithmetic_examples
from opd.teacher.hf import HFTeacherScorer
from opd.train import make_scorers, train


def base(tmp_path, *extra) -> list[str]:
    return ["teacher=self", "student=tiny:student", "task=arithmetic_privileged", "train_size=16", "eval_size=4",
            "prompts_per_step=4", "completions_per_prompt=2", "max_new_tokens=12", "micro_batch_size=8",
            "loss=topk_kl", "topk=4", "lr=3e-3", "device=cpu", "progress=false", "eval_every=0", "save_every=0",
            f"out_dir={tmp_path / 'run'}", *extra]


def step_optimizer(model, seed):
    """One real optimizer step on a real loss, so the student's weights move as in training."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = torch.randint(0, 100, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_privileged_arithmetic_rows_show_the_solution_to_the_teacher_only():
    ex = arithmetic_examples(3, "train", privileged=True)[0]
    assert ex.prompt == arithmetic_examples(3, "train")[0].prompt  # the student's prompt: the problem alone
    teacher_text = ex.teacher_prompt[0]["content"]
    assert teacher_text.startswith(ex.prompt[0]["content"] + "\n[Privileged solution")
    assert ex.solution in teacher_text and ex.solution not in ex.prompt[0]["content"]
    assert ex.solution.endswith(f"Final: {ex.answer}")


@pytest.mark.parametrize("mode", ["frozen", "live"])
def test_self_teacher_scores_as_a_deep_copy_of_the_student_used_as_an_ordinary_teacher(tmp_path, mode):
    config = load_config(None, base(tmp_path, f"self_teacher={mode}"))
    data = load_data(config)
    teachers, student, tokenizer = load_models(config)
    rollouts = make_sampler(config, data, teachers, student, tokenizer).sample(1)
    assert all(r.teacher_prompt_ids != r.prompt_ids for r in rollouts)  # scored under the privileged prompt
    got = make_scorers(config, teachers)["teacher"].score(rollouts, 1.0, topk=4)
    want = HFTeacherScorer(copy.deepcopy(student), vocab_size=len(tokenizer)).score(rollouts, 1.0, topk=4)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.logprobs_R, w.logprobs_R) and torch.equal(g.topk_ids_R_K, w.topk_ids_R_K)
    assert student.training and all(p.requires_grad for p in student.parameters())  # scoring left it trainable
    assert (teachers.own.model is student) == (mode == "live")


def test_snapshot_refreshes_after_every_kth_step_and_holds_in_between():
    student = AutoModelForCausalLM.from_pretrained("opd/assets/tiny/student")
    teacher = SelfTeacher(student, "snapshot", every=3)
    held = copy.deepcopy(student)
    for step in range(1, 8):
        step_optimizer(student, step)
        assert teacher.update(step) == (step % 3 == 0)
        if step % 3 == 0:
            held = copy.deepcopy(student)
        assert same(teacher.model, held), step  # the student as it was after the last multiple of 3
        assert not same(teacher.model, student) or step % 3 == 0, step


def test_ema_follows_its_formula_on_a_toy_parameter():
    student = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[0.0, 4.0]]))
    teacher = SelfTeacher(student, "ema", decay=0.75)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[8.0, 0.0]]))
    teacher.update(1)  # 0.75 * [0, 4] + 0.25 * [8, 0] = [2, 3]
    assert torch.equal(teacher.model.weight, torch.tensor([[2.0, 3.0]]))
    teacher.update(2)  # 0.75 * [2, 3] + 0.25 * [8, 0] = [3.5, 2.25]
    assert torch.equal(teacher.model.weight, torch.tensor([[3.5, 2.25]]))
    assert not teacher.model.weight.requires_grad and student.weight.requires_grad


@pytest.mark.parametrize("mode", ["frozen", "snapshot", "ema", "live"])
def test_memory_is_one_model_plus_the_one_copy_its_mode_needs_and_nothing_loads_twice(tmp_path, mode, monkeypatch):
    loads = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    teachers, student, _ = load_models(load_config(None, base(tmp_path, f"self_teacher={mode}")))
    assert len(loads) == 1  # the student only: no second model is read from disk
    storage = {p.untyped_storage().data_ptr() for p in student.parameters()}
    copies = [p for p in teachers.own.model.parameters() if p.untyped_storage().data_ptr() not in storage]
    nbytes = sum(p.numel() * p.element_size() for p in student.parameters())
    assert sum(p.numel() * p.element_size() for p in copies) == (0 if mode == "live" else nbytes)


def test_a_bf16_frozen_copy_takes_half_the_memory_and_scores_close_to_fp32(tmp_path):
    config = load_config(None, base(tmp_path, "teacher_dtype=bfloat16"))
    data = load_data(config)
    teachers, student, tokenizer = load_models(config)
    assert {p.dtype for p in teachers.own.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    rollouts = make_sampler(config, data, teachers, student, tokenizer).sample(1)
    got = make_scorers(config, teachers)["teacher"].score(rollouts, 1.0)
    want = HFTeacherScorer(copy.deepcopy(student), vocab_size=len(tokenizer)).score(rollouts, 1.0)
    diff = max((g.logprobs_R - w.logprobs_R).abs().max().item() for g, w in zip(got, want, strict=True))
    assert 0 < diff < 0.5


def test_an_ema_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_ends(tmp_path):
    common = base(tmp_path, "self_teacher=ema", "self_teacher_ema=0.5", "save_every=2", "keep_last=0",
                  "lr_schedule=constant")
    whole = train(load_config(None, common + [f"out_dir={tmp_path / 'whole'}", "steps=4"]))
    part = tmp_path / "part"
    train(load_config(None, common + [f"out_dir={part}", "steps=2"]))
    train(load_config(None, common + [f"out_dir={part}", "steps=4", "resume=true", "resume_allow_changed=steps"]))
    ckpts = [r / "checkpoints" / "step_000004" for r in (whole, part)]
    a, b = (load_file(str(c / SELF_TEACHER_FILE)) for c in ckpts)
    assert a.keys() == b.keys() and len(a) > 5
    assert all(torch.equal(a[k], b[k]) for k in a)
    student = load_file(str(ckpts[0] / "model" / "model.safetensors"))
    assert any(not torch.equal(a[k], student[k]) for k in a)  # the EMA lags the student
    # a frozen run's checkpoint has no teacher file: resuming it as ema is refused, naming the file
    frozen = base(tmp_path, "save_every=2", "lr_schedule=constant", f"out_dir={tmp_path / 'frozen'}")
    train(load_config(None, frozen + ["steps=2"]))
    with pytest.raises(ValueError, match=f"no {SELF_TEACHER_FILE}"):
        train(load_config(None, frozen + ["steps=4", "resume=true", "self_teacher=ema",
                                          "resume_allow_changed=steps,self_teacher"]))


@pytest.mark.parametrize("extra, message", [
    (["teacher=tiny:teacher", "self_teacher_every=5"], "self_teacher_every only acts with teacher=self"),
    (["self_teacher=average"], "self_teacher='average' is not accepted; choose one of frozen, snapshot, ema, live"),
    (["self_teacher=ema", "self_teacher_ema=1.0"], r"self_teacher_ema must be in \(0, 1\)"),
    (["self_teacher=snapshot", "self_teacher_every=0"], "self_teacher_every must be an integer >= 1"),
    (["self_teacher=ema", "teacher_dtype=bfloat16"], "an EMA in bf16 loses every update"),
    (["teacher_backend=served", "teacher_url=http://127.0.0.1:1"], "teacher=self .* needs teacher_backend=hf"),
])
def test_bad_self_teacher_settings_get_one_line_naming_the_field(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, base(tmp_path, *extra))


def test_tiny_arith_self_copies_the_solution_it_is_shown_and_cannot_solve_alone():
    from opd.evaluate import greedy_accuracy
    from opd.models import load_model, load_tokenizer

    model, tokenizer = load_model("tiny:arith_self"), load_tokenizer("tiny:arith_self")
    held_out = arithmetic_examples(100, "test", privileged=True)
    plain, _ = greedy_accuracy(model, tokenizer, held_out, max_new_tokens=32)
    shown, _ = greedy_accuracy(model, tokenizer, held_out, max_new_tokens=32, teacher_prompt=True)
    assert plain <= 0.6 and shown >= 0.85, (plain, shown)  # build report, 200 rows: 46.5% and 94.5%
