"""Generation and teacher scoring on the real tiny models: the logprobs the loss will see."""

import pytest
import torch

from opd.batch import collate
from opd.kernels import token_logprobs
from opd.models import load_model
from opd.rollout import Sampling
from opd.rollout.hf import HFRolloutEngine, sample_next
from opd.tasks import arithmetic_examples
from opd.teacher.hf import HFTeacherScorer, score_tokens
from opd.tokenization import render_prompt
from opd.types import Rollout


def prompts(tokenizer, n=4):
    return [render_prompt(tokenizer, ex.prompt) for ex in arithmetic_examples(n, "test")]


def recompute(model, rollout: Rollout, sampling: Sampling) -> torch.Tensor:
    """The trainer's view: one right-padded forward, the same temperature and truncation."""
    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    logits_B_T_V = model(input_ids=ids).logits[:, :-1]
    lp = token_logprobs(logits_B_T_V, ids[:, 1:], sampling.temperature, sampling.top_k, sampling.top_p)
    return lp[0, len(rollout.prompt_ids) - 1 :]


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0, max_new_tokens=12),
                                      Sampling(temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=12)])
@torch.no_grad()
def test_sampler_logprobs_match_the_trainers_recomputation(student, tokenizer, sampling):
    # On-policy ratio = 1 at step 0: p from generation == log π_θ recomputed by the trainer.
    student.eval()
    rollouts = HFRolloutEngine(student, tokenizer).generate(prompts(tokenizer), 2, sampling, seed=3)
    assert len(rollouts) == 8 and [r.prompt_index for r in rollouts] == [0, 0, 1, 1, 2, 2, 3, 3]
    for r in rollouts:
        torch.testing.assert_close(torch.tensor(r.sampler_logprobs), recompute(student, r, sampling), atol=2e-5, rtol=0)
    # and the logprob at τ = 0.5 differs from τ = 1 for the same tokens
    r = rollouts[0]
    at_half = recompute(student, r, Sampling(temperature=0.5))
    assert not torch.allclose(at_half, recompute(student, r, Sampling(temperature=1.0)))


@torch.no_grad()
def test_generation_stops_on_eos_and_reports_finish_reason(teacher, tokenizer):
    engine = HFRolloutEngine(teacher, tokenizer)
    done = engine.generate(prompts(tokenizer), 1, Sampling(greedy=True, max_new_tokens=40), seed=0)
    assert all(r.finish_reason == "stop" and r.completion_ids[-1] == tokenizer.eos_token_id for r in done)
    assert all(tokenizer.eos_token_id not in r.completion_ids[:-1] for r in done)
    cut = engine.generate(prompts(tokenizer), 1, Sampling(greedy=True, max_new_tokens=3), seed=0)
    assert all(r.finish_reason == "length" and len(r.completion_ids) == 3 for r in cut)


@torch.no_grad()
def test_left_padded_batch_generates_what_each_prompt_generates_alone(teacher, tokenizer):
    engine = HFRolloutEngine(teacher, tokenizer)
    ps = prompts(tokenizer, 6)
    assert len({len(p) for p in ps}) > 1  # different lengths, so the batch really is padded
    greedy = Sampling(greedy=True, max_new_tokens=30)
    batched = engine.generate(ps, 1, greedy, seed=0)
    for p, r in zip(ps, batched, strict=True):
        alone = engine.generate([p], 1, greedy, seed=0)[0]
        assert alone.completion_ids == r.completion_ids
        torch.testing.assert_close(torch.tensor(alone.sampler_logprobs), torch.tensor(r.sampler_logprobs), atol=1e-4, rtol=0)


@torch.no_grad()
def test_seeded_sampling_is_reproducible(student, tokenizer):
    engine = HFRolloutEngine(student, tokenizer)
    a = engine.generate(prompts(tokenizer), 2, Sampling(max_new_tokens=10), seed=7)
    b = engine.generate(prompts(tokenizer), 2, Sampling(max_new_tokens=10), seed=7)
    c = engine.generate(prompts(tokenizer), 2, Sampling(max_new_tokens=10), seed=8)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b] != [r.completion_ids for r in c]


