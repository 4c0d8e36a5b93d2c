"""opd.kernels.token_logprobs under temperature / top-k / top-p; opd.logprobs masks and reductions."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from opd.kernels import token_logprobs
from opd.logprobs import completion_mask, masked_mean, masked_sum, normalized_sum


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- token logprobs ----------------------------------------------------------------------------

def test_token_logprobs_hand_values_and_temperature():
    # logits [0, ln 3]: probs [1/4, 3/4]; at τ = 0.5 the logits are [0, 2 ln 3]: probs [1/10, 9/10].
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    target = torch.tensor([[1]])
    assert token_logprobs(logits, target).item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert token_logprobs(logits, target, temperature=0.5).item() == pytest.approx(math.log(0.9), abs=1e-6)
    assert token_logprobs(logits, target, temperature=0.5).item() != pytest.approx(math.log(0.75), abs=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_token_logprobs_matches_log_softmax_gather(temperature):
    full = (torch.randn(2, 7, 11, generator=_gen(6)) * 2).requires_grad_(True)
    targets = torch.randint(0, 11, (2, 6), generator=_gen(7))
    upstream = torch.randn(2, 6, generator=_gen(8))
    ours = token_logprobs(full[:, :-1], targets, temperature, chunk_size=4)
    (grad_ours,) = torch.autograd.grad(ours, full, upstream)
    ref = F.log_softmax(full[:, :-1] / temperature, -1).gather(-1, targets[..., None])[..., 0]
    (grad_ref,) = torch.autograd.grad(ref, full, upstream)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-6)


def _transformers_reference(logits_N_V, targets_N, temperature, top_k, top_p):
    """What transformers' sampler draws from: temperature -> top-k -> top-p warpers, then softmax."""
    scores = TemperatureLogitsWarper(temperature)(None, logits_N_V.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return F.log_softmax(scores, -1).gather(-1, targets_N[:, None])[:, 0]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"),
                         [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 8, 0.6), (0.5, 3, 0.95)])
def test_truncated_token_logprobs_match_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(40, 16, generator=_gen(9)) * 2
    targets = torch.randint(0, 16, (40,), generator=_gen(10))
    ours = token_logprobs(logits, targets, temperature, top_k, top_p, chunk_size=7)
    ref = _transformers_reference(logits, targets, temperature, top_k, top_p)
    outside = ref == float("-inf")
    assert outside.any() and (~outside).any(), "the case must exercise both sides of the support"
    assert torch.equal(ours == float("-inf"), outside)
    torch.testing.assert_close(ours[~outside], ref[~outside], rtol=1e-6, atol=1e-6)


def test_top_p_hand_example():
    # probs [0.5, 0.3, 0.15, 0.05], p = 0.75: ascending cumsum 0.05, 0.2, 0.5, 1.0; drop those <= 0.25
    # (the 0.05 and 0.15 tokens); renormalized: 0.5 / 0.8 = 0.625, 0.3 / 0.8 = 0.375.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4, 4)
    got = token_logprobs(logits, torch.arange(4), top_p=0.75)
    expected = torch.tensor([math.log(0.625), math.log(0.375), -math.inf, -math.inf])
    torch.testing.assert_close(got, expected)


def test_tiny_top_p_still_keeps_the_most_likely_token():
    # 1 - 1e-9 rounds to 1 in fp32, so every cumulative prob is <= 1 - p: only the top token survives.
    logits = torch.tensor([1.0, 3.0, 2.0]).expand(3, 3)
    got = token_logprobs(logits, torch.arange(3), top_p=1e-9)
    assert torch.equal(got, torch.tensor([-math.inf, 0.0, -math.inf]))


def test_top_k_and_top_p_ties_keep_every_tied_token():
    # top-k = 2 over logits [3, 2, 2, 1]: the k-th value 2 is tied, both 2s are kept (as transformers does).
    logits = torch.tensor([3.0, 2.0, 2.0, 1.0]).expand(4, 4)
    got = token_logprobs(logits, torch.arange(4), top_k=2)
    ref = F.log_softmax(torch.tensor([3.0, 2.0, 2.0]), -1)
    torch.testing.assert_close(got[:3], ref)
    assert got[3] == float("-inf")
    # top-p = 0.5 over probs [0.4, 0.2, 0.2, 0.2]: the nucleus needs one 0.2 token, which one depends on a
    # sampler's sort order; all tied ones are kept, so here the support is the whole vocabulary.
    logits = torch.tensor([0.4, 0.2, 0.2, 0.2]).log().expand(4, 4)
    got = token_logprobs(logits, torch.arange(4), top_p=0.5)
    torch.testing.assert_close(got, torch.tensor([0.4, 0.2, 0.2, 0.2]).log())


