"""The kernels of opd/kernels.py equal the specifications of opd/losses.py, in value and gradient, whatever the head.

Three heads: a plain weight, a soft-capped one (Gemma 2) and the identity over precomputed logits rows.
Reference: the spec on the logits `head(features)`, differentiated by autograd. `gathered_logprobs` keeps
its forward's logits for the backward when they are small (`KEPT_LOGITS_BYTES`) and recomputes them
otherwise; the `kept` fixture runs a test both ways.
"""

import pytest
import torch

import opd.kernels
from opd.heads import IDENTITY, linear_head, softcapped_head
from opd.kernels import gathered_logprobs, token_logprobs
from opd.kernels_jsd import jsd_loss
from opd.losses import checked_topk_ids, generalized_jsd_loss, topk_forward_kl_loss, topk_forward_kl_terms

N, H, V, K = 13, 6, 17, 4
HEADS = ("linear", "softcapped", "identity")


@pytest.fixture(params=["kept", "recomputed"])
def kept(request, monkeypatch):
    if request.param == "recomputed":
        monkeypatch.setattr(opd.kernels, "KEPT_LOGITS_BYTES", 0)
    return request.param


def _inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * 2).requires_grad_(True)
    return g, hidden, weight


def _head(kind, hidden, weight):
    """(features, head, logits) for the kernel and the spec; the identity's features are the logits themselves."""
    if kind == "linear":
        return hidden, linear_head(weight), hidden @ weight.T
    if kind == "softcapped":
        return hidden, softcapped_head(weight, 3.0), torch.tanh(hidden @ weight.T / 3.0) * 3.0
    logits = hidden @ weight.T
    return logits, IDENTITY, logits


def _grads(loss, hidden, weight):
    return torch.autograd.grad(loss, (hidden, weight))


def _topk_kernel(features, head, ids, nu, mask, n, temperature, chunk_size=5):
    checked = checked_topk_ids(ids, nu, mask, V, (N, V))
    ell = gathered_logprobs(features, head, checked, temperature, chunk_size=chunk_size)
    return topk_forward_kl_terms(ell, ids, nu, mask, n, tail_bucket=True)[0]


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_token_logprobs_equal_the_spec_with_and_without_truncation(kind, temperature, kept):
    g, hidden, weight = _inputs()
    ids = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, generator=g, dtype=torch.float64)
    for top_k, top_p in ((0, 1.0), (5, 0.9)):
        features, head, logits = _head(kind, hidden, weight)
        ours = gathered_logprobs(features, head, ids[:, None], temperature, top_k, top_p, chunk_size=4)[:, 0]
        spec = token_logprobs(logits, ids, temperature, top_k, top_p)
        finite = spec.isfinite()
        torch.testing.assert_close(ours, spec)
        got = _grads((torch.where(finite, ours, 0.0) * upstream).sum(), hidden, weight)
        features, head, logits = _head(kind, hidden, weight)
        spec = token_logprobs(logits, ids, temperature, top_k, top_p)
        want = _grads((torch.where(finite, spec, 0.0) * upstream).sum(), hidden, weight)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", HEADS)
def test_topk_forward_kl_equals_the_spec(kind, kept):
    g, hidden, weight = _inputs(1)
    ids = torch.randint(0, V, (N, K), generator=g)
    nu = torch.log_softmax(torch.randn(N, 3 * K, generator=g, dtype=torch.float64), -1)[:, :K]
    nu[2, 1] = float("-inf")  # a -inf teacher slot adds 0
    mask = torch.ones(N, dtype=torch.float64)
    mask[[0, 7]] = 0.0
    features, head, logits = _head(kind, hidden, weight)
    got_loss = _topk_kernel(features, head, ids, nu, mask, 20, 0.8)
    got = _grads(got_loss, hidden, weight)
    features, head, logits = _head(kind, hidden, weight)
    spec_loss = topk_forward_kl_loss(logits, ids, nu, mask, 20, 0.8, tail_bucket=True)[0]
    want = _grads(spec_loss, hidden, weight)
    torch.testing.assert_close(got_loss, spec_loss)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_jsd_equals_the_spec(kind, beta):
    g, hidden, weight = _inputs(2)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(N, dtype=torch.float64)
    mask[[3, 4]] = 0.0
    features, head, logits = _head(kind, hidden, weight)
    got_loss, got_metrics = jsd_loss(features, head, teacher, mask, 15, beta, 0.9, chunk_size=4, sub_rows=3)
    got = _grads(got_loss, hidden, weight)
    features, head, logits = _head(kind, hidden, weight)
    spec_loss, spec_metrics = generalized_jsd_loss(logits, teacher, mask, 15, beta, 0.9)
    want = _grads(spec_loss, hidden, weight)
    torch.testing.assert_close(got_loss, spec_loss)
    torch.testing.assert_close(got_metrics["opd/jsd"], spec_metrics["opd/jsd"])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_topk_forward_kl_kernel_passes_finite_differences_in_double_precision(kept):
    g, hidden, weight = _inputs(3)
    ids = torch.randint(0, V, (N, K), generator=g)
    nu = torch.log_softmax(torch.randn(N, 3 * K, generator=g, dtype=torch.float64), -1)[:, :K]
    mask = torch.ones(N, dtype=torch.float64)
    mask[5] = 0.0
    fn = lambda h, w: _topk_kernel(h, linear_head(w), ids, nu, mask, 12, 0.7, chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))
    fn = lambda h, w: _topk_kernel(h, softcapped_head(w, 3.0), ids, nu, mask, 12, 0.7, chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


@pytest.mark.parametrize("kind", HEADS)
def test_every_kernel_is_invariant_to_the_chunk_size(kind):
    g, hidden, weight = _inputs(4)
    ids = torch.randint(0, V, (N, K), generator=g)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64)
    mask = torch.ones(N, dtype=torch.float64)
    results = []
    for chunk in (1, 4, 64):
        features, head, _ = _head(kind, hidden, weight)
        logprobs = gathered_logprobs(features, head, ids, 0.8, top_k=6, chunk_size=chunk)
        jsd, _ = jsd_loss(features, head, teacher, mask, N, 0.5, 0.8, chunk_size=chunk, sub_rows=chunk)
        loss = logprobs.clamp(min=-1e3).sum() + jsd
        results.append((logprobs.detach(), jsd.detach(), _grads(loss, hidden, weight)))
    for logprobs, jsd, grads in results[1:]:
        torch.testing.assert_close(logprobs, results[0][0])
        torch.testing.assert_close(jsd, results[0][1])
        for a, b in zip(grads, results[0][2], strict=True):
            torch.testing.assert_close(a, b)



def test_chunks_are_as_large_as_the_logits_budget_allows_and_split_rows_evenly():
    # CHUNK_ENTRIES = 2^24 logits (64 MiB fp32): a micro-batch of 4 x 64 rows at SmolLM2's V = 49,152 is one chunk
    # (2^24 / 49,152 = 341 > 256), so the [V, H] head weight is read once per matmul, not 4 times; Qwen's padded
    # 151,936 rows allow 2^24 / 151,936 = 110; 300 rows at V = 32,000 split 2 x 150, not 256 + 44.
    assert opd.kernels.chunk_rows(49_152, 256) == 256
    assert opd.kernels.chunk_rows(151_936) == 110
    assert opd.kernels.chunk_rows(32_000, 300) == 150
    assert opd.kernels.chunk_rows(2_048, 40) == 40 and opd.kernels.chunk_rows(10**9) == 1
