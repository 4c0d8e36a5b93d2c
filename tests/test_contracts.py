"""The contracts of docs/design.md §4-5 on the real pipeline: padded vocabularies and the one temperature rule.

Each test runs the code the loop runs (HF rollout engine, HF teacher scorer, `teacher_scores`,
`collate`, `micro_loss`, `train_step`) on the bundled tiny models, and compares it with naive torch
computed by hand from raw logits.
"""

import copy
import sys
import types

import pytest
import torch

from opd.batch import collate
from opd.config import load_config
from opd.rollout import Sampling
from opd.rollout.hf import HFRolloutEngine
from opd.tasks import arithmetic_examples
from opd.teacher.hf import HFTeacherScorer, score_tokens
from opd.teacher.served import ServedTeacherScorer
from opd.tokenization import render_prompt
from opd.objectives import micro_loss, teacher_scores
from opd.train import train_step

EXTRA = 40  # padded rows: 2048 tokens -> 2088 rows, like Qwen2.5's 151,665 tokens in 151,936 rows


def padded_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`model` with EXTRA more embedding rows (tied input/output), filled with large random values.

    The rows are 3x the scale of the real ones, so any softmax that includes them gives other
    numbers: a missing slice fails these tests.
    """
    padded = copy.deepcopy(model)
    V = model.get_input_embeddings().weight.shape[0]
    padded.resize_token_embeddings(V + EXTRA, mean_resizing=False)
    weight = padded.get_input_embeddings().weight
    assert weight is padded.get_output_embeddings().weight  # tied, as in the bundled models
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        weight[V:] = torch.randn(EXTRA, weight.shape[1], generator=gen) * 3 * weight[:V].std()
    return padded


def rollouts_of(model, tokenizer, temperature: float, n_prompts: int = 4, seed: int = 5):
    prompts = [render_prompt(tokenizer, ex.prompt) for ex in arithmetic_examples(n_prompts, "test")]
    rollouts = HFRolloutEngine(model, tokenizer).generate(prompts, 2, Sampling(temperature=temperature,
                                                                               max_new_tokens=14), seed=seed)
    for r in rollouts:
        r.teacher_prompt_ids = r.prompt_ids
    return rollouts


# ---- padded vocabularies (docs/design.md §5) ----------------------------------------------------------------------------

def test_a_padded_teacher_scores_exactly_as_the_unpadded_one(teacher, tokenizer):
    V = len(tokenizer)
    padded = padded_copy(teacher, seed=1)
    prompts = [render_prompt(tokenizer, ex.prompt) for ex in arithmetic_examples(3, "test")]
    completions = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id]
                   for t in ("1+2=3\nFinal: 3", "7-9=-2\nFinal: -2", "Final: 40")]
    want = score_tokens(teacher, prompts, completions, 0.8, topk=6, full_logits=True)
    got = score_tokens(padded, prompts, completions, 0.8, topk=6, full_logits=True, vocab_size=V)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g.logprobs_R, w.logprobs_R, rtol=0, atol=1e-5)
        assert torch.equal(g.topk_ids_R_K, w.topk_ids_R_K)
        torch.testing.assert_close(g.topk_logprobs_R_K, w.topk_logprobs_R_K, rtol=0, atol=1e-5)
        assert g.logits_R_V.shape[-1] == V
        torch.testing.assert_close(g.logits_R_V, w.logits_R_V, rtol=0, atol=1e-5)
    # the padded rows matter: without the slice the same model scores otherwise
    unsliced = score_tokens(padded, prompts, completions, 0.8)
    assert (unsliced[0].logprobs_R - want[0].logprobs_R).abs().max() > 1e-2
    scorer = HFTeacherScorer(padded_copy(teacher, seed=1), vocab_size=V)  # the loop's scorer, same numbers
    rollouts = rollouts_of(teacher, tokenizer, 1.0, n_prompts=2)
    for w, g in zip(score_tokens(teacher, [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], 1.0),
                    scorer.score(rollouts, 1.0), strict=True):
        torch.testing.assert_close(g.logprobs_R, w.logprobs_R, rtol=0, atol=1e-5)


@pytest.mark.parametrize("loss", ["reverse_kl", "topk_kl", "jsd"])
def test_a_padded_student_trains_exactly_as_the_unpadded_one(teacher, student, tokenizer, loss):
    """Same batch, same config: loss, every shared gradient and one AdamW step agree; padded rows get 0."""
    V = len(tokenizer)
    config = load_config(None, [f"loss={loss}", "temperature=0.9", "topk=8", "lr=1e-3", "micro_batch_size=3"])
    rollouts = rollouts_of(student, tokenizer, config.temperature)
    scorer = HFTeacherScorer(padded_copy(teacher, seed=2), vocab_size=V)
    scores = teacher_scores(scorer, rollouts, config)
    batch = collate(rollouts, scores, tokenizer.pad_token_id)
    N = batch.num_tokens
    padded = padded_copy(student, seed=3)
    padded_rows_before = padded.get_input_embeddings().weight[V:].detach().clone()

    def step(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        grads = {}
        keep = lambda *_: grads.update({n: p.grad.clone() for n, p in model.named_parameters()})  # noqa: E731
        optimizer.register_step_pre_hook(keep)
        metrics = train_step(model, optimizer, batch, config, N, vocab_size=V, teacher_head=scorer.head)
        return metrics, grads, {n: p.detach().clone() for n, p in model.named_parameters()}

    plain_metrics, plain_grads, plain_after = step(student)
    padded_metrics, padded_grads, padded_after = step(padded)
    assert plain_metrics["train/loss"] != 0
    assert padded_metrics["train/loss"] == pytest.approx(plain_metrics["train/loss"], rel=1e-5, abs=1e-7)
    assert padded_metrics["train/grad_norm"] == pytest.approx(plain_metrics["train/grad_norm"], rel=1e-5)
    assert plain_grads.keys() == padded_grads.keys()
    # AdamW's first step moves each weight by lr·g/(|g| + 1e-8): ~lr wherever the gradient is not tiny, and
    # a gradient of size ~1e-8 turns float rounding into a few % of lr; so the step is compared at 5% of lr
    for name, grad in plain_grads.items():
        rows = grad.shape[0]
        torch.testing.assert_close(padded_grads[name][:rows], grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(padded_after[name][:rows], plain_after[name], rtol=0, atol=0.05 * config.lr)
        if padded_grads[name].shape != grad.shape:  # the embedding: padded rows get no gradient, stay as they were
            assert name.endswith("embed_tokens.weight") and padded_grads[name].shape[0] == V + EXTRA
            assert torch.equal(padded_grads[name][V:], torch.zeros(EXTRA, grad.shape[1]))
            assert torch.equal(padded_after[name][V:], padded_rows_before)


def test_without_the_slice_a_padded_student_computes_another_loss(student, teacher, tokenizer):
    # the control for the test above: the padded rows do change the numbers when they are not sliced off
    config = load_config(None, ["temperature=0.9"])
    rollouts = rollouts_of(student, tokenizer, config.temperature)
    batch = collate(rollouts, teacher_scores(HFTeacherScorer(teacher), rollouts, config), tokenizer.pad_token_id)
    padded = padded_copy(student, seed=3)
    sliced, _ = micro_loss(padded, batch, config, batch.num_tokens, vocab_size=len(tokenizer))
    unsliced, _ = micro_loss(padded, batch, config, batch.num_tokens)
    assert abs(sliced.item() - unsliced.item()) > 1e-3


def test_a_teacher_top_k_id_outside_the_student_vocabulary_raises(student, teacher, tokenizer):
    # a top-k id the student has no row for (a teacher with a larger tokenizer) is never clamped;
    # the pure loss's own rule is tested in test_losses.py::test_topk_forward_kl_rejects_out_of_range_ids_*
    config = load_config(None, ["loss=topk_kl", "topk=2"])
    rollouts = rollouts_of(student, tokenizer, 1.0, n_prompts=1)
    scores = teacher_scores(HFTeacherScorer(teacher), rollouts, config)
    scores[0].topk_ids_R_K = scores[0].topk_ids_R_K.clone()  # scores are inference tensors
    scores[0].topk_ids_R_K[0, 1] = len(tokenizer)  # the first id past the student's tokenizer
    batch = collate(rollouts, scores, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=rf"teacher top-k id {len(tokenizer)} .* outside the student vocabulary"):
        micro_loss(padded_copy(student, seed=0), batch, config, batch.num_tokens, vocab_size=len(tokenizer))


# ---- the temperature rule (docs/design.md §4) ---------------------------------------------------------------------------

def naive_logprobs(model, rollout, temperature: float, prompt_ids=None) -> torch.Tensor:
    """`[R, V]` log-softmax(z / τ) at the completion's positions, from one plain forward."""
    prompt_ids = rollout.prompt_ids if prompt_ids is None else prompt_ids
    ids = torch.tensor([prompt_ids + rollout.completion_ids])
    z_R_V = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].double()
    return torch.log_softmax(z_R_V / temperature, dim=-1)