def test_top_p_one_and_top_k_zero_or_large_are_identity():
    logits = torch.randn(6, 9, generator=_gen(11))
    targets = torch.randint(0, 9, (6,), generator=_gen(12))
    plain = token_logprobs(logits, targets, 0.8)
    assert torch.equal(token_logprobs(logits, targets, 0.8, top_k=0, top_p=1.0), plain)
    assert torch.equal(token_logprobs(logits, targets, 0.8, top_k=9), plain)
    assert torch.equal(token_logprobs(logits, targets, 0.8, top_k=100), plain)


def test_truncated_token_logprobs_gradient_is_softmax_over_support():
    x = torch.randn(6, 9, dtype=torch.float64, generator=_gen(13), requires_grad=True)
    targets = x.detach().argmax(-1)  # always inside the support
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, targets, 0.7, top_k=5, top_p=0.8, chunk_size=4), (x,))
    outside = x.detach().argmin(-1)
    lp = token_logprobs(x, outside, top_k=3)
    (grad,) = torch.autograd.grad(lp, x, torch.ones_like(lp))  # -inf is locally constant: zero gradient
    assert torch.isinf(lp).all() and torch.equal(grad, torch.zeros_like(grad))


def test_token_logprobs_bad_inputs_raise():
    logits, targets = torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(logits, targets, temperature)
    with pytest.raises(ValueError, match="top_p"):
        token_logprobs(logits, targets, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        token_logprobs(logits, targets, top_k=-1)
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs(logits, targets[:, :2])
    with pytest.raises(ValueError, match="target id 5"):
        token_logprobs(logits, targets.index_fill(1, torch.tensor([1]), 5))


# ---- masks and reductions ----------------------------------------------------------------------

def test_completion_mask_from_lengths():
    # prompt 3, completion 2 -> targets 2, 3; prompt 1, completion 3 -> targets 0, 1, 2; completion 0 -> none.
    mask = completion_mask(torch.tensor([3, 1, 2]), torch.tensor([2, 3, 0]), num_targets=5)
    expected = torch.tensor([[0, 0, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    assert mask.dtype == torch.float32
    assert torch.equal(mask, expected)


def test_completion_mask_rejects_impossible_lengths():
    with pytest.raises(ValueError, match="row 1: prompt 4 \\+ completion 3"):
        completion_mask(torch.tensor([1, 4]), torch.tensor([1, 3]), num_targets=5)
    with pytest.raises(ValueError, match="prompt length 0"):
        completion_mask(torch.tensor([0]), torch.tensor([1]), num_targets=5)
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        completion_mask(torch.tensor([1, 2]), torch.tensor([1]), num_targets=5)


def test_masked_reductions_ignore_garbage():
    values = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert masked_sum(values, mask).item() == 4.0
    assert masked_mean(values, mask).item() == 2.0
    loss = normalized_sum(values, mask, num_tokens=8)  # step-global N = 8, 2 of them here
    (grad,) = torch.autograd.grad(loss, values)
    assert loss.item() == 0.5
    assert torch.equal(grad, torch.tensor([[0.125, 0.0], [0.0, 0.125]]))
    assert masked_mean(values, torch.zeros(2, 2)).item() == 0.0


def test_normalized_sum_zero_tokens_is_exact_zero_with_zero_grad():
    values = torch.tensor([[float("nan"), float("inf")]], requires_grad=True)
    loss = normalized_sum(values, torch.zeros(1, 2), num_tokens=0)
    (grad,) = torch.autograd.grad(loss, values)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros(1, 2))


def test_normalized_sum_rejects_a_local_count_above_the_global_one():
    with pytest.raises(ValueError, match="3 active tokens but num_tokens"):
        normalized_sum(torch.ones(1, 3), torch.ones(1, 3), num_tokens=2)
    with pytest.raises(ValueError, match="same shape"):
        masked_sum(torch.ones(1, 3), torch.ones(3))
