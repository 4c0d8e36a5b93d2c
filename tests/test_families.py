"""Model families beyond the bundled Llama (tests/families.py): train, resume, fused == plain, every eos stops.

Random-initialised 2-layer checkpoints of Llama (tied and untied head), Qwen2, Qwen3, Mistral, Gemma2
(logit soft-capping: the plain path) and Phi3, each with its own chat template, pad == eos, a padded
embedding and two eos ids. The structural fused-path check is also asked about families it has
never seen (Granite, with and without logit scaling) and a model whose forward rescales its logits.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, GraniteConfig, LlamaForCausalLM

from families import FAMILIES, build
from opd.batch import collate
from opd.config import load_config
from opd.forward import supports_fused
from opd.metrics import read_metrics
from opd.models import load_model, load_tokenizer
from opd.rollout import Sampling, make_rollout_engine
from opd.tasks import arithmetic_examples
from opd.teacher.hf import HFTeacherScorer
from opd.tokenization import render_prompt
from opd.objectives import micro_loss
from opd.train import train

SMALL = ["prompts_per_step=2", "completions_per_prompt=2", "max_new_tokens=6", "eval_size=1", "train_size=8",
         "progress=false", "log_samples=0", "lr=1e-2", "eval_every=0", "device=cpu"]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    folder, built = tmp_path_factory.mktemp("families"), {}

    def get(name):
        if name not in built:
            built[name] = build(FAMILIES[name], folder)
        return built[name]
    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_two_steps_train_and_a_resumed_run_is_bit_exact(name, family_dirs, tmp_path):
    paths = family_dirs(name)
    pair = [f"teacher={paths['teacher']}", f"student={paths['student']}"]
    whole = train(load_config(None, [*SMALL, *pair, f"out_dir={tmp_path / 'whole'}", "steps=2", "save_every=0"]))
    train(load_config(None, [*SMALL, *pair, f"out_dir={tmp_path / 'split'}", "steps=1", "save_every=1"]))
    split = train(load_config(None, [*SMALL, *pair, f"out_dir={tmp_path / 'split'}", "steps=2", "save_every=0",
                                     "resume=true"]))
    assert [r["step"] for r in read_metrics(split)] == [0, 1, 2]
    before = load_model(str(paths["student"])).state_dict()
    a = AutoModelForCausalLM.from_pretrained(whole / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(split / "final").state_dict()
    assert a.keys() == b.keys() == before.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert any(not torch.equal(a[k], before[k]) for k in a)
    assert read_metrics(whole)[2]["train/loss"] == read_metrics(split)[2]["train/loss"]


def family_batch(paths):
    """One real step's batch: the family student samples 2 prompts x 2, the family teacher scores them (with its
    top-4 and full logits, so one batch serves all three losses)."""
    tokenizer = load_tokenizer(str(paths["student"]))
    student, teacher = load_model(str(paths["student"])), load_model(str(paths["teacher"])).eval()
    prompts = [render_prompt(tokenizer, ex.prompt) for ex in arithmetic_examples(2, "train", seed=1)]
    rollouts = make_rollout_engine("hf", student, tokenizer).generate(prompts, 2, Sampling(max_new_tokens=6), seed=0)
    for r in rollouts:
        r.teacher_prompt_ids = r.prompt_ids
    scorer = HFTeacherScorer(teacher, vocab_size=len(tokenizer))
    scores = scorer.score(rollouts, 1.0, topk=4, full_logits=True)
    return student, tokenizer, scorer, rollouts, collate(rollouts, scores, tokenizer.pad_token_id)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_fused_paths_equal_the_plain_forward_in_loss_and_gradient(name, family_dirs, monkeypatch):
    student, tokenizer, scorer, rollouts, batch = family_batch(family_dirs(name))
    assert supports_fused(student) is FAMILIES[name].fused and supports_fused(scorer.model) is FAMILIES[name].fused
    for loss in ("reverse_kl", "topk_kl", "jsd"):
        config = load_config(None, [f"loss={loss}", "topk=4"])
        results = []
        for fused in (True, False):  # the plain path: the one a model without a plain head takes
            choice = supports_fused if fused else (lambda model: False)
            monkeypatch.setattr("opd.forward.supports_fused", choice)
            value, _ = micro_loss(student, batch, config, batch.num_tokens, len(tokenizer), teacher_head=scorer.head)
            value.backward()
            teacher_logprobs = torch.cat([s.logprobs_R for s in scorer.score(rollouts, 0.8)])
            results.append((value.detach(), [p.grad.clone() for p in student.parameters()], teacher_logprobs))
            student.zero_grad(set_to_none=True)
        (fused_loss, fused_grads, fused_q), (plain_loss, plain_grads, plain_q) = results
        torch.testing.assert_close(fused_loss, plain_loss, atol=1e-5, rtol=1e-5, msg=loss)
        for fused_grad, plain_grad in zip(fused_grads, plain_grads, strict=True):
            torch.testing.assert_close(fused_grad, plain_grad, atol=1e-6, rtol=1e-4, msg=loss)
        torch.testing.assert_close(fused_q, plain_q, atol=1e-5, rtol=1e-5)
        assert fused_loss.abs() > 0 and any(g.abs().max() > 0 for g in fused_grads), loss


@pytest.mark.parametrize("name", FAMILIES)
def test_a_sample_stops_at_either_eos_id_and_the_mask_covers_it(name, family_dirs):
    # Both eos rows of the head are set to 50 w, w the unit mean direction of the prompts' last hidden
    # states: the two ids tie far above every other token, so each sample is one token, either eos
    # with probability 1/2 (32 samples: both ids are drawn but with probability 2^-31).
    paths = family_dirs(name)
    tokenizer = load_tokenizer(str(paths["student"]))
    student = load_model(str(paths["student"])).eval()
    eos_ids = student.generation_config.eos_token_id
    prompts = [render_prompt(tokenizer, ex.prompt) for ex in arithmetic_examples(16, "train", seed=2)]
    with torch.no_grad():
        last_P_H = torch.cat([student.model(input_ids=torch.tensor([p])).last_hidden_state[:, -1] for p in prompts])
        w_H = torch.nn.functional.normalize(last_P_H.mean(0), dim=0)
        assert (last_P_H @ w_H).min() > 0.5, (last_P_H @ w_H)
        student.get_output_embeddings().weight[eos_ids] = 50 * w_H
    rollouts = make_rollout_engine("hf", student, tokenizer).generate(prompts, 2, Sampling(max_new_tokens=4), seed=0)
    ends = {r.completion_ids[-1] for r in rollouts}
    assert ends == set(eos_ids), ends  # both ids were drawn ...
    assert all(len(r.completion_ids) == 1 and r.finish_reason == "stop" for r in rollouts)  # ... and each one stopped
    for r in rollouts:
        r.teacher_prompt_ids = r.prompt_ids
    scores = HFTeacherScorer(load_model(str(paths["teacher"]))).score(rollouts, 1.0)
    assert collate(rollouts, scores, tokenizer.pad_token_id).loss_mask_B_T.sum() == len(rollouts)  # eos is trained


def tiny_granite(logits_scaling):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GraniteConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, logits_scaling=logits_scaling))


class DoubledLogits(LlamaForCausalLM):
    """A family the check cannot know: a plain Linear head, but the forward doubles its logits."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 2 * out.logits
        return out


def test_the_structural_check_takes_an_unknown_family_fused_only_when_its_logits_are_the_heads():
    # Granite was never on the old allow-list: without logit scaling its head is plain, with it not.
    assert supports_fused(tiny_granite(1.0))
    assert not supports_fused(tiny_granite(8.0))  # logits = lm_head(h) / 8
    # No config field says so; the one tiny forward (fused logits vs model(...).logits) does.
    doubled = DoubledLogits(load_model("tiny:student").config)
    assert not supports_fused(doubled)
    assert supports_fused(LlamaForCausalLM(load_model("tiny:student").config))
