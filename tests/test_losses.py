"""opd.losses: hand-derived values, chunked vs naive references, NaN safety, micro-batch invariance."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.losses import (
    cross_entropy_loss,
    generalized_jsd_loss,
    grpo_advantages,
    importance_sampling_loss,
    opsm_mask,
    ppo_clip_loss,
    reverse_kl_advantages,
    topk_forward_kl_loss,
)

NAN, INF = float("nan"), float("inf")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- naive references (independent of the library's chunked code) ------------------------------

def naive_topk_kl(logits_B_T_V, ids_B_T_K, nu_B_T_K, mask_B_T, num_tokens, temperature=1.0, tail_bucket=False):
    ell = F.log_softmax(logits_B_T_V / temperature, dim=-1).gather(-1, ids_B_T_K)
    finite = torch.isfinite(nu_B_T_K)
    per_token = torch.where(finite, nu_B_T_K.exp() * (nu_B_T_K - ell), 0.0).sum(-1)
    if tail_bucket:
        tail_t = 1 - torch.where(finite, nu_B_T_K.exp(), 0.0).sum(-1)
        tail_s = 1 - torch.where(finite, ell.exp(), 0.0).sum(-1)
        per_token = per_token + tail_t * (tail_t.log() - tail_s.log())
    return (per_token * mask_B_T).sum() / num_tokens


def naive_jsd(student_B_T_V, teacher_B_T_V, mask_B_T, num_tokens, beta, temperature=1.0):
    log_s = F.log_softmax(student_B_T_V / temperature, dim=-1)
    log_t = F.log_softmax(teacher_B_T_V / temperature, dim=-1)
    if beta == 0.0:  # F.kl_div(input, target) = KL(target || input)
        per_token = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    elif beta == 1.0:
        per_token = F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1)
    else:
        log_m = (beta * log_t.exp() + (1 - beta) * log_s.exp()).log()
        per_token = (beta * F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)
                     + (1 - beta) * F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1))
    return (per_token * mask_B_T).sum() / num_tokens


# ---- sampled-token OPD: advantages and the importance-sampling loss -----------------------------

def test_reverse_kl_advantages_hand_values():
    # p = [-1, -2], q = [-1.5, -1], c = 1: A = -(p - q) = [-0.5, 1]; masked slot (NaN garbage) -> 0.
    p = torch.tensor([[-1.0, -2.0, NAN]])
    q = torch.tensor([[-1.5, -1.0, INF]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.equal(reverse_kl_advantages(p, q, m), torch.tensor([[-0.5, 1.0, 0.0]]))
    # c = 2 doubles it.
    assert torch.equal(reverse_kl_advantages(p, q, m, kl_coef=2.0), torch.tensor([[-1.0, 2.0, 0.0]]))


def test_reverse_kl_advantages_discounted_stays_within_each_completion():
    # Row 0: prompt slot, 3 completion terms -(p - q) = [-0.5, 1, 0.25], then padding. γ = 0.5:
    # A3 = 0.25; A2 = 1 + 0.5 * 0.25 = 1.125; A1 = -0.5 + 0.5 * 1.125 = 0.0625.
    # Row 1: terms [-(-1 - -3), -(-2 - -1)] = [-2, 1] from t = 0: A1 = 1, A0 = -2 + 0.5 * 1 = -1.5; no row 0 leak.
    p = torch.tensor([[NAN, -1.0, -2.0, -0.5, 7.0], [-1.0, -2.0, NAN, 0.0, 0.0]])
    q = torch.tensor([[NAN, -1.5, -1.0, -0.25, 3.0], [-3.0, -1.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    got = reverse_kl_advantages(p, q, m, discount=0.5)
    assert torch.equal(got, torch.tensor([[0.0, 0.0625, 1.125, 0.25, 0.0], [-1.5, 1.0, 0.0, 0.0, 0.0]]))


def test_importance_sampling_loss_on_policy_value_and_grad():
    # At log π = p: loss = Σ m c (p - q) / N = (0.5 + -1) / 2 = -0.25,
    # and ∂L/∂log π = c (p - q) / N = [0.25, -0.5].
    p = torch.tensor([[-1.0, -2.0, NAN]])
    q = torch.tensor([[-1.5, -1.0, NAN]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    student = p.clone().requires_grad_(True)
    loss, metrics = importance_sampling_loss(student, p, reverse_kl_advantages(p, q, m), m, num_tokens=2)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == pytest.approx(-0.25)
    assert torch.equal(grad, torch.tensor([[0.25, -0.5, 0.0]]))
    assert metrics["opd/is_ratio"].item() == 1.0 and metrics["opd/is_capped_fraction"].item() == 0.0
    assert metrics["opd/advantage"].item() == 0.25 and metrics["opd/abs_advantage"].item() == 0.75
    assert not any(v.requires_grad for v in metrics.values())


def test_importance_sampling_loss_off_policy_and_cap():
    # log π - p = [ln 2, 1], A = [-0.5, 1], N = 4 (other micro-batches hold 2 more tokens):
    # loss = -(2 * -0.5 + e * 1) / 4; with cap 0.8 (> ln 2) the second ratio is e^0.8 and has zero gradient.
    p = torch.tensor([[-1.0, -2.0]])
    a = torch.tensor([[-0.5, 1.0]])
    m = torch.ones(1, 2)
    student = (p + torch.tensor([[math.log(2.0), 1.0]])).requires_grad_(True)
    loss, _ = importance_sampling_loss(student, p, a, m, 4)
    assert loss.item() == pytest.approx(-(2 * -0.5 + math.e) / 4)
    loss, metrics = importance_sampling_loss(student, p, a, m, 4, log_ratio_cap=0.8)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == pytest.approx(-(2 * -0.5 + math.exp(0.8)) / 4)
    assert grad[0, 0].item() == pytest.approx(-2 * -0.5 / 4) and grad[0, 1].item() == 0.0
    assert metrics["opd/is_capped_fraction"].item() == 0.5


def test_importance_sampling_loss_finite_differences_with_garbage_at_masked_slots():
    gen = _gen(0)
    student = (torch.randn(2, 5, dtype=torch.float64, generator=gen) - 2).requires_grad_(True)
    sampler = torch.randn(2, 5, dtype=torch.float64, generator=gen) - 2
    adv = torch.randn(2, 5, dtype=torch.float64, generator=gen)
    m = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float64)
    with torch.no_grad():
        for t in (sampler, adv, student):
            t[m == 0] = NAN
    assert torch.autograd.gradcheck(lambda s: importance_sampling_loss(s, sampler, adv, m, 7)[0], (student,))


def test_ppo_clip_loss_hand_values():
    # r = [1.5, 0.5], A = [1, -1], ε = 0.2: min(1.5, 1.2) = 1.2 and min(-0.5, -0.8) = -0.8, both clipped:
    # loss = -(1.2 - 0.8) / 2 = -0.2, zero gradient, clip fraction 1.
    old = torch.log(torch.tensor([[0.2, 0.4, NAN]]))  # garbage at the masked slot
    m = torch.tensor([[1.0, 1.0, 0.0]])
    student = (old + torch.log(torch.tensor([[1.5, 0.5, 1.0]]))).requires_grad_(True)
    loss, metrics = ppo_clip_loss(student, old, torch.tensor([[1.0, -1.0, NAN]]), m, 2)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == pytest.approx(-0.2) and torch.equal(grad, torch.zeros(1, 3))
    assert metrics["opd/ppo_clip_fraction"].item() == 1.0
    # r = [1.1, 0.5], A = [1, 1]: min(1.1, 1.1) = 1.1, min(0.5, 0.8) = 0.5, unclipped:
    # loss = -(1.1 + 0.5) / 2 = -0.8, ∂L/∂log π = -r A / N = [-0.55, -0.25].
    student = (old + torch.log(torch.tensor([[1.1, 0.5, 1.0]]))).requires_grad_(True)
    loss, metrics = ppo_clip_loss(student, old, torch.tensor([[1.0, 1.0, 0.0]]), m, 2)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == pytest.approx(-0.8)
    torch.testing.assert_close(grad, torch.tensor([[-0.55, -0.25, 0.0]]))
    assert metrics["opd/ppo_clip_fraction"].item() == 0.0


# ---- teacher top-k forward KL ------------------------------------------------------------------

def test_topk_forward_kl_hand_values():
    # Student logits 0 over V = 3: ℓ = ln(1/3). Teacher top-2 ν = [ln 0.5, ln 0.25], mass 0.75.
    # L = 0.5 ln(0.5 * 3) + 0.25 ln(0.25 * 3); tail bucket adds 0.25 (ln 0.25 - ln(1/3)) = 0.25 ln 0.75.
    logits = torch.zeros(1, 1, 3)
    ids = torch.tensor([[[0, 1]]])
    nu = torch.tensor([[[0.5, 0.25]]]).log()
    m = torch.ones(1, 1)
    expected = 0.5 * math.log(1.5) + 0.25 * math.log(0.75)
    loss, metrics = topk_forward_kl_loss(logits, ids, nu, m, 1, sampled_ids_B_T=torch.tensor([[1]]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["opd/teacher_topk_mass"].item() == pytest.approx(0.75)
    assert metrics["opd/sampled_token_in_topk"].item() == 1.0
    loss, _ = topk_forward_kl_loss(logits, ids, nu, m, 1, tail_bucket=True)
    assert loss.item() == pytest.approx(expected + 0.25 * math.log(0.75), abs=1e-6)


def test_topk_forward_kl_neg_inf_teacher_slot_over_neg_inf_student_contributes_zero():
    # Slot 2: ν = -inf and student logit -inf (ℓ = -inf). Only slot 0 counts: 1 * (0 - ln 0.5) = ln 2.
    logits = torch.tensor([[[0.0, 0.0, -INF]]], requires_grad=True)
    ids, nu = torch.tensor([[[0, 2]]]), torch.tensor([[[0.0, -INF]]])
    loss, _ = topk_forward_kl_loss(logits, ids, nu, torch.ones(1, 1), 1, tail_bucket=True)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[[-0.5, 0.5, 0.0]]]))  # softmax - onehot(0)


@pytest.mark.parametrize(("temperature", "tail_bucket"), [(1.0, False), (0.6, False), (1.4, True)])
def test_topk_forward_kl_chunked_matches_naive(temperature, tail_bucket):
    gen = _gen(1)
    B, T, V, K = 2, 9, 23, 5
    logits = (torch.randn(B, T, V, generator=gen) * 2).requires_grad_(True)
    teacher = F.log_softmax(torch.randn(B, T, V, generator=gen) * 2 / temperature, -1)
    nu, ids = teacher.topk(K, dim=-1)
    nu[0, 0, -1] = -INF
    m = (torch.rand(B, T, generator=gen) > 0.3).float()
    ours, _ = topk_forward_kl_loss(logits, ids, nu, m, m.sum(), temperature, tail_bucket, chunk_size=4)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ref = naive_topk_kl(logits, ids, nu, m, m.sum(), temperature, tail_bucket)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-7)
    other, _ = topk_forward_kl_loss(logits, ids, nu, m, m.sum(), temperature * 2, tail_bucket, chunk_size=4)
    assert abs(other.item() - ours.item()) > 1e-3  # the student side really uses τ


def test_topk_forward_kl_garbage_at_masked_positions_never_reaches_loss_or_grad():
    gen = _gen(2)
    logits = torch.randn(2, 4, 6, generator=gen)
    ids = torch.randint(0, 6, (2, 4, 3), generator=gen)
    nu = torch.full((2, 4, 3), -1.5)
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    logits[m == 0] = NAN
    logits[0, 3, 2] = INF
    ids[m == 0] = 0
    nu[m == 0] = -INF
    nu[1, 3] = NAN
    logits.requires_grad_(True)
    loss, metrics = topk_forward_kl_loss(logits, ids, nu, m, 4, tail_bucket=True, chunk_size=3)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.equal(grad[m == 0], torch.zeros(4, 6))
    assert all(torch.isfinite(v) for v in metrics.values())


def test_topk_forward_kl_rejects_out_of_range_ids_at_active_positions_only():
    logits, nu = torch.zeros(1, 2, 5), torch.full((1, 2, 2), -1.0)
    ids = torch.tensor([[[0, 7], [1, 99]]])
    with pytest.raises(ValueError, match="id 7 .*\\[0, 5\\)"):
        topk_forward_kl_loss(logits, ids, nu, torch.ones(1, 2), 2)
    with pytest.raises(ValueError, match="id -3"):
        topk_forward_kl_loss(logits, ids.clamp(max=4).index_fill(2, torch.tensor([0]), -3), nu, torch.ones(1, 2), 2)
    nu[0, 1] = -INF
    loss, _ = topk_forward_kl_loss(logits, ids.clamp(max=4).index_fill(1, torch.tensor([1]), 99), nu,
                                   torch.tensor([[1.0, 0.0]]), 1)
    assert torch.isfinite(loss)


def test_topk_forward_kl_metrics_sampled_token_in_topk():
    # Two active tokens: sampled 2 is in {2, 3}; sampled 0 is not in {1, 4}. A masked third token is ignored.
    logits, nu = torch.zeros(1, 3, 5), torch.full((1, 3, 2), -1.0)
    ids = torch.tensor([[[2, 3], [1, 4], [0, 0]]])
    _, metrics = topk_forward_kl_loss(logits, ids, nu, torch.tensor([[1.0, 1.0, 0.0]]), 2,
                                      sampled_ids_B_T=torch.tensor([[2, 0, 0]]))
    assert metrics["opd/sampled_token_in_topk"].item() == 0.5
    assert metrics["opd/teacher_topk_mass"].item() == pytest.approx(2 * math.exp(-1.0))


# ---- generalized JSD ---------------------------------------------------------------------------

def test_jsd_hand_values():
    # P_S = [1/2, 1/2] (logits 0, 0), P_T = [1/4, 3/4] (logits 0, ln 3).
    student = torch.zeros(1, 1, 2)
    teacher = torch.tensor([[[0.0, math.log(3.0)]]])
    m = torch.ones(1, 1)
    forward_kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)  # KL(P_T || P_S)
    reverse_kl = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)  # KL(P_S || P_T)
    # β = 0.5: M = [3/8, 5/8].
    jsd = 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)) \
        + 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625))
    for beta, expected in [(0.0, forward_kl), (1.0, reverse_kl), (0.5, jsd)]:
        loss, metrics = generalized_jsd_loss(student, teacher, m, 1, beta=beta)
        assert loss.item() == pytest.approx(expected, abs=1e-6), beta
        assert metrics["opd/jsd"].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("beta", "temperature"), [(0.0, 1.0), (1.0, 1.0), (0.5, 1.0), (0.1, 0.7), (0.9, 1.5)])
def test_jsd_chunked_matches_naive_value_and_grad(beta, temperature):
    gen = _gen(3)
    B, T, V = 3, 7, 29
    student = (torch.randn(B, T, V, generator=gen) * 2).requires_grad_(True)
    teacher = torch.randn(B, T, V, generator=gen) * 2
    m = (torch.rand(B, T, generator=gen) > 0.3).float()
    ours, _ = generalized_jsd_loss(student, teacher, m, m.sum(), beta, temperature, chunk_size=4)
    (grad_ours,) = torch.autograd.grad(ours, student)
    ref = naive_jsd(student, teacher, m, m.sum(), beta, temperature)
    (grad_ref,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-7)


def test_jsd_gradcheck_float64():
    gen = _gen(4)
    student = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen)
    m = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    for beta in (0.0, 0.3, 1.0):  # 4 active rows in chunks of 3: one full and one ragged chunk
        assert torch.autograd.gradcheck(lambda s, b=beta: generalized_jsd_loss(s, teacher, m, 4, b, 0.8, 3)[0], (student,))


def test_jsd_temperature_applies_to_both_sides():
    gen = _gen(5)
    student, teacher = torch.randn(2, 4, 11, generator=gen), torch.randn(2, 4, 11, generator=gen)
    m = torch.ones(2, 4)
    at_tau, _ = generalized_jsd_loss(student, teacher, m, 8, beta=0.5, temperature=0.6)
    rescaled = naive_jsd(student / 0.6, teacher / 0.6, m, 8, beta=0.5)
    at_one, _ = generalized_jsd_loss(student, teacher, m, 8, beta=0.5, temperature=1.0)
    torch.testing.assert_close(at_tau, rescaled, rtol=1e-5, atol=1e-7)
    assert abs(at_tau.item() - at_one.item()) > 1e-3


def test_jsd_padded_vocabularies_compare_the_shared_range():
    # Teacher 8 + 4 padding columns, student 8: only the shared 8 count (the padding is huge on purpose).
    gen = _gen(6)
    student = torch.randn(2, 3, 8, generator=gen).requires_grad_(True)
    teacher = torch.cat([torch.randn(2, 3, 8, generator=gen), torch.full((2, 3, 4), 50.0)], dim=-1)
    m = torch.ones(2, 3)
    ours, _ = generalized_jsd_loss(student, teacher, m, 6, beta=0.3)
    (grad,) = torch.autograd.grad(ours, student)
    ref = naive_jsd(student, teacher[..., :8], m, 6, beta=0.3)
    (grad_ref,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad, grad_ref)
    # Student 8 + 2 padding columns, teacher 8: the padding gets no gradient.
    padded = torch.cat([student.detach(), torch.full((2, 3, 2), 50.0)], dim=-1).requires_grad_(True)
    ours, _ = generalized_jsd_loss(padded, teacher[..., :8], m, 6, beta=0.3)
    (grad,) = torch.autograd.grad(ours, padded)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad[..., :8], grad_ref)
    assert torch.equal(grad[..., 8:], torch.zeros(2, 3, 2))


@pytest.mark.parametrize(("beta", "temperature"), [(0.0, 1.0), (0.4, 0.7), (1.0, 1.0)])
def test_jsd_on_active_rows_equals_the_masked_batch(beta, temperature):
    # Training hands the loss only the active rows, `[N, V]` with an all-ones mask (its chunks are then
    # views and every gradient entry is written). The value and each row's gradient must equal those of
    # the `[B, T, V]` batch with its mask, including a padded student vocabulary (padding: zero gradient)
    # and 2-D rows with inactive ones between them (NaN there, the gathered-index path).
    gen = _gen(12)
    B, T, V = 3, 5, 11
    student = torch.randn(B, T, V + 2, generator=gen) * 2
    teacher = torch.randn(B, T, V, generator=gen) * 2
    m = (torch.rand(B, T, generator=gen) > 0.4).float()
    active, n = m > 0, m.sum()
    batch = student.clone().requires_grad_(True)
    ref, ref_metrics = generalized_jsd_loss(batch, teacher, m, n, beta, temperature, chunk_size=3)
    (grad_ref,) = torch.autograd.grad(ref, batch)
    for width in (V, V + 2):
        rows = student[active][:, :width].clone().requires_grad_(True)
        ours, metrics = generalized_jsd_loss(rows, teacher[active], m[active], n, beta, temperature, chunk_size=3)
        (grad,) = torch.autograd.grad(ours, rows)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(metrics["opd/jsd"], ref_metrics["opd/jsd"])
        torch.testing.assert_close(grad, grad_ref[active][:, :width], rtol=1e-6, atol=1e-8)
    flat = student[..., :V].reshape(B * T, V).clone()
    flat[~active.flatten()] = NAN
    flat.requires_grad_(True)
    ours, _ = generalized_jsd_loss(flat, teacher.reshape(B * T, V), m.flatten(), n, beta, temperature, chunk_size=3)
    (grad,) = torch.autograd.grad(ours, flat)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.reshape(B, T, V), grad_ref[..., :V], rtol=1e-6, atol=1e-8)


def test_jsd_nonnegative_for_bf16_inputs():
    gen = _gen(7)
    student = (torch.randn(4, 6, 50, generator=gen) * 3).bfloat16().requires_grad_(True)
    teacher = (student.detach().float() + 0.01 * torch.randn(4, 6, 50, generator=gen)).bfloat16()
    m = torch.ones(4, 6)
    for beta in (0.0, 0.5, 1.0):
        for t in (teacher, student.detach()):  # nearly equal and exactly equal distributions
            loss, metrics = generalized_jsd_loss(student, t, m, 24, beta=beta)
            (grad,) = torch.autograd.grad(loss, student)
            assert loss.item() >= 0.0 and metrics["opd/jsd"].item() >= 0.0
            assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()


def test_jsd_garbage_rows_at_masked_positions_never_reach_loss_or_grad():
    gen = _gen(8)
    student, teacher = torch.randn(2, 4, 7, generator=gen), torch.randn(2, 4, 7, generator=gen)
    m = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    student[m == 0], teacher[m == 0] = NAN, -INF
    student[0, 1, 0] = INF
    student.requires_grad_(True)
    loss, _ = generalized_jsd_loss(student, teacher, m, 5, beta=0.5)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.equal(grad[m == 0], torch.zeros(3, 7))


def test_jsd_rejects_bad_inputs():
    s, t, m = torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2)
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            generalized_jsd_loss(s, t, m, 2, beta=beta)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd_loss(s, t, m, 2, temperature=0.0)
    with pytest.raises(ValueError, match="shapes disagree"):
        generalized_jsd_loss(s, torch.zeros(1, 3, 3), m, 2)


# ---- every loss: N = 0 and shape checks ---------------------------------------------------------

def test_every_loss_with_zero_tokens_is_exact_zero_with_zero_grad():
    m = torch.zeros(2, 3)
    logp = torch.full((2, 3), NAN, requires_grad=True)
    logits = torch.full((2, 3, 5), NAN, requires_grad=True)
    garbage = torch.full((2, 3), NAN)
    cases = {
        "is": (logp, importance_sampling_loss(logp, garbage, garbage, m, 0)[0]),
        "ppo": (logp, ppo_clip_loss(logp, garbage, garbage, m, 0)[0]),
        "topk": (logits, topk_forward_kl_loss(logits, torch.zeros(2, 3, 2, dtype=torch.long),
                                              torch.full((2, 3, 2), -INF), m, 0, tail_bucket=True)[0]),
        "jsd": (logits, generalized_jsd_loss(logits, torch.full((2, 3, 5), NAN), m, 0)[0]),
    }
    for name, (leaf, loss) in cases.items():
        (grad,) = torch.autograd.grad(loss, leaf)
        assert loss.item() == 0.0, name
        assert torch.equal(grad, torch.zeros_like(grad)), name


def test_losses_reject_mismatched_shapes_and_temperature():
    a, b = torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="shapes must match"):
        importance_sampling_loss(a, b, a, a, 1)
    with pytest.raises(ValueError, match="shapes must match"):
        ppo_clip_loss(a, a, a, b, 1)
    with pytest.raises(ValueError, match="shapes must match"):
        reverse_kl_advantages(a, b, a)
    with pytest.raises(ValueError, match="shapes disagree"):
        topk_forward_kl_loss(torch.zeros(2, 3, 5), torch.zeros(2, 4, 2, dtype=torch.long), torch.zeros(2, 4, 2), a, 1)
    with pytest.raises(ValueError, match="temperature"):
        topk_forward_kl_loss(torch.zeros(2, 3, 5), torch.zeros(2, 3, 2, dtype=torch.long), torch.zeros(2, 3, 2), a, 1,
                             temperature=-1.0)


# ---- cross-entropy on given completions (the off-policy baseline) -------------------------------

def test_cross_entropy_loss_hand_values_and_masked_garbage():
    # log π = [-1, -2] on the two completion targets, N = 4 (other micro-batches hold 2 more tokens):
    # L = (1 + 2) / 4 = 0.75, ∂L/∂log π = -1/4 on active slots, exactly 0 on the masked slots that hold
    # NaN / -inf (a prompt position whose "target" the student would never predict). sft/nll = 3/2.
    logp = torch.tensor([[NAN, -1.0, -2.0, -INF]], requires_grad=True)
    m = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    loss, metrics = cross_entropy_loss(logp, m, num_tokens=4)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0.75
    assert torch.equal(grad, torch.tensor([[0.0, -0.25, -0.25, 0.0]]))
    assert metrics["sft/nll"].item() == 1.5 and not metrics["sft/nll"].requires_grad
    zero, _ = cross_entropy_loss(logp, torch.zeros(1, 4), num_tokens=0)  # N = 0: exact 0, zero gradient
    assert zero.item() == 0.0 and torch.equal(torch.autograd.grad(zero, logp)[0], torch.zeros(1, 4))
    with pytest.raises(ValueError, match="shapes must match"):
        cross_entropy_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1)


# ---- GRPO and OPD + task reward ----------------------------------------------------------------

def test_grpo_advantages_hand_values():
    # Group 0 rewards [1, 0, 1]: mean 2/3, unbiased std sqrt(((1/3)² + (2/3)² + (1/3)²) / 2) = sqrt(1/3).
    # Group 1 has one member: 0.
    rewards, index = torch.tensor([1.0, 0.0, 1.0, 5.0]), torch.tensor([7, 7, 7, 2])
    std = math.sqrt(1 / 3)
    torch.testing.assert_close(grpo_advantages(rewards, index, eps=0.0),
                               torch.tensor([1 / 3 / std, -2 / 3 / std, 1 / 3 / std, 0.0]))
    torch.testing.assert_close(grpo_advantages(rewards, index, scale_by_std=False),
                               torch.tensor([1 / 3, -2 / 3, 1 / 3, 0.0]))
    assert torch.equal(grpo_advantages(torch.ones(3), torch.zeros(3)), torch.zeros(3))  # zero variance: 0, not NaN


def test_opsm_rejects_whole_sequences_on_the_right_condition():
    delta = 0.2
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    # old - cur per token (NaN where masked):
    gap = torch.tensor([
        [0.3, 0.3, 0.3, NAN],    # KL 0.3 > δ, Ā = (1 - 3 + 1) / 3 < 0 with mixed signs -> rejected
        [0.2, 0.19, NAN, NAN],   # KL 0.195 just below δ, Ā < 0 -> kept
        [5.0, 5.0, NAN, NAN],    # KL 5 > δ but Ā > 0 -> kept
        [NAN, 0.25, 0.25, NAN],  # KL 0.25 > δ, Ā < 0, NaN padding must not poison it -> rejected
    ])
    adv = torch.tensor([[1.0, -3.0, 1.0, NAN], [-1.0, -1.0, NAN, NAN], [2.0, 1.0, NAN, NAN], [NAN, -1.0, -1.0, NAN]])
    cur = torch.full((4, 4), -1.0)
    new_mask, metrics = opsm_mask(cur, cur + gap, adv, m, delta)
    assert torch.equal(new_mask, torch.stack([torch.zeros(4), m[1], m[2], torch.zeros(4)]))
    assert metrics["opd/opsm_rejected"].item() == 2.0
    assert new_mask.dtype == m.dtype and not new_mask.requires_grad


def test_opsm_padding_garbage_never_enters_the_kl():
    # Active KL 0.1 < δ; the padding holds huge / NaN values that would flip the decision if counted.
    cur = torch.tensor([[-1.0, -1.0, -100.0, NAN]])
    old = torch.tensor([[-0.9, -0.9, 100.0, NAN]])
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    new_mask, metrics = opsm_mask(cur, old, torch.full((1, 4), -1.0), m, delta=0.2)
    assert torch.equal(new_mask, m) and metrics["opd/opsm_rejected"].item() == 0.0


# ---- invariance to micro-batching and padding ---------------------------------------------------

@st.composite
def layouts(draw):
    """Sequences (prompt length, completion length), a micro-batch per sequence, padding per micro-batch."""
    n = draw(st.integers(1, 4))
    prompts = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    completions = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    groups = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    pads = draw(st.lists(st.integers(0, 3), min_size=3, max_size=3))
    return prompts, completions, groups, pads, draw(st.integers(0, 2**16))


def _place(per_token_list, prompts, completions, seqs, pad, fill):
    """Lay the tokens of `seqs` out as right-padded [B, T, ...] tensors (differentiable w.r.t. the tokens)."""
    offsets = [sum(completions[:i]) for i in range(len(completions))]
    T = max([prompts[s] - 1 + completions[s] for s in seqs], default=1) + pad
    b_idx = torch.tensor([row for row, s in enumerate(seqs) for _ in range(completions[s])], dtype=torch.long)
    t_idx = torch.tensor([prompts[s] - 1 + j for s in seqs for j in range(completions[s])], dtype=torch.long)
    tok_idx = torch.tensor([offsets[s] + j for s in seqs for j in range(completions[s])], dtype=torch.long)
    B = max(len(seqs), 1)
    ones = torch.ones(len(tok_idx), dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.float64).index_put((b_idx, t_idx), ones)
    placed = []
    for x, f in zip(per_token_list, fill, strict=True):
        full = torch.full((B, T, *x.shape[1:]), f, dtype=x.dtype)
        placed.append(full.index_put((b_idx, t_idx), x[tok_idx]))
    return placed, mask


def _micro_batch_grads(loss_fn, tokens, fill, layout):
    """Summed loss and gradient w.r.t. tokens[0]: one batch vs the same tokens split and padded differently."""
    prompts, completions, groups, pads, _ = layout
    N = sum(completions)
    results = []
    for split in (False, True):
        leaf = tokens[0].detach().clone().requires_grad_(True)
        everything = list(range(len(prompts)))
        parts = [[s for s in everything if groups[s] == g] for g in range(3)] if split else [everything]
        total = 0.0
        for g, seqs in enumerate(parts):  # an empty micro-batch is a fully masked row: it must add 0
            placed, mask = _place([leaf, *tokens[1:]], prompts, completions, seqs, pads[g] if split else 0, fill)
            loss = loss_fn(*placed, mask, N)
            loss.backward()
            total = total + loss.detach()
        results.append((total, leaf.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-12, atol=1e-12)
    assert grad_a.abs().sum() > 0


@settings(max_examples=25, deadline=None)
@given(layouts())
def test_importance_sampling_grad_invariant_to_micro_batching(layout):
    gen = _gen(layout[-1])
    n = sum(layout[1])
    tokens = [torch.randn(n, dtype=torch.float64, generator=gen) - 1 for _ in range(3)]
    _micro_batch_grads(lambda s, p, a, m, N: importance_sampling_loss(s, p, a, m, N)[0], tokens, (NAN, NAN, NAN),
                       layout)


@settings(max_examples=25, deadline=None)
@given(layouts(), st.sampled_from([0.0, 0.4, 1.0]))
def test_jsd_grad_invariant_to_micro_batching(layout, beta):
    gen = _gen(layout[-1])
    n, V = sum(layout[1]), 6
    tokens = [torch.randn(n, V, dtype=torch.float64, generator=gen) for _ in range(2)]
    _micro_batch_grads(lambda s, t, m, N: generalized_jsd_loss(s, t, m, N, beta, 0.8, chunk_size=2)[0], tokens,
                       (NAN, NAN), layout)


@settings(max_examples=25, deadline=None)
@given(layouts())
def test_topk_kl_grad_invariant_to_micro_batching(layout):
    gen = _gen(layout[-1])
    n, V, K = sum(layout[1]), 7, 3
    nu, ids = F.log_softmax(torch.randn(n, V, dtype=torch.float64, generator=gen), -1).topk(K, dim=-1)
    tokens = [torch.randn(n, V, dtype=torch.float64, generator=gen), ids, nu]
    _micro_batch_grads(lambda z, i, v, m, N: topk_forward_kl_loss(z, i, v, m, N, 0.9, True, chunk_size=2)[0], tokens,
                       (NAN, 0, -INF), layout)
