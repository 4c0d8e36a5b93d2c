"""Logprobs from hidden states (opd/forward.py, opd/kernels.py) equal the materialized logits path, value and grad."""

import copy

import pytest
import torch

from opd.batch import collate, right_pad
from opd.config import load_config
from opd.forward import active_logits, masked_token_logprobs, model_head, supports_fused
from opd.heads import IDENTITY, linear_head
from opd.kernels import gathered_logprobs, token_logprobs
from opd.kernels_jsd import jsd_loss
from opd.losses import generalized_jsd_loss, topk_forward_kl_loss
from opd.logprobs import completion_mask
from opd.teacher import TeacherScores
from opd.teacher.hf import score_tokens
from opd.objectives import micro_loss
from opd.types import Rollout


def linear_token_logprobs(hidden, weight, ids, temperature=1.0, chunk_size=256):
    return gathered_logprobs(hidden, linear_head(weight), ids[:, None], temperature, chunk_size=chunk_size)[:, 0]


def linear_jsd_loss(hidden, weight, teacher, mask, num_tokens, beta=0.5, temperature=1.0, teacher_head_V_X=None,
                    chunk_size=256, sub_rows=None):
    teacher_head = IDENTITY if teacher_head_V_X is None else linear_head(teacher_head_V_X)
    return jsd_loss(hidden, linear_head(weight), teacher, mask, num_tokens, beta, temperature, teacher_head,
                    chunk_size, sub_rows)


def test_linear_token_logprobs_equals_log_softmax_of_the_full_logits_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)  # 37 rows: chunks of 16, 16 and a ragged 5
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    ids = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.randn(37, generator=g)
    upstream[3] = 0.0  # a masked row: zero upstream gradient
    fused = linear_token_logprobs(hidden, weight, ids, temperature=0.7, chunk_size=16)
    (fused * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    naive = torch.log_softmax(hidden @ weight.T / 0.7, dim=-1).gather(-1, ids[:, None]).squeeze(-1)
    (naive * upstream).sum().backward()
    torch.testing.assert_close(fused, naive.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.3, 0.7), (1.0, 1.0), (1.0, 1.3)])
@pytest.mark.parametrize("factored", [False, True])
def test_linear_jsd_equals_the_jsd_of_materialized_logits(beta, temperature, factored):
    # 23 rows, 4 masked (the teacher's rows there hold NaN); the student's head has 3 padded rows
    # (43 vs the teacher's 40: both compare over 40 ids, the 3 extra rows get no gradient). Chunks of 8
    # rows for the matmuls (8, 8 and a ragged 7 of the 19 active rows) and 3 for the divergence.
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 12, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(43, 12, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(23, 9, generator=g, dtype=torch.float64)
    teacher_head = torch.randn(40, 9, generator=g, dtype=torch.float64)
    mask = torch.ones(23, dtype=torch.float64)
    mask[[0, 5, 6, 22]] = 0.0
    teacher_logits = teacher_hidden @ teacher_head.T
    teacher_hidden[mask == 0], teacher_logits[mask == 0] = float("nan"), float("nan")
    teacher = (teacher_hidden, teacher_head) if factored else (teacher_logits, None)
    loss, metrics = linear_jsd_loss(hidden, weight, teacher[0], mask, 30, beta=beta, temperature=temperature,
                                    teacher_head_V_X=teacher[1], chunk_size=8, sub_rows=3)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    naive, naive_metrics = generalized_jsd_loss(hidden @ weight.T, teacher_logits, mask, 30, beta=beta,
                                                temperature=temperature)
    naive.backward()
    torch.testing.assert_close(loss, naive.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(metrics["opd/jsd"], naive_metrics["opd/jsd"].float())
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-12, rtol=1e-10)
    assert grads[1][40:].abs().max() == 0 and grads[0][mask == 0].abs().max() == 0
    assert loss.item() > 0


def test_linear_jsd_gradients_pass_gradcheck_and_survive_a_second_backward():
    # The gradient is taken in the forward and only scaled in the backward: finite differences of
    # the loss must agree with it, and a retained graph must give it again (the saved gradients intact).
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(7, 11, generator=g, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1], dtype=torch.float64)
    fn = lambda h, w: linear_jsd_loss(h, w, teacher, mask, 6, beta=0.4, temperature=0.8, chunk_size=3,  # noqa: E731
                                      sub_rows=2)[0]
    assert torch.autograd.gradcheck(fn, (hidden, weight))
    loss = 3.0 * fn(hidden, weight)
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight))
    once = torch.autograd.grad(fn(hidden, weight), (hidden, weight))
    for a, b, c in zip(first, second, once, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, 3.0 * c)  # the backward scales by the incoming gradient
    with torch.no_grad():  # no gradient wanted: the value alone
        torch.testing.assert_close(fn(hidden, weight), loss.detach() / 3.0)


