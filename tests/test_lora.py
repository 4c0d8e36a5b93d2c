"""LoRA students (opd/lora.py): only the adapter trains, the sampler uses it, resume is exact, final/ is merged."""

import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from opd import checkpoint
from opd.batch import collate
from opd.config import load_config
from opd.forward import model_head, supports_fused
from opd.kernels import token_logprobs
from opd.lora import ADAPTER_DIR, apply_lora, is_lora, load_adapter, merged_state_dict
from opd.metrics import read_metrics
from opd.models import load_model, load_tokenizer
from opd.rollout import Sampling
from opd.rollout.hf import HFRolloutEngine
from opd.tasks import arithmetic_examples
from opd.teacher.hf import HFTeacherScorer
from opd.tokenization import render_prompt
from opd.objectives import micro_loss
from opd.train import make_optimizer, train, train_step

SMALL = ["prompts_per_step=2", "completions_per_prompt=2", "max_new_tokens=12", "eval_size=2", "train_size=16",
         "progress=false", "log_samples=0", "lr=1e-2", "eval_every=0", "lora_rank=4", "lora_alpha=8"]


def lora_student(targets="all-linear", seed=0):
    """The bundled student with a rank-4 adapter whose B is random (peft starts B at 0: the adapter would be a no-op)."""
    student = apply_lora(load_model("tiny:student"), 4, 8.0, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return student


def real_batch(student, tokenizer, teacher, full_logits=False, topk=0):
    prompts = [render_prompt(tokenizer, ex.prompt) for ex in arithmetic_examples(3, "train", seed=3)]
    rollouts = HFRolloutEngine(student, tokenizer).generate(prompts, 2, Sampling(max_new_tokens=10), seed=1)
    for r in rollouts:
        r.teacher_prompt_ids = r.prompt_ids
    scores = HFTeacherScorer(teacher, vocab_size=len(tokenizer)).score(rollouts, 1.0, topk=topk, full_logits=full_logits)
    return collate(rollouts, scores, tokenizer.pad_token_id), rollouts


def test_a_train_step_moves_every_adapter_weight_and_nothing_else(tokenizer, teacher):
    student = apply_lora(load_model("tiny:student"), 4, 8.0)
    assert is_lora(student) and supports_fused(student)  # lm_head is not adapted: the fused paths stay exact
    before = {k: v.clone() for k, v in student.state_dict().items()}
    config = load_config(None, ["lr=1e-2", "lora_rank=4"])
    optimizer, _ = make_optimizer(student, config)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(trained) == 28 and all(p.dtype == torch.float32 for p in trained)  # 7 linears x 2 layers x (A, B)
    batch, _ = real_batch(student, tokenizer, teacher)
    for _ in range(2):  # step 1 moves B (A's gradient is 0 while B is 0); step 2 moves A too
        train_step(student, optimizer, batch, config, batch.num_tokens, vocab_size=len(tokenizer))
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".lora_A." in k or ".lora_B." in k}, sorted(changed)[:5]
    assert optimizer.state and all(p.requires_grad for p in optimizer.state)


@pytest.mark.parametrize("loss", ["reverse_kl", "topk_kl", "jsd"])
def test_the_fused_losses_of_a_lora_student_equal_its_plain_forward(tokenizer, teacher, loss, monkeypatch):
    student = lora_student()
    batch, _ = real_batch(student, tokenizer, teacher, full_logits=loss == "jsd", topk=5 if loss == "topk_kl" else 0)
    config = load_config(None, [f"loss={loss}", "topk=5", "lora_rank=4"])
    results, teacher_head = [], model_head(teacher, len(tokenizer))  # the scorer's head, beside the batch
    for fused in (True, False):
        monkeypatch.setattr("opd.forward.supports_fused", supports_fused if fused else (lambda model: False))
        value, _ = micro_loss(student, batch, config, batch.num_tokens, len(tokenizer), teacher_head=teacher_head)
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
        student.zero_grad(set_to_none=True)
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    assert sorted(fused_grads) == sorted(plain_grads) and all("lora_" in n for n in fused_grads)
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-5, rtol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=1e-4)


def test_an_adapted_head_takes_the_plain_path_because_the_fused_one_would_ignore_it():
    # TRL #6530: a LoRA on lm_head, and the fused loss read lm_head.weight, the un-adapted base.
    student = lora_student("q_proj,lm_head")
    assert not supports_fused(student)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        adapted = student(input_ids=ids).logits
        base_head = student.model(input_ids=ids).last_hidden_state @ student.lm_head.base_layer.weight.T
    assert (adapted - base_head).abs().max() > 1e-2  # what the fused path would have trained on instead