@torch.no_grad()
def test_a_padded_embedding_never_samples_its_padding_rows(tokenizer):
    # Checkpoints pad the embedding past the tokenizer (151,936 rows for 151,665 Qwen2.5 tokens).
    # Here 64 extra rows of large random weights (tied: the lm_head too) take nearly all the
    # softmax mass, so a sampler over every output row would pick them almost surely.
    V = len(tokenizer)
    plain = load_model("tiny:student").eval()
    padded = load_model("tiny:student").eval()
    padded.resize_token_embeddings(V + 64, mean_resizing=False)
    padded.get_input_embeddings().weight[V:] = 10.0 * torch.randn(64, padded.config.hidden_size,
                                                                  generator=torch.Generator().manual_seed(0))
    ps = prompts(tokenizer)
    full_probs = torch.softmax(padded(input_ids=torch.tensor([ps[0]])).logits[0, -1], -1)
    assert full_probs.shape[0] == V + 64 and full_probs[V:].sum() > 0.9  # the trap is real
    sampling = Sampling(temperature=1.0, max_new_tokens=12)
    want = HFRolloutEngine(plain, tokenizer).generate(ps, 2, sampling, seed=5)
    got = HFRolloutEngine(padded, tokenizer).generate(ps, 2, sampling, seed=5)
    for w, g in zip(want, got, strict=True):
        assert max(g.completion_ids) < V
        assert g.completion_ids == w.completion_ids
        torch.testing.assert_close(torch.tensor(g.sampler_logprobs), torch.tensor(w.sampler_logprobs), atol=1e-5, rtol=0)


def test_inverse_cdf_sampling_draws_from_the_processed_distribution():
    # 40,000 rows of the same logits: empirical frequencies within 5 standard errors of
    # softmax(z / τ) after top-k = 3 (ids 3 and 4 are truncated and must never appear);
    # the reported logprob of each draw is that distribution's.
    logits_V = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    sampling = Sampling(temperature=0.7, top_k=3)
    z = logits_V / 0.7
    probs = torch.cat([torch.softmax(z[:3], -1), torch.zeros(2)])
    n = 40_000
    ids, logprobs = sample_next(logits_V.expand(n, 5).clone(), sampling, forbid_ids=None, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=5).double() / n
    assert freq[3] == 0 and freq[4] == 0
    stderr = (probs * (1 - probs) / n).sqrt().double()
    assert ((freq - probs.double()).abs() <= 5 * stderr + 1e-12).all(), (freq, probs)
    torch.testing.assert_close(logprobs, probs.log()[ids])
    # before min_new_tokens eos (here id 0, the likeliest) is removed and the rest renormalized
    ids, logprobs = sample_next(logits_V.expand(n, 5).clone(), Sampling(temperature=0.7), forbid_ids=0,
                                generator=torch.Generator().manual_seed(1))
    assert (ids != 0).all()
    torch.testing.assert_close(logprobs, torch.log_softmax(z[1:], -1)[ids - 1])


@torch.no_grad()
def test_min_new_tokens_gives_a_fixed_length_without_eos(student, tokenizer):
    rollouts = HFRolloutEngine(student, tokenizer).generate(prompts(tokenizer), 2, Sampling(max_new_tokens=9, min_new_tokens=9), seed=1)
    assert all(len(r.completion_ids) == 9 and r.finish_reason == "length" for r in rollouts)
    assert all(tokenizer.eos_token_id not in r.completion_ids for r in rollouts)