def test_linear_jsd_rejects_inputs_that_do_not_line_up():
    hidden, weight, teacher, mask = torch.zeros(4, 3), torch.zeros(10, 3), torch.zeros(4, 10), torch.ones(4)
    with pytest.raises(ValueError, match="shapes disagree"):
        linear_jsd_loss(hidden, torch.zeros(10, 2), teacher, mask, 4)
    with pytest.raises(ValueError, match="shapes disagree"):
        linear_jsd_loss(hidden, weight, torch.zeros(5, 10), mask, 4)
    with pytest.raises(ValueError, match="teacher head"):
        linear_jsd_loss(hidden, weight, torch.zeros(4, 6), mask, 4, teacher_head_V_X=torch.zeros(10, 5))
    with pytest.raises(ValueError, match="step-global"):
        linear_jsd_loss(hidden, weight, teacher, mask, 3)
    with pytest.raises(ValueError, match="beta"):
        linear_jsd_loss(hidden, weight, teacher, mask, 4, beta=1.5)


def test_masked_token_logprobs_match_the_trainers_full_forward_on_the_tiny_student(student):
    # Right-padded batch of 3 rows; the mask covers each row's completion only.
    torch.manual_seed(1)
    tokens = torch.randint(3, 2048, (3, 12))
    attention = torch.ones_like(tokens)
    attention[1, 9:] = 0
    attention[2, 6:] = 0
    mask = completion_mask(torch.tensor([4, 5, 2]), torch.tensor([8, 4, 4]), 11).float()
    assert supports_fused(student)
    fused = masked_token_logprobs(student, tokens, attention, mask, temperature=0.8)
    (fused * mask).sum().backward()
    fused_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    full = token_logprobs(student(input_ids=tokens, attention_mask=attention).logits[:, :-1], tokens[:, 1:], 0.8)
    (full * mask).sum().backward()
    torch.testing.assert_close(fused, torch.where(mask > 0, full, 0.0).detach(), atol=1e-5, rtol=1e-5)
    assert (fused[mask == 0] == 0).all()
    for got, p in zip(fused_grads, student.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, atol=5e-5, rtol=1e-4)  # fp32 sums in another order


def test_teacher_scores_are_the_same_through_hidden_states_or_full_logits(teacher, tokenizer):
    prompts = [tokenizer.encode("12+7=", add_special_tokens=False), tokenizer.encode("3-1", add_special_tokens=False)]
    completions = [tokenizer.encode("19\nFinal: 19", add_special_tokens=False), tokenizer.encode("=2", add_special_tokens=False)]
    fused = score_tokens(teacher, prompts, completions, temperature=0.9)  # hidden-state path
    full = score_tokens(teacher, prompts, completions, temperature=0.9, topk=1)  # top-k needs full logits
    for f, g in zip(fused, full, strict=True):
        torch.testing.assert_close(f.logprobs_R, g.logprobs_R, atol=1e-5, rtol=1e-5)


def test_models_with_scaled_or_biased_heads_are_not_fused(student):
    assert supports_fused(student)
    capped = copy.deepcopy(student)
    capped.config.final_logit_softcapping = 30.0  # Gemma-2 style: logits are not lm_head(h)
    assert not supports_fused(capped)