def naive_loss(student, teacher, rollouts, config, N) -> torch.Tensor:
    """The loss of docs/design.md §4 written out per rollout, every distribution at its temperature by hand."""
    tau, tau_loss = config.temperature, config.loss_temperature
    total = 0.0
    for r in rollouts:
        y_R = torch.tensor(r.completion_ids)
        with torch.no_grad():
            teacher_tau_R_V = naive_logprobs(teacher, r, tau, r.teacher_prompt_ids)
            teacher_loss_R_V = naive_logprobs(teacher, r, tau_loss, r.teacher_prompt_ids)
        if config.loss == "reverse_kl":  # -Σ exp(log π - p) · sg(A),  A = -(p - q), all at τ
            log_pi_R = naive_logprobs(student, r, tau).gather(-1, y_R[:, None])[:, 0]
            p_R = torch.tensor(r.sampler_logprobs, dtype=torch.float64)
            q_R = teacher_tau_R_V.gather(-1, y_R[:, None])[:, 0]
            total = total - (torch.exp(log_pi_R - p_R) * -(p_R - q_R)).sum()
        elif config.loss == "topk_kl":  # Σ_k e^ν (ν - ℓ), teacher top-k and student both at the loss temperature
            nu_R_K, ids_R_K = teacher_loss_R_V.topk(config.topk, dim=-1)
            ell_R_K = naive_logprobs(student, r, tau_loss).gather(-1, ids_R_K)
            total = total + (nu_R_K.exp() * (nu_R_K - ell_R_K)).sum()
        else:  # JSD_β with M = β P_T + (1-β) P_S, both at the loss temperature
            log_s_R_V, beta = naive_logprobs(student, r, tau_loss), config.jsd_beta
            log_m_R_V = torch.log(beta * teacher_loss_R_V.exp() + (1 - beta) * log_s_R_V.exp())
            kl_t = (teacher_loss_R_V.exp() * (teacher_loss_R_V - log_m_R_V)).sum()
            kl_s = (log_s_R_V.exp() * (log_s_R_V - log_m_R_V)).sum()
            total = total + beta * kl_t + (1 - beta) * kl_s
    return total / N