def test_scores_are_the_same_alone_or_in_a_padded_batch(teacher, student, tokenizer):
    ps = prompts(tokenizer, 5)
    completions = [tokenizer.encode(f"{i}+1={i + 1}\nFinal: {i + 1}" + "\n" * (3 * i), add_special_tokens=False)
                   for i in range(5)]
    for model in (teacher, student.eval()):
        batched = score_tokens(model, ps, completions, temperature=0.8, topk=3)
        for p, c, s in zip(ps, completions, batched, strict=True):
            alone = score_tokens(model, [p], [c], temperature=0.8, topk=3)[0]
            torch.testing.assert_close(s.logprobs_R, alone.logprobs_R, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(s.topk_logprobs_R_K, alone.topk_logprobs_R_K, atol=1e-5, rtol=1e-5)


def test_privileged_realignment_puts_each_teacher_logprob_on_its_student_token(teacher, tokenizer):
    # The teacher prompt is longer than the student's (a privileged hint); both see the same completion.
    student_prompt = render_prompt(tokenizer, [{"role": "user", "content": "33-85+40"}])
    teacher_prompt = render_prompt(tokenizer, [{"role": "user", "content": "hint: the answer is -12\n33-85+40"}])
    assert len(teacher_prompt) != len(student_prompt)
    completion = tokenizer.encode("33-85=-52\n-52+40=-12\nFinal: -12", add_special_tokens=False) + [tokenizer.eos_token_id]
    rollouts = [Rollout(prompt_ids=student_prompt, completion_ids=completion, sampler_logprobs=[-1.0] * len(completion),
                        finish_reason="stop", prompt_index=0, teacher_prompt_ids=teacher_prompt),
                Rollout(prompt_ids=student_prompt[:3], completion_ids=completion[:4], sampler_logprobs=[-1.0] * 4,
                        finish_reason="length", prompt_index=1, teacher_prompt_ids=teacher_prompt)]
    scores = HFTeacherScorer(teacher).score(rollouts, temperature=1.0)
    batch = collate(rollouts, scores, tokenizer.pad_token_id)
    # independent reference: the teacher's logprob of completion token j after teacher_prompt + completion[:j]
    with torch.no_grad():
        seq = torch.tensor([teacher_prompt + completion])
        ref = torch.log_softmax(teacher(input_ids=seq).logits[0].float(), -1)
    for j, token in enumerate(completion):
        t = len(student_prompt) - 1 + j  # student target position of completion token j
        assert batch.tokens_B_L[0, t + 1] == token
        assert batch.loss_mask_B_T[0, t] == 1
        assert batch.teacher_logprobs_B_T[0, t].item() == pytest.approx(ref[len(teacher_prompt) - 1 + j, token].item(), abs=1e-4)
    assert batch.loss_mask_B_T[0].sum() == len(completion)
    assert batch.loss_mask_B_T[0, : len(student_prompt) - 1].sum() == 0  # never a prompt token
    assert batch.loss_mask_B_T[1].sum() == 4 and batch.loss_mask_B_T[1, 2:6].sum() == 4  # row 1: its own span only
    assert (batch.teacher_logprobs_B_T[batch.loss_mask_B_T == 0] == 0).all()


def test_collate_rejects_a_teacher_score_of_the_wrong_length(teacher, tokenizer):
    p = render_prompt(tokenizer, [{"role": "user", "content": "1+2"}])
    r = Rollout(prompt_ids=p, completion_ids=[5, 6, 7], sampler_logprobs=[-1.0] * 3, finish_reason="length", prompt_index=0)
    scores = HFTeacherScorer(teacher).score([r], temperature=1.0)
    scores[0].logprobs_R = scores[0].logprobs_R[:2]
    with pytest.raises(ValueError, match="row 0: teacher scored 2 completion tokens, the rollout has 3"):
        collate([r], scores, tokenizer.pad_token_id)


def test_rollout_validates_its_lengths():
    with pytest.raises(ValueError, match="2 sampler logprobs for 3 completion tokens"):
        Rollout(prompt_ids=[1], completion_ids=[1, 2, 3], sampler_logprobs=[0.0, 0.0], finish_reason="stop", prompt_index=0)
    with pytest.raises(ValueError, match="finish_reason"):
        Rollout(prompt_ids=[1], completion_ids=[1], sampler_logprobs=[0.0], finish_reason="eos", prompt_index=0)