def test_completions_of_a_shared_prompt_score_as_one_forward_each(teacher, tokenizer):
    # Rows 0-2 share a prompt, rows 3-4 another (shorter: left padding in pass 1), row 5 is alone; the
    # completions differ in length (right padding in pass 2), one is empty. Reference: every row
    # scored alone, i.e. one plain forward over prompt + completion.
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    a, b, c = enc("What is 12+7-3?"), enc("3-1="), enc("Compute 40*2.")
    prompts = [a, a, a, b, b, c]
    completions = [enc("16\nFinal: 16"), enc("=9"), [], enc("2\nFinal: 2"), enc("2"), enc("80")]
    V = len(tokenizer) - 8  # also a padded-vocabulary cut: only ids below V score
    completions = [[t % V for t in comp] for comp in completions]
    # Full distributions without top-k stay factored (hidden states and the head); with top-k they are logits.
    groups, head = [0, 0, 0, 1, 1, 2], model_head(teacher, V)
    materialized = score_tokens(teacher, prompts, completions, temperature=0.7, vocab_size=V, topk=5, full_logits=True,
                                groups=groups)
    factored = score_tokens(teacher, prompts, completions, temperature=0.7, vocab_size=V, full_logits=True,
                            groups=groups)
    assert all(f.logits_R_V is None and f.hidden_R_H.shape == (len(c), teacher.config.hidden_size)
               for f, c in zip(factored, completions, strict=True))
    for kwargs, shared in ((dict(), score_tokens(teacher, prompts, completions, temperature=0.7, vocab_size=V,
                                                 groups=groups)),
                           (dict(full_logits=True), factored), (dict(topk=5, full_logits=True), materialized)):
        for row, (p, comp) in enumerate(zip(prompts, completions, strict=True)):
            alone = score_tokens(teacher, [p], [comp], temperature=0.7, vocab_size=V, **kwargs)[0]
            assert shared[row].logprobs_R.shape == (len(comp),)
            torch.testing.assert_close(shared[row].logprobs_R, alone.logprobs_R, atol=2e-5, rtol=1e-5)
            if "topk" in kwargs:
                torch.testing.assert_close(shared[row].topk_logprobs_R_K, alone.topk_logprobs_R_K, atol=2e-5, rtol=1e-5)
                assert torch.equal(shared[row].topk_ids_R_K, alone.topk_ids_R_K)
            if kwargs:
                torch.testing.assert_close(shared[row].full_logits(head), alone.full_logits(head), atol=2e-5, rtol=1e-5)
                torch.testing.assert_close(shared[row].full_logits(head), materialized[row].logits_R_V, atol=2e-5,
                                           rtol=1e-5)
                assert shared[row].full_logits(head).shape == (len(comp), V)


def test_a_shared_prompt_trains_through_one_prompt_forward_with_the_same_values_and_gradients(student, tokenizer):
    # The trainer's batch: right-padded prompt + completion rows, the mask on each completion. Rows 0-2
    # share a prompt, rows 3-4 another (shorter), row 5 is alone and row 6 repeats row 0's prompt with an
    # empty completion (no scored token: it must not enter the computation). Reference: the full forward.
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    a, b, c = enc("What is 12+7-3?"), enc("3-1="), enc("Compute 40*2.")
    prompts = [a, a, a, b, b, c, a]
    completions = [enc("16\nFinal: 16"), enc("=9"), enc("16"), enc("2\nFinal: 2"), enc("2"), enc("80"), []]
    V = len(tokenizer) - 8  # a padded-vocabulary cut as well
    completions = [[t % V for t in comp] for comp in completions]
    tokens_B_L, attention_B_L = right_pad([p + comp for p, comp in zip(prompts, completions, strict=True)], 0)
    mask_B_T = completion_mask(torch.tensor([len(p) for p in prompts]), torch.tensor([len(comp) for comp in completions]),
                               tokens_B_L.shape[1] - 1).float()
    mask_B_T[0, len(a) + 1] = 0.0  # a hole inside row 0's completion: scored around, not at
    upstream_B_T = torch.randn(mask_B_T.shape, generator=torch.Generator().manual_seed(0)) * mask_B_T
    model_head(student, V)  # the structural check's one tiny forward, before the count
    positions = []  # tokens embedded per forward: the shared path embeds each distinct prompt once
    hook = student.get_input_embeddings().register_forward_hook(lambda m, args, out: positions.append(args[0].numel()))
    shared_B_T = masked_token_logprobs(student, tokens_B_L, attention_B_L, mask_B_T, temperature=0.8, vocab_size=V,
                                       prompt_lens_B=torch.tensor([len(p) for p in prompts]),
                                       completion_lens_B=torch.tensor([len(comp) for comp in completions]),
                                       group_B=torch.tensor([0, 0, 0, 1, 1, 2, 0]))
    hook.remove()
    (shared_B_T * upstream_B_T).sum().backward()
    shared_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    logits_B_T_V = student(input_ids=tokens_B_L, attention_mask=attention_B_L).logits[:, :-1, :V]
    full_B_T = torch.where(mask_B_T > 0, token_logprobs(logits_B_T_V, tokens_B_L[:, 1:], 0.8), 0.0)
    (full_B_T * upstream_B_T).sum().backward()
    width, longest = max(map(len, prompts)), max(map(len, completions))
    assert positions == [3 * width, 6 * longest]  # 3 distinct prompts, then the 6 scored rows' completions
    torch.testing.assert_close(shared_B_T, full_B_T.detach(), atol=2e-5, rtol=1e-5)
    assert (shared_B_T[mask_B_T == 0] == 0).all()
    for got, p in zip(shared_grads, student.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, atol=5e-5, rtol=1e-4)


