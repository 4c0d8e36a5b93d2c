"""loss=student_topk_rkl: the exact reverse KL over the student's top-K ids plus one tail bucket (issue #23).

    L_t = Σ_k e^ℓ_k (ℓ_k - ν_k) + (1 - S)(log(1 - S) - log(1 - Q)),  S = Σ_k e^ℓ_k, Q = Σ_k e^ν_k
at the student's top-K ids: KL(π̃ ‖ q̃) of the (K+1)-bucket coarsenings (verl PR #7806, request #6676).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from opd.batch import collate
from opd.config import check_offpolicy_config, load_config
from opd.heads import linear_head
from opd.kernels import gathered_logprobs
from opd.losses_student_topk import student_topk_reverse_kl, student_topk_rkl_loss, student_topk_rkl_terms
from opd.metrics import read_metrics
from opd.models import load_model
from opd.objectives import student_topk_rkl_micro_loss, teacher_scores
from opd.rollout import Sampling
from opd.rollout.hf import HFRolloutEngine
from opd.tasks import arithmetic_examples
from opd.teacher import NEEDS_LOGPROBS_AT_IDS
from opd.teacher.hf import HFTeacherScorer, score_tokens
from opd.teacher.served import ServedTeacherScorer
from opd.tokenization import render_prompt
from opd.train import train

SMALL = ["prompts_per_step=4", "completions_per_prompt=2", "max_new_tokens=16", "eval_size=4", "train_size=32",
         "progress=false", "log_samples=0", "lr=1e-3", "preflight_noise=false"]


def prompts(tokenizer, n=3):
    return [render_prompt(tokenizer, ex.prompt) for ex in arithmetic_examples(n, "test")]


def full_reverse_kl(logits_N_V, teacher_N_V):
    log_p, log_q = F.log_softmax(logits_N_V, -1), F.log_softmax(teacher_N_V, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def naive(logits_N_V, ids_N_K, nu_N_K, mask_N, num_tokens, temperature=1.0):
    """The formula written out on the full log-softmax, no floor: the reference of the chunked path."""
    ell_N_K = F.log_softmax(logits_N_V / temperature, -1).gather(-1, ids_N_K)
    S, Q = ell_N_K.exp().sum(-1), nu_N_K.exp().sum(-1)
    L_N = (ell_N_K.exp() * (ell_N_K - nu_N_K)).sum(-1) + (1 - S) * (torch.log(1 - S) - torch.log(1 - Q))
    return (L_N * mask_N).sum() / num_tokens


def test_hand_values_for_k1_and_k2_over_three_tokens():
    # π = (1/2, 1/4, 1/4), q = (1/4, 1/2, 1/4). K = 1 (id 0): S = 1/2, Q = 1/4,
    #   L = 1/2 (log 1/2 - log 1/4) + 1/2 (log 1/2 - log 3/4) = 1/2 log 2 + 1/2 log(2/3) = 1/2 log(4/3).
    # K = 2 (ids 0, 1): S = Q = 3/4, L = 1/2 log 2 + 1/4 (log 1/4 - log 1/2) + 1/4 · 0 = 1/4 log 2, which is the
    #   full reverse KL 1/2 log 2 + 1/4 log(1/2) + 1/4 log 1: a one-token tail bucket loses nothing.
    logits = torch.tensor([[[0.5, 0.25, 0.25]]], dtype=torch.float64).log()
    nu_all = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64).log()
    mask = torch.ones(1, 1)
    for ids, want, s, q in (([0], 0.5 * math.log(4 / 3), 0.5, 0.25), ([0, 1], 0.25 * math.log(2), 0.75, 0.75)):
        ids_1_1_K = torch.tensor([[ids]])
        loss, metrics = student_topk_rkl_loss(logits, ids_1_1_K, nu_all[ids_1_1_K], mask, 1)
        assert loss.item() == pytest.approx(want, abs=1e-12)
        assert metrics["opd/student_topk_rkl"].item() == pytest.approx(want, abs=1e-6)
        assert metrics["opd/student_topk_mass"].item() == pytest.approx(s, abs=1e-6)
        assert metrics["opd/teacher_mass_at_student_topk"].item() == pytest.approx(q, abs=1e-6)
    assert full_reverse_kl(logits[0], nu_all[None]).item() == pytest.approx(0.25 * math.log(2), abs=1e-12)


def test_nonnegative_equal_to_the_full_reverse_kl_at_k_equal_v_and_below_it_for_smaller_k():
    gen = torch.Generator().manual_seed(0)
    N, V = 64, 7
    logits = torch.randn(N, V, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(N, V, generator=gen, dtype=torch.float64) * 2
    full_N = full_reverse_kl(logits, teacher)
    log_p, log_q = F.log_softmax(logits, -1), F.log_softmax(teacher, -1)
    for K in range(1, V + 1):
        ids_N_K = log_p.topk(K, -1).indices
        L_N, S_N, Q_N = student_topk_reverse_kl(log_p.gather(-1, ids_N_K), log_q.gather(-1, ids_N_K))
        assert (L_N >= 0).all()
        assert (L_N <= full_N + 1e-12).all()  # data processing: merging ids never raises a KL
        assert (S_N <= 1 + 1e-12).all() and (Q_N <= 1 + 1e-12).all()
        if K >= V - 1:  # a tail of one id or none is no coarsening
            torch.testing.assert_close(L_N, full_N, rtol=0, atol=1e-12)
    assert (student_topk_reverse_kl(log_p[:, :3], log_p[:, :3])[0] == 0).all()  # the same model: 0


def test_gradient_passes_finite_differences_in_double_precision():
    gen = torch.Generator().manual_seed(1)
    B, T, V, K = 2, 3, 6, 3
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = F.log_softmax(logits.detach(), -1).topk(K, -1).indices
    nu = F.log_softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1).gather(-1, ids)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.autograd.gradcheck(lambda z: student_topk_rkl_loss(z, ids, nu, mask, 3, 0.8, chunk_size=2)[0],
                                    (logits,))
    # the kernel path training takes: features and a linear head
    features = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    ids_N_K = (features.detach() @ weight.detach().T).topk(K, -1).indices
    nu_N_K = F.log_softmax(torch.randn(5, V, generator=gen, dtype=torch.float64), -1).gather(-1, ids_N_K)
    mask_N = torch.ones(5)

    def kernel(f, w):
        ell = gathered_logprobs(f, linear_head(w), ids_N_K, 0.7, chunk_size=2)
        return student_topk_rkl_terms(ell, nu_N_K, mask_N, 5)[0]
    assert torch.autograd.gradcheck(kernel, (features, weight))


def test_chunked_kernel_equals_the_naive_formula_in_value_and_gradient():
    gen = torch.Generator().manual_seed(2)
    N, H, V, K = 11, 8, 13, 4
    features = torch.randn(N, H, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = (features.detach() @ weight.detach().T).topk(K, -1).indices
    nu = F.log_softmax(torch.randn(N, V, generator=gen, dtype=torch.float64), -1).gather(-1, ids)
    mask = (torch.arange(N) % 4 != 3).double()
    ell = gathered_logprobs(features, linear_head(weight), ids, 0.9, chunk_size=3)
    ours = student_topk_rkl_terms(ell, nu, mask, 20)[0]
    got = torch.autograd.grad(ours, (features, weight))
    ref = naive(features @ weight.T, ids, nu, mask, 20, 0.9)
    want = torch.autograd.grad(ref, (features, weight))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_garbage_at_masked_positions_never_reaches_the_loss_or_a_gradient():
    gen = torch.Generator().manual_seed(3)
    B, T, V, K = 2, 4, 9, 3
    clean = torch.randn(B, T, V, generator=gen)
    ids = F.log_softmax(clean, -1).topk(K, -1).indices
    nu = F.log_softmax(torch.randn(B, T, V, generator=gen), -1).gather(-1, ids)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    dirty, dirty_ids, dirty_nu = clean.clone(), ids.clone(), nu.clone()
    off = mask == 0
    dirty[off] = float("nan")
    dirty_ids[off] = -7  # out of range: never read
    dirty_nu[off] = float("nan")
    dirty_nu[0, 0] = float("inf")
    results = []
    for z, i, n in ((clean, ids, nu), (dirty, dirty_ids, dirty_nu)):
        z = z.clone().requires_grad_(True)
        loss, metrics = student_topk_rkl_loss(z, i, n, mask, 4, chunk_size=3)
        loss.backward()
        results.append((loss, metrics, z.grad))
    (loss_a, m_a, g_a), (loss_b, m_b, g_b) = results
    assert torch.isfinite(loss_b) and torch.equal(loss_a, loss_b)
    assert all(torch.equal(m_a[k], m_b[k]) for k in m_a)
    assert torch.isfinite(g_b).all() and torch.equal(g_a, g_b) and (g_b[off] == 0).all()
    bad = nu.clone()
    bad[0, 1, 0] = float("-inf")  # at an active position: an infinite KL, refused
    with pytest.raises(ValueError, match="is not finite"):
        student_topk_rkl_loss(clean, ids, bad, mask, 4)
    with pytest.raises(ValueError, match="student top-k id 99"):
        student_topk_rkl_loss(clean, ids.index_fill(2, torch.tensor([0]), 99), nu, mask, 4)


@torch.no_grad()
def test_recorded_ids_are_the_topk_of_the_students_recomputed_logprobs(student, tokenizer):
    # The ids come from the distribution each token was drawn from (z / τ): the trainer's recomputation on the
    # sampled sequence ranks the same ids first, in order (τ > 0 never changes a ranking).
    student.eval()
    sampling = Sampling(temperature=0.7, max_new_tokens=10, record_topk=5)
    rollouts = HFRolloutEngine(student, tokenizer).generate(prompts(tokenizer), 2, sampling, seed=1)
    for r in rollouts:
        assert len(r.sampler_topk_ids) == len(r.completion_ids) and all(len(ids) == 5 for ids in r.sampler_topk_ids)
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        logprobs_R_V = torch.log_softmax(student(input_ids=ids).logits[0, len(r.prompt_ids) - 1 : -1].float() / 0.7, -1)
        assert torch.equal(torch.tensor(r.sampler_topk_ids), logprobs_R_V.topk(5, dim=-1).indices)
    plain = HFRolloutEngine(student, tokenizer).generate(prompts(tokenizer), 2, Sampling(temperature=0.7,
                                                                                        max_new_tokens=10), seed=1)
    assert [r.completion_ids for r in plain] == [r.completion_ids for r in rollouts]  # recording draws nothing
    assert all(r.sampler_topk_ids is None for r in plain)
    with pytest.raises(ValueError, match="exceeds the student's vocabulary"):
        HFRolloutEngine(student, tokenizer).generate(prompts(tokenizer, 1), 1,
                                                     Sampling(max_new_tokens=2, record_topk=len(tokenizer) + 1), seed=0)


def test_teacher_gather_batch_and_objective_equal_the_spec_on_real_models(student, teacher, tokenizer):
    config = load_config(None, ["loss=student_topk_rkl", "student_topk=6", "temperature=0.9", "loss_temperature=0.8"])
    with torch.no_grad():
        rollouts = HFRolloutEngine(student, tokenizer).generate(prompts(tokenizer), 2, config.sampling, seed=0)
    scores = teacher_scores(HFTeacherScorer(teacher, vocab_size=len(tokenizer)), rollouts, config)
    plain = score_tokens(teacher, [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], 0.9)
    for r, s, p in zip(rollouts, scores, plain, strict=True):  # q stays at τ; ν at loss_temperature, one gather
        torch.testing.assert_close(s.logprobs_R, p.logprobs_R, rtol=0, atol=1e-5)
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        want = torch.log_softmax(teacher(input_ids=ids).logits[0, len(r.prompt_ids) - 1 : -1].float() / 0.8, -1)
        torch.testing.assert_close(s.logprobs_at_sampler_topk_R_K, want.gather(-1, torch.tensor(r.sampler_topk_ids)),
                                   rtol=2e-6, atol=2e-5)
    batch = collate(rollouts, scores, pad_id=0)
    off = batch.loss_mask_B_T == 0
    assert (batch.student_topk_ids_B_T_K[off] == 0).all()
    assert (batch.teacher_logprobs_at_student_topk_B_T_K[off] == float("-inf")).all()
    assert torch.equal(batch.select(slice(1, 3)).student_topk_ids_B_T_K, batch.student_topk_ids_B_T_K[1:3])
    N = batch.num_tokens
    loss, metrics = student_topk_rkl_micro_loss(student, batch, config, N, len(tokenizer))
    logits = student(input_ids=batch.tokens_B_L, attention_mask=batch.attention_mask_B_L).logits[:, :-1]
    spec, spec_metrics = student_topk_rkl_loss(logits, batch.student_topk_ids_B_T_K,
                                               batch.teacher_logprobs_at_student_topk_B_T_K, batch.loss_mask_B_T, N, 0.8)
    torch.testing.assert_close(loss, spec, rtol=1e-4, atol=1e-6)
    assert set(metrics) == {"opd/student_topk_rkl", "opd/student_topk_mass", "opd/teacher_mass_at_student_topk"}
    assert 0 < metrics["opd/student_topk_mass"] <= 1 and 0 < metrics["opd/teacher_mass_at_student_topk"] <= 1
    torch.testing.assert_close(metrics["opd/student_topk_rkl"], spec_metrics["opd/student_topk_rkl"], rtol=1e-4, atol=1e-6)
    scores[0].logprobs_at_sampler_topk_R_K = scores[0].logprobs_at_sampler_topk_R_K.clone()  # inference tensors
    scores[0].logprobs_at_sampler_topk_R_K[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"row 0: teacher logprob at the student's top-k ids .* positions \[1\]"):
        collate(rollouts, scores, pad_id=0)


@pytest.mark.parametrize(("overrides", "message"), [
    (["student_topk=0"], "student_topk must be >= 1"),
    (["top_k=5"], "top_k/top_p truncation is only supported with loss=reverse_kl"),
    (["top_p=0.9"], "top_k/top_p truncation is only supported with loss=reverse_kl"),
    (["teacher_backend=served", "teacher_url=http://localhost:1"], "teacher_backend=served returns only its own top-k"),
    (["teacher_backend=vllm"], "teacher_backend=vllm returns only its own top-k"),
    (["teachers={a: {path: 'tiny:teacher'}, b: {path: 'tiny:teacher', backend: served, url: 'http://h:1'}}",
      "default_teacher=a"], "teachers.b.backend=served returns only its own top-k"),
    (["rollout_backend=vllm"], "only rollout_backend=hf records"),
])
def test_config_refuses_what_cannot_give_the_student_topk_or_the_teacher_at_it(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, ["loss=student_topk_rkl", *overrides])


def test_off_policy_and_remote_scorers_refuse_it_with_the_fix():
    config = load_config(None, ["loss=student_topk_rkl"])
    with pytest.raises(ValueError, match="only act in the on-policy loop"):
        check_offpolicy_config(config)  # opd train-offpolicy loss=student_topk_rkl
    with pytest.raises(ValueError, match="use an in-process teacher"):
        ServedTeacherScorer("http://localhost:1", "teacher").score([], 1.0, at_sampler_topk=True)
    assert "teacher_backend=hf" in NEEDS_LOGPROBS_AT_IDS


def test_a_student_topk_above_the_vocabulary_stops_before_step_one(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=f"student_topk={len(tokenizer) + 1} exceeds the student's vocabulary"):
        train(load_config(None, [*SMALL, "loss=student_topk_rkl", f"student_topk={len(tokenizer) + 1}", "steps=1",
                                 f"out_dir={tmp_path / 'r'}"]))


def test_three_steps_train_the_student_with_finite_metrics(tmp_path):
    before = {k: v.clone() for k, v in load_model("tiny:student").state_dict().items()}
    run_dir = train(load_config(None, [*SMALL, "loss=student_topk_rkl", "student_topk=8", "steps=3", "eval_every=0",
                                       "save_every=0", "preflight_noise=true", f"out_dir={tmp_path / 'r'}"]))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert "preflight/teacher_noise_rms" in records[0]  # the pre-flight's replayed batch kept its recorded ids
    for r in records[1:]:
        assert all(math.isfinite(v) for v in r.values()), r
        assert r["opd/student_topk_rkl"] > 0 and r["train/grad_norm"] > 0
        assert 0 < r["opd/student_topk_mass"] <= 1 and 0 < r["opd/teacher_mass_at_student_topk"] <= 1
        assert r["train/loss"] == pytest.approx(r["opd/student_topk_rkl"], rel=1e-4)  # one micro-batch, one rank
        assert "opd/topk_forward_kl" not in r and "opd/jsd" not in r
    after = load_model(str(run_dir / "final")).state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before)