LOSSES = [["loss=reverse_kl"], ["loss=topk_kl", "topk=6"], ["loss=topk_kl", "topk=6", "loss_temperature={other}"],
          ["loss=jsd", "jsd_beta=0.3"], ["loss=jsd", "jsd_beta=0.3", "loss_temperature={other}"]]


@pytest.mark.parametrize("tau", [0.7, 1.3])
@pytest.mark.parametrize("overrides", LOSSES, ids=lambda o: "-".join(x.split("=")[1].strip("{}") for x in o))
def test_both_sides_of_every_divergence_use_the_same_temperature(student, teacher, tokenizer, tau, overrides):
    """Sampler p, student log π and teacher q at τ; top-k KL and JSD at loss_temperature (τ by default)."""
    other = round(2.0 - tau, 2)  # 0.7 <-> 1.3: an explicit loss temperature that is not τ
    config = load_config(None, [f"temperature={tau}", *(o.format(other=other) for o in overrides)])
    assert config.loss_temperature == (other if "loss_temperature" in str(overrides) else tau)
    student.eval()  # dropout is 0 anyway; eval() so the naive forward is the sampler's
    rollouts = rollouts_of(student, tokenizer, tau)
    V = len(tokenizer)
    scorer = HFTeacherScorer(teacher, vocab_size=V)
    scores = teacher_scores(scorer, rollouts, config)
    with torch.no_grad():
        for r, s in zip(rollouts, scores, strict=True):
            y_R = torch.tensor(r.completion_ids)[:, None]
            p_R = naive_logprobs(student, r, tau).gather(-1, y_R)[:, 0]  # the sampler draws from softmax(z_s / τ)
            torch.testing.assert_close(torch.tensor(r.sampler_logprobs, dtype=torch.float64), p_R, rtol=0, atol=2e-5)
            q_R = naive_logprobs(teacher, r, tau).gather(-1, y_R)[:, 0]  # q at τ, whatever the loss temperature
            torch.testing.assert_close(s.logprobs_R.double(), q_R, rtol=0, atol=2e-5)
            if config.loss == "topk_kl":  # the teacher's top-k at the temperature the student side uses
                nu_R_K, ids_R_K = naive_logprobs(teacher, r, config.loss_temperature).topk(config.topk, dim=-1)
                assert torch.equal(s.topk_ids_R_K, ids_R_K)
                # the top-k reaches far into the tail (logprobs near -29 here), where fp32 rounding of the
                # fused hidden @ head matmul vs the full forward is relative: ~13 ulps is 2.5e-5 absolute
                torch.testing.assert_close(s.topk_logprobs_R_K.double(), nu_R_K, rtol=2e-6, atol=2e-5)
    batch = collate(rollouts, scores, tokenizer.pad_token_id)
    ours, _ = micro_loss(student, batch, config, batch.num_tokens, vocab_size=V, teacher_head=scorer.head)
    want = naive_loss(student, teacher, rollouts, config, batch.num_tokens)
    assert abs(want.item()) > 1e-3
    assert ours.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    params = [p for p in student.parameters() if p.requires_grad]
    for g_ours, g_want in zip(torch.autograd.grad(ours, params), torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(g_ours, g_want, rtol=1e-3, atol=1e-6)


def test_served_teacher_refuses_a_temperature_it_cannot_apply(student, tokenizer):
    # the server computes prompt logprobs at temperature 1; it is refused before any request
    # (nothing listens on port 9), for τ itself and for a top-k KL whose loss temperature is not 1
    served = ServedTeacherScorer("http://127.0.0.1:9", "teacher", timeout_s=1, retries=0)
    rollouts = rollouts_of(student, tokenizer, 1.0, n_prompts=1)
    with pytest.raises(ValueError, match="temperature 0.7 was asked.*teacher_backend='hf'"):
        teacher_scores(served, rollouts, load_config(None, ["temperature=0.7"]))
    with pytest.raises(ValueError, match="temperature 0.5 was asked"):
        teacher_scores(served, rollouts, load_config(None, ["loss=topk_kl", "loss_temperature=0.5"]))


def test_vllm_teacher_without_prompt_logprobs_temperature_refuses_before_generating(monkeypatch, student, tokenizer):
    # a stand-in `vllm` module whose SamplingParams lacks `prompt_logprobs_temperature` (today's vLLM);
    # its engine must never be asked to generate
    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class Engine:
        llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=512,
                                                                              logprobs_mode="raw_logprobs"))

        def generate(self, *args, **kwargs):
            raise AssertionError("scored at temperature 1 instead of refusing")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=None, SamplingParams=SamplingParams))
    from opd.teacher.vllm import VLLMTeacherScorer

    scorer = VLLMTeacherScorer(None, llms=[Engine()])
    rollouts = rollouts_of(student, tokenizer, 1.0, n_prompts=1)
    with pytest.raises(ValueError, match="temperature 1.3 was asked.*no `prompt_logprobs_temperature`"):
        scorer.score(rollouts, 1.3)
    with pytest.raises(ValueError, match="temperature 0.8 was asked"):
        teacher_scores(scorer, rollouts, load_config(None, ["loss=topk_kl", "loss_temperature=0.8"]))


def test_an_unpadded_vocabulary_is_not_sliced():
    # A slice of [B, T, V] logits, even a full-width one, has a backward that allocates a zero-filled
    # gradient as large as the logits; an unpadded vocabulary must pass through as the very tensor.
    from opd.tokenization import vocab_logits
    logits = torch.randn(2, 3, 5, requires_grad=True) * 1.0
    assert vocab_logits(logits, 5) is logits
    assert vocab_logits(logits, None) is logits
    assert vocab_logits(logits, 4).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        vocab_logits(logits, 6)