def test_gradient_checkpointing_keeps_the_plain_forward(student, tokenizer):
    # transformers drops the KV cache under gradient checkpointing, so the shared path would be wrong there.
    student.activation_checkpointing_enable()
    prompt = tokenizer.encode("3-1=", add_special_tokens=False)
    tokens_B_L, attention_B_L = right_pad([prompt + [20, 21, 22], prompt + [30, 31]], 0)
    mask_B_T = completion_mask(torch.tensor([len(prompt)] * 2), torch.tensor([3, 2]), tokens_B_L.shape[1] - 1).float()
    model_head(student)  # the structural check's one tiny forward, before the count
    positions = []
    student.get_input_embeddings().register_forward_hook(lambda m, args, out: positions.append(args[0].numel()))
    got_B_T = masked_token_logprobs(student, tokens_B_L, attention_B_L, mask_B_T,
                                    prompt_lens_B=torch.tensor([len(prompt)] * 2),
                                    completion_lens_B=torch.tensor([3, 2]), group_B=torch.tensor([0, 0]))
    assert positions == [tokens_B_L.numel()]
    full_B_T = token_logprobs(student(input_ids=tokens_B_L, attention_mask=attention_B_L).logits[:, :-1], tokens_B_L[:, 1:])
    torch.testing.assert_close(got_B_T, torch.where(mask_B_T > 0, full_B_T, 0.0).detach(), atol=1e-5, rtol=1e-5)


def test_full_distribution_losses_on_active_rows_match_the_full_forward(student, teacher, tokenizer):
    # The JSD and top-k KL read the student's logits on the loss mask only: `active_logits` computes
    # those rows alone (shared prompts once) and training hands the losses `[N, V]` rows with an all-ones
    # mask; value and gradient must be the full forward's on `[B, T, V]` with the mask. Rows 0-1 share a
    # prompt, row 2 is alone; right padding on rows 1 and 2.
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    a, b = enc("What is 12+7-3?"), enc("3-1=")
    prompts, completions = [a, a, b], [enc("16\nFinal: 16"), enc("=9"), enc("2")]
    tokens_B_L, attention_B_L = right_pad([p + c for p, c in zip(prompts, completions, strict=True)], 0)
    mask_B_T = completion_mask(torch.tensor([len(p) for p in prompts]), torch.tensor([len(c) for c in completions]),
                               tokens_B_L.shape[1] - 1).float()
    active_B_T = mask_B_T > 0
    with torch.no_grad():
        teacher_B_T_V = teacher(input_ids=tokens_B_L, attention_mask=attention_B_L).logits[:, :-1] * mask_B_T[..., None]
    topk_lp_B_T_K, topk_ids_B_T_K = torch.log_softmax(teacher_B_T_V, -1).topk(4, -1)
    topk_lp_B_T_K = topk_lp_B_T_K.masked_fill(mask_B_T[..., None] == 0, float("-inf"))
    n = mask_B_T.sum()
    losses = {"jsd": lambda z, active: generalized_jsd_loss(z, teacher_B_T_V[active], mask_B_T[active], n, beta=0.3,
                                                            temperature=0.9)[0],
              "topk": lambda z, active: topk_forward_kl_loss(z, topk_ids_B_T_K[active], topk_lp_B_T_K[active],
                                                             mask_B_T[active], n, tail_bucket=True,
                                                             sampled_ids_B_T=tokens_B_L[:, 1:][active])[0]}
    everywhere = (slice(None), slice(None))
    for name, loss_fn in losses.items():
        student.zero_grad()
        rows_N_V = active_logits(student, tokens_B_L, attention_B_L, active_B_T)
        assert rows_N_V.shape == (int(active_B_T.sum()), student.config.vocab_size)
        masked_loss = loss_fn(rows_N_V, active_B_T)
        masked_loss.backward()
        masked_grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        full_B_T_V = student(input_ids=tokens_B_L, attention_mask=attention_B_L).logits[:, :-1]
        torch.testing.assert_close(rows_N_V, full_B_T_V[active_B_T], atol=2e-5, rtol=1e-5)
        full_loss = loss_fn(full_B_T_V, everywhere)
        full_loss.backward()
        torch.testing.assert_close(masked_loss, full_loss, atol=1e-5, rtol=1e-5, msg=name)
        for got, p in zip(masked_grads, student.parameters(), strict=True):
            torch.testing.assert_close(got, p.grad, atol=5e-5, rtol=1e-4, msg=name)