def test_the_rollout_engine_samples_from_the_adapted_weights(tokenizer):
    student, base = lora_student(), load_model("tiny:student")
    prompts = [render_prompt(tokenizer, ex.prompt) for ex in arithmetic_examples(2, "train", seed=5)]
    rollouts = HFRolloutEngine(student, tokenizer).generate(prompts, 2, Sampling(max_new_tokens=8), seed=0)
    tokens = torch.tensor([r.prompt_ids + r.completion_ids for r in rollouts[:1]])
    p = torch.tensor(rollouts[0].sampler_logprobs)
    R = len(rollouts[0].completion_ids)
    with torch.no_grad():
        adapted = token_logprobs(student(input_ids=tokens).logits[:, :-1, : len(tokenizer)], tokens[:, 1:])[0, -R:]
        plain = token_logprobs(base(input_ids=tokens).logits[:, :-1, : len(tokenizer)], tokens[:, 1:])[0, -R:]
    torch.testing.assert_close(p, adapted, atol=1e-5, rtol=1e-5)  # p is the adapted policy's: the ratio is 1
    assert (p - plain).abs().max() > 1e-2


def test_a_lora_run_resumes_bit_exactly_and_its_final_folder_is_the_merged_model_plus_the_adapter(tmp_path):
    whole = train(load_config(None, [*SMALL, f"out_dir={tmp_path / 'whole'}", "steps=3", "save_every=0"]))
    train(load_config(None, [*SMALL, f"out_dir={tmp_path / 'split'}", "steps=2", "save_every=2"]))
    split = train(load_config(None, [*SMALL, f"out_dir={tmp_path / 'split'}", "steps=3", "save_every=0",
                                     "resume=true"]))
    a, b = read_metrics(whole), read_metrics(split)
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a[1:], b[1:], strict=True):
        for key in (k for k in ra if k.startswith(("opd/", "train/"))):
            assert ra[key] == rb[key], (ra["step"], key)
    # the checkpoint holds the adapter and the optimizer state of the adapter only
    state = torch.load(checkpoint.latest(split) / checkpoint.STATE_FILE, weights_only=False)
    assert len(state["optimizer"]["state"]) == 28 and all("lora_" in k for k in state["optimizer"]["state"])

    def adapted(run_dir):
        student = apply_lora(load_model("tiny:student"), 4, 8.0)
        load_adapter(student, run_dir / "final" / ADAPTER_DIR)
        return student

    whole_student, split_student = adapted(whole), adapted(split)
    for (k, v), w in zip(whole_student.state_dict().items(), split_student.state_dict().values(), strict=True):
        assert torch.equal(v, w), k  # bit-exact resume
    base = load_model("tiny:student").state_dict()
    assert all(torch.equal(v, base[k.replace(".base_layer.", ".")])  # the frozen base never moved
               for k, v in whole_student.state_dict().items() if ".lora_" not in k)

    merged = AutoModelForCausalLM.from_pretrained(whole / "final")  # a plain folder: no peft needed
    assert not is_lora(merged)
    ids = torch.tensor([render_prompt(load_tokenizer("tiny:student"), ex.prompt)
                        for ex in arithmetic_examples(2, "test", seed=0, max_operand=10)][:1])
    with torch.no_grad():
        expected = whole_student(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-5)
        assert (load_model("tiny:student")(input_ids=ids).logits - expected).abs().max() > 1e-3  # it trained
        via_peft = PeftModel.from_pretrained(load_model("tiny:student"), whole / "final" / ADAPTER_DIR)
        torch.testing.assert_close(via_peft(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)
    merged_keys = set(merged_state_dict(whole_student))
    assert merged_keys == set(base)
    assert all(math.isfinite(v) for r in a for v in r.values())


@pytest.mark.parametrize(("overrides", "message"), [
    (["lora_rank=-1"], "lora_rank must be >= 0"),
    (["lora_rank=4", "lora_alpha=0"], "lora_alpha > 0"),
    (["lora_rank=4", "fsdp=true"], "lora_rank > 0 with fsdp=true is not implemented"),
])
def test_bad_lora_configs_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_a_lora_target_the_student_lacks_names_the_field():
    with pytest.raises(ValueError, match="lora_targets='no_such_proj'"):
        apply_lora(load_model("tiny:student"), 4, 8.0, "no_such_proj")
