"""Heads that are not a plain weight (opd/forward.py's structural choice) go through the same kernels, exactly."""

import copy

import torch

from opd.forward import masked_token_logprobs, model_head, supports_fused
from opd.kernels import token_logprobs
from opd.logprobs import completion_mask
from opd.lora import apply_lora
from opd.models import load_model


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens_B_L = torch.randint(3, 2000, (3, 12), generator=g)
    attention_B_L = torch.ones_like(tokens_B_L)
    attention_B_L[2, 8:] = 0
    mask_B_T = completion_mask(torch.tensor([4, 5, 3]), torch.tensor([7, 6, 5]), 11)
    return tokens_B_L, attention_B_L, mask_B_T, torch.randn(mask_B_T.shape, generator=g) * mask_B_T


def _check_against_the_full_forward(model, kind, top_k=0):
    tokens_B_L, attention_B_L, mask_B_T, upstream_B_T = _batch()
    assert not supports_fused(model) and model_head(model) is not None and model_head(model).kind == kind
    ours_B_T = masked_token_logprobs(model, tokens_B_L, attention_B_L, mask_B_T, temperature=0.8, top_k=top_k)
    (ours_B_T * upstream_B_T).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    full_B_T = token_logprobs(model(input_ids=tokens_B_L, attention_mask=attention_B_L).logits[:, :-1],
                              tokens_B_L[:, 1:], 0.8, top_k=top_k)
    full_B_T = torch.where(mask_B_T > 0, full_B_T, 0.0)
    (full_B_T * upstream_B_T).sum().backward()
    torch.testing.assert_close(ours_B_T, full_B_T.detach(), atol=2e-5, rtol=1e-5)
    assert ours and sorted(ours) == sorted(n for n, p in model.named_parameters() if p.grad is not None)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[name], p.grad, atol=5e-5, rtol=1e-4, msg=name)


def test_a_lora_adapted_head_trains_through_the_module_head():
    student = apply_lora(load_model("tiny:student"), 4, 8.0, "q_proj,lm_head")
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    _check_against_the_full_forward(student, "function")


def test_a_logit_scale_the_model_applies_takes_the_identity_path_and_truncation_works_through_a_head():
    student = load_model("tiny:student")
    capped = copy.deepcopy(student)
    capped.config.logit_scale = 2.0  # flagged only (Llama ignores it): the structure is not asserted, so no head
    assert model_head(capped) is None
    assert model_head(student).kind == "linear"
    tokens_B_L, attention_B_L, mask_B_T, _ = _batch()
    for top_k in (0, 7):
        a = masked_token_logprobs(student, tokens_B_L, attention_B_L, mask_B_T, 0.8, top_k=top_k)
        b = masked_token_logprobs(capped, tokens_B_L, attention_B_L, mask_B_T, 0.8, top_k=top_k)
        torch.testing.assert_close(a.detach(), b.detach(), atol=2e-5, rtol=1e-5)