def test_jsd_trains_the_same_on_factored_or_materialized_teacher_logits(student, teacher, tokenizer):
    # An in-process teacher sends hidden states and a reference to its head; the batch then holds
    # [B, T, H] instead of [B, T, V] and each micro-batch forms the teacher logits of its own rows.
    # Loss and student gradients must be those of the same batch with the logits materialized. Training
    # forms either side's logits a chunk of rows at a time (kernels.jsd_loss).
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    a, b = enc("What is 12+7-3?"), enc("3-1=")
    prompts, completions = [a, a, b], [enc("16\nFinal: 16"), enc("=9"), enc("2")]
    rollouts = [Rollout(prompt_ids=p, completion_ids=c, sampler_logprobs=[-1.0] * len(c), finish_reason="stop",
                        prompt_index=i) for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]
    factored = score_tokens(teacher, prompts, completions, temperature=1.0, full_logits=True)
    teacher_head = model_head(teacher)  # beside the batch, never in it
    materialized = [TeacherScores(logprobs_R=s.logprobs_R, logits_R_V=s.full_logits(teacher_head)) for s in factored]
    batches = [collate(rollouts, scores, tokenizer.pad_token_id) for scores in (factored, materialized)]
    head_V_H = teacher_head.params[0]  # the teacher's own weight, not a copy
    assert batches[0].teacher_logits_B_T_V is None and head_V_H.data_ptr() == teacher.lm_head.weight.data_ptr()
    assert batches[1].teacher_hidden_B_T_H is None
    config = load_config(None, ["loss=jsd", "jsd_beta=0.3", "loss_temperature=0.8"])
    results = []
    for batch in batches:
        student.zero_grad()
        total = 0.0
        for rows in (slice(0, 2), slice(2, 3)):  # the head passes through select() unsliced
            loss, _ = micro_loss(student, batch.select(rows).to("cpu"), config, batch.num_tokens,
                                 teacher_head=teacher_head)
            loss.backward()
            total += loss.item()
        results.append((total, [p.grad.clone() for p in student.parameters()]))
    # A student whose head cannot be fused (here only flagged so: Llama ignores `logit_scale`) takes the
    # materialized path, forming the factored teacher's logits whole.
    unfused = copy.deepcopy(student)
    unfused.config.logit_scale = 2.0
    assert not supports_fused(unfused)
    unfused.zero_grad()
    loss, _ = micro_loss(unfused, batches[0], config, batches[0].num_tokens, teacher_head=teacher_head)
    loss.backward()
    results.append((loss.item(), [p.grad.clone() for p in unfused.parameters()]))
    # and all equal the plain loss on the student's full forward, [B, T, V] logits and all
    student.zero_grad()
    batch = batches[1]
    logits_B_T_V = student(input_ids=batch.tokens_B_L, attention_mask=batch.attention_mask_B_L).logits[:, :-1]
    plain, _ = generalized_jsd_loss(logits_B_T_V, batch.teacher_logits_B_T_V, batch.loss_mask_B_T, batch.num_tokens,
                                    beta=0.3, temperature=0.8)
    plain.backward()
    results.append((plain.item(), [p.grad.clone() for p in student.parameters()]))
    for total, grads in results[1:]:
        assert results[0][0] == pytest.approx(total, rel=1e-5)
        for got, want in zip(results[0][1], grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
