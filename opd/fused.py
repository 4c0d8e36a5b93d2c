"""Token logprobs straight from hidden states: the `[B, T, V]` logits are never materialized.

The sampled-token loss and the teacher's scores need one number per completion token,
`log softmax(h_t W^T / τ)[y_t]`, yet a plain forward builds logits for every position, prompt and
padding included (at a 32k vocabulary, 154 MB for 16 × 75 tokens; its gradient as much again).
Here the backbone's last hidden states are gathered at the active positions only (the loss mask),
and the output projection runs `chunk_size` rows at a time, in fp32; the backward recomputes each
chunk's softmax. The idea is Liger-Kernel's fused linear cross-entropy and TRL's
`_chunked_divergence_loss`; unlike them the chunk function returns logprobs, so every loss of
`opd.losses` can use it unchanged.

The G completions of one prompt share it: `shared_prompt_hidden_states` runs each distinct prompt
once and serves its KV cache to all of them, for the teacher's scores and, with gradients flowing
back through the cache copy, for the student's training forward (1.6x faster forward + backward
with GSM8K's ~104-token prompts, 130-token completions and G = 4).

Only for models whose logits are exactly `lm_head(last_hidden_state)` (no bias, no logit scale or
soft-capping, no adapter on the head): `supports_fused` checks that by structure, and callers fall
back to the full forward otherwise.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from transformers import DynamicCache

from opd.batch import right_pad
from opd.logprobs import _check_chunk_size, _check_temperature, _compute_dtype, masked_mean, step_token_count
from opd.losses import check_beta, jsd_rows

# Config fields that rescale or cap the logits after the head (Gemma2/3 soft-capping, Cohere, Granite):
# the fused paths would score `lm_head(h)` without them.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
_FUSED_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (structure signature, answer)


def supports_fused(model: torch.nn.Module) -> bool:
    """True when `model(...).logits` is exactly `lm_head(backbone(...).last_hidden_state)`, so the fused paths may run.

    One structural rule instead of a list of model types, so an unknown family takes the fused path
    when that is safe and the plain forward otherwise: the output embedding is a plain bias-free
    `nn.Linear` (not a LoRA or other wrapper: TRL #6530 trained with the un-adapted head), no config
    field rescales or caps the logits (`LOGIT_TRANSFORMS`), and the backbone is reachable under
    `base_model_prefix`. A config field can hide under a name not listed, and a random tiny model's
    logits are too small for a soft-cap to show in numbers, so both are asked: the structure, then
    once per model a tiny forward whose fused logits must equal `model(...).logits`. The answer is
    cached per model and recomputed when its head or backbone object changes (e.g. an adapter added).
    """
    from opd.distributed import is_sharded

    if is_sharded(model):  # calling the backbone directly would skip FSDP's unsharding of the root's parameters
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    signature = (id(head), type(head), id(backbone))
    cached = _FUSED_CHECKED.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    config = getattr(model, "config", None)
    scaled = any(getattr(config, name, None) not in (None, 1.0, 1) for name in LOGIT_TRANSFORMS)
    plain = (type(head) is torch.nn.Linear and head.bias is None and not scaled
             and isinstance(backbone, torch.nn.Module) and backbone is not model)
    answer = plain and _fused_logits_match(model, backbone, head)
    _FUSED_CHECKED[model] = (signature, answer)
    return answer


@torch.no_grad()
def _fused_logits_match(model: torch.nn.Module, backbone: torch.nn.Module, head: torch.nn.Linear) -> bool:
    """One 8-token forward both ways, in eval mode and the model's own dtype (no autocast): equal logits?"""
    parameter = next(model.parameters())
    rows = min(head.weight.shape[0], getattr(model.get_input_embeddings(), "num_embeddings", head.weight.shape[0]))
    ids_1_S = (torch.arange(8, device=parameter.device) * 7 + 3)[None] % rows
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(parameter.device.type, enabled=False):
            plain_1_S_V = model(input_ids=ids_1_S).logits.float()
            hidden = getattr(backbone(input_ids=ids_1_S), "last_hidden_state", None)
            if hidden is None or hidden.shape[:2] != ids_1_S.shape:
                return False
            fused_1_S_V = (hidden @ head.weight.T).float()
    finally:
        model.train(was_training)
    tolerance = 1e-4 if parameter.dtype == torch.float32 else 2e-2  # relative to the logits' scale
    scale = plain_1_S_V.abs().max().clamp(min=1.0)
    return plain_1_S_V.shape == fused_1_S_V.shape and bool(((plain_1_S_V - fused_1_S_V).abs() <= tolerance * scale).all())


class _LinearLogSoftmaxGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_N_H: Tensor, weight_V_H: Tensor, ids_N: Tensor, temperature: float, chunk_size: int):
        out_N = torch.empty(ids_N.shape, dtype=torch.float32, device=hidden_N_H.device)
        lse_N = torch.empty_like(out_N)
        for start in range(0, hidden_N_H.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            z_C_V = (hidden_N_H[rows] @ weight_V_H.T).float().div_(temperature)
            lse_N[rows] = torch.logsumexp(z_C_V, dim=-1)
            out_N[rows] = z_C_V.gather(-1, ids_N[rows, None]).squeeze(-1) - lse_N[rows]
        ctx.save_for_backward(hidden_N_H, weight_V_H, ids_N, lse_N)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out_N: Tensor):
        hidden_N_H, weight_V_H, ids_N, lse_N = ctx.saved_tensors
        grad_hidden_N_H = torch.zeros_like(hidden_N_H) if ctx.needs_input_grad[0] else None
        grad_weight_V_H = torch.zeros_like(weight_V_H) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden_N_H.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h_C_H = hidden_N_H[rows]
            # d(z_y - lse)/dz = onehot(y) - softmax(z); times the upstream gradient and 1/τ. In place:
            # one [C, V] buffer per chunk (at a 32k vocabulary each extra one is 33 MB of peak memory).
            g_C = grad_out_N[rows].float() / ctx.temperature
            grad_z_C_V = (h_C_H @ weight_V_H.T).float().div_(ctx.temperature)
            grad_z_C_V.sub_(lse_N[rows, None]).exp_().mul_(-g_C[:, None])
            grad_z_C_V.scatter_add_(-1, ids_N[rows, None], g_C[:, None])
            grad_z_C_V = grad_z_C_V.to(h_C_H.dtype)
            if grad_hidden_N_H is not None:
                grad_hidden_N_H[rows] = grad_z_C_V @ weight_V_H
            if grad_weight_V_H is not None:
                grad_weight_V_H.addmm_(grad_z_C_V.T, h_C_H)
        return grad_hidden_N_H, grad_weight_V_H, None, None, None


def linear_token_logprobs(hidden_N_H: Tensor, weight_V_H: Tensor, ids_N: Tensor, temperature: float = 1.0,
                          chunk_size: int = 256) -> Tensor:
    """`log_softmax(hidden @ weight.T / temperature)[ids]` per row, fp32, `chunk_size` rows of logits at a time.

    hidden_N_H: `[N, H]`; weight_V_H: `[V, H]` (pass `weight[:len(tokenizer)]` to drop padded rows);
    ids_N: `[N]` in `[0, V)`. Equals the materialized computation in value and in the gradients of
    `hidden` and `weight` (tests/test_fused.py).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if ids_N.numel() and (ids_N.min() < 0 or ids_N.max() >= weight_V_H.shape[0]):
        raise ValueError(f"target ids must be in [0, {weight_V_H.shape[0]}), got range [{ids_N.min()}, {ids_N.max()}]")
    return _LinearLogSoftmaxGather.apply(hidden_N_H, weight_V_H, ids_N, float(temperature), chunk_size)


class _LinearJSD(torch.autograd.Function):
    """(Σ_n w_n JSD_n, JSD_N) with both sides' logits formed `chunk_size` rows at a time.

    The loss is a weighted sum whose weights are known in the forward, so each chunk's gradient is
    taken there, scaled by its weights and pushed through the student's head at once (as Liger-Kernel's
    fused linear cross-entropy does): only `[N, H]` and `[V, H]` gradients are kept for the backward.
    Two chunk sizes: the head's matmuls take `chunk_size` rows (at a 32k vocabulary, fewer rows re-read
    the `[V, H]` weights too often), the divergence `sub_rows` (its five `[rows, V]` temporaries stay in cache);
    the gradient overwrites the student logits it came from.
    """

    @staticmethod
    def forward(ctx, hidden_N_H, weight_V_H, teacher_N_X, teacher_head_V_X, weights_N, beta, temperature, chunk_size,
                sub_rows):
        N, V = hidden_N_H.shape[0], weight_V_H.shape[0]
        values_N = torch.empty(N, dtype=weights_N.dtype, device=hidden_N_H.device)
        grad_hidden_N_H = torch.empty_like(hidden_N_H) if ctx.needs_input_grad[0] else None
        grad_weight_V_H = torch.zeros_like(weight_V_H) if ctx.needs_input_grad[1] else None
        z_s_buffer = hidden_N_H.new_empty((min(chunk_size, N), V))
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            h_C_H = hidden_N_H[rows]
            z_s_C_V = torch.mm(h_C_H, weight_V_H.T, out=z_s_buffer[: h_C_H.shape[0]])
            if teacher_head_V_X is None:
                z_t_C_V = teacher_N_X[rows]
            else:  # the teacher's head may live on its own device
                z_t_C_V = (teacher_N_X[rows].to(teacher_head_V_X.device) @ teacher_head_V_X.T).to(h_C_H.device)
            for sub in range(0, h_C_H.shape[0], sub_rows):
                part = slice(sub, sub + sub_rows)
                value_R, grad_R_V = jsd_rows(z_s_C_V[part], z_t_C_V[part], beta, temperature)
                values_N[start + sub : start + sub + value_R.shape[0]] = value_R
                z_s_C_V[part] = grad_R_V.mul_(weights_N[rows][part, None])
            if grad_hidden_N_H is not None:
                grad_hidden_N_H[rows] = z_s_C_V @ weight_V_H
            if grad_weight_V_H is not None:
                grad_weight_V_H.addmm_(z_s_C_V.T, h_C_H)
        ctx.save_for_backward(grad_hidden_N_H, grad_weight_V_H)
        ctx.mark_non_differentiable(values_N)
        return torch.linalg.vecdot(values_N, weights_N), values_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_values_N: Tensor):
        # out of place: a second backward (retain_graph, gradcheck) must find the saved gradients intact
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None, None, None)


def linear_jsd_loss(hidden_N_H: Tensor, weight_V_H: Tensor, teacher_N_X: Tensor, loss_mask_N: Tensor,
                    num_tokens: float | Tensor, beta: float = 0.5, temperature: float = 1.0,
                    teacher_head_V_X: Tensor | None = None, chunk_size: int = 256,
                    sub_rows: int | None = None) -> tuple[Tensor, dict]:
    """`generalized_jsd_loss(hidden @ weight.T, teacher logits, loss_mask, num_tokens)` without any `[N, V]` logits.

    Student: hidden_N_H and its head weight_V_H (`head_weight`). Teacher: logits `teacher_N_X = [N, V']`, or
    hidden states `[N, H']` with `teacher_head_V_X = [V', H']` (the factored form of docs/design.md §3). Rows
    whose mask is 0 are never computed. Both sides compare over the shared `V = min(V, V')` ids. The
    value, the `opd/jsd` metric and the gradients of `hidden` and `weight` equal the materialized loss's
    (tests/test_fused.py). `chunk_size` rows of logits exist at a time, the divergence runs on `sub_rows`
    rows at a time (default: 64k entries, which stay in cache); of the sizes tried, these were the fastest
    at 5,120 × 2,048 and 256 × 32,000. bench/bench_losses.py (`jsd_linear`) compares it with the naive loss.
    """
    _check_temperature(temperature)
    check_beta(beta)
    N = hidden_N_H.shape[0]
    teacher_V = teacher_N_X.shape[-1] if teacher_head_V_X is None else teacher_head_V_X.shape[0]
    if (hidden_N_H.dim() != 2 or weight_V_H.dim() != 2 or weight_V_H.shape[1] != hidden_N_H.shape[1]
            or tuple(teacher_N_X.shape[:-1]) != (N,) or tuple(loss_mask_N.shape) != (N,) or (
            teacher_head_V_X is not None and teacher_head_V_X.shape[1:] != teacher_N_X.shape[1:])):
        heads = "" if teacher_head_V_X is None else f", teacher head {tuple(teacher_head_V_X.shape)}"
        raise ValueError(f"shapes disagree: student hidden {tuple(hidden_N_H.shape)}, head {tuple(weight_V_H.shape)}; "
                         f"teacher {tuple(teacher_N_X.shape)}{heads}; mask {tuple(loss_mask_N.shape)}")
    V = min(weight_V_H.shape[0], teacher_V)
    sub_rows = max(1, 2**16 // V) if sub_rows is None else sub_rows
    _check_chunk_size(chunk_size)
    _check_chunk_size(sub_rows, "sub_rows")
    dtype = _compute_dtype(hidden_N_H)
    n = step_token_count(num_tokens, loss_mask_N, dtype).clamp(min=1.0)
    active_N = loss_mask_N != 0
    weights_N = torch.where(active_N, loss_mask_N.to(dtype), 0.0) / n
    every_row = bool(active_N.all())  # training passes the active rows only: no gather
    pick = (lambda x: x) if every_row else (lambda x: x[active_N])
    teacher_A_X = pick(teacher_N_X.detach())
    if teacher_head_V_X is None:
        teacher_A_X = teacher_A_X[:, :V]  # logits: the shared ids only
    else:
        teacher_head_V_X = teacher_head_V_X.detach()[:V]
    loss, values_A = _LinearJSD.apply(pick(hidden_N_H), weight_V_H[:V] if V < weight_V_H.shape[0] else weight_V_H,
                                      teacher_A_X, teacher_head_V_X, pick(weights_N), float(beta), float(temperature),
                                      chunk_size, sub_rows)
    values_N = values_A if every_row else torch.zeros_like(weights_N).masked_scatter(active_N, values_A)
    return loss, {"opd/jsd": masked_mean(values_N, loss_mask_N).float()}


def head_weight(model: torch.nn.Module, vocab_size: int | None) -> Tensor:
    """The output projection's `[V, H]` weight, cut to the tokenizer's `vocab_size` rows when the embedding is padded.

    No slice otherwise: a slice's backward allocates a zero-filled `[V, H]` gradient.
    """
    weight_V_H = model.get_output_embeddings().weight
    return weight_V_H[:vocab_size] if vocab_size is not None and vocab_size < weight_V_H.shape[0] else weight_V_H


def masked_token_logprobs(model: torch.nn.Module, tokens_B_L: Tensor, attention_mask_B_L: Tensor, mask_B_T: Tensor,
                          temperature: float = 1.0, vocab_size: int | None = None) -> Tensor:
    """logprobs_B_T of `tokens_B_L[:, 1:]` under `model` at the positions where `mask_B_T` is set, 0.0 elsewhere.

    The same values as `token_logprobs(model(...).logits[:, :-1], tokens[:, 1:], temperature)` on the
    mask (docs/design.md §3: masked positions hold 0.0), with logits only for the active rows.
    `vocab_size`: logits past it (padded embedding rows) are left out of the softmax.
    """
    active_B_T = mask_B_T != 0
    logprobs_N = linear_token_logprobs(active_hidden_states(model, tokens_B_L, attention_mask_B_L, active_B_T),
                                       head_weight(model, vocab_size), tokens_B_L[:, 1:][active_B_T], temperature)
    return torch.zeros(mask_B_T.shape, dtype=logprobs_N.dtype, device=logprobs_N.device).masked_scatter(
        active_B_T, logprobs_N)


def active_logits(model: torch.nn.Module, tokens_B_L: Tensor, attention_mask_B_L: Tensor, active_B_T: Tensor,
                  vocab_size: int | None = None) -> Tensor:
    """logits_N_V predicting `tokens_B_L[:, 1:][active_B_T]`, row-major, for the full-distribution losses.

    The rows of `model(...).logits[:, :-1, :vocab_size][active_B_T]`, with the head at those rows only and
    each shared prompt run once; the losses take the rows as a `[N, V]` lead, so no `[B, T, V]` exists.
    """
    return active_hidden_states(model, tokens_B_L, attention_mask_B_L, active_B_T) @ head_weight(model, vocab_size).T


def active_hidden_states(model: torch.nn.Module, tokens_B_L: Tensor, attention_mask_B_L: Tensor,
                         active_B_T: Tensor) -> Tensor:
    """hidden_N_H: the final hidden state before each active target, in the row-major order of `x_B_T[active_B_T]`.

    When rows share the prefix before their first active target (the G completions of one prompt),
    that prefix runs once per distinct prompt (`shared_prompt_hidden_states`), gradients included.
    """
    shared = _shared_prefixes(model, tokens_B_L, attention_mask_B_L, active_B_T)
    if shared is not None:
        prompts, completions, span_B_T = shared
        hidden_B_R_H, _, real_B_R = shared_prompt_hidden_states(model, prompts, completions)
        return hidden_B_R_H[real_B_R][active_B_T[span_B_T]]  # the span's positions, row-major; then the active ones
    hidden_B_L_H = getattr(model, model.base_model_prefix)(input_ids=tokens_B_L,
                                                           attention_mask=attention_mask_B_L).last_hidden_state
    return hidden_B_L_H[:, :-1][active_B_T]


def _shared_prefixes(model, tokens_B_L: Tensor, attention_mask_B_L: Tensor,
                     active_B_T: Tensor) -> tuple[list[list[int]], list[list[int]], Tensor] | None:
    """(prompts, completions, span_B_T) when scored rows repeat a prefix, else None (one plain forward is as good).

    Row b's scored span is targets `[first_b, last_b]`: its prompt is `tokens[:first_b + 1]`, its completion
    `tokens[first_b + 1 : last_b + 2]`. Only rows whose tokens are real up to the span's end (right padding)
    qualify. Not under gradient checkpointing: transformers then drops the KV cache the second pass needs.
    """
    rows_A = active_B_T.any(-1).nonzero().squeeze(1)
    if rows_A.numel() < 2 or any(getattr(module, "gradient_checkpointing", False) for module in model.modules()):
        return None
    T = active_B_T.shape[1]
    first_A = active_B_T[rows_A].int().argmax(-1)
    end_A = T + 1 - active_B_T[rows_A].flip(-1).int().argmax(-1)  # one past the span's last token
    leading_real_A = (attention_mask_B_L[rows_A] != 0).int().cumprod(-1).sum(-1)
    if (leading_real_A < end_A).any():
        return None
    tokens = tokens_B_L[rows_A].tolist()
    first, end = first_A.tolist(), end_A.tolist()
    prompts = [row[: f + 1] for row, f in zip(tokens, first, strict=True)]
    if len({tuple(p) for p in prompts}) == len(prompts):
        return None
    completions = [row[f + 1 : e] for row, f, e in zip(tokens, first, end, strict=True)]
    positions_T = torch.arange(T, device=active_B_T.device)
    span_B_T = torch.zeros_like(active_B_T)
    span_B_T[rows_A] = (positions_T >= first_A[:, None]) & (positions_T < end_A[:, None] - 1)
    return prompts, completions, span_B_T


def shared_prompt_hidden_states(model: torch.nn.Module, prompts: list[list[int]],
                                completions: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden_B_R_H, completions_B_R, real_B_R): the final hidden state that predicts each completion token.

    Pass 1 runs the U distinct prompts, left-padded (positions follow the mask, as in the rollout
    engine); its last position predicts every row's first completion token, and its KV cache is
    copied to the B rows. Pass 2 runs the right-padded completions on that cache, positions
    continuing each row's prompt. Causal attention makes this the same computation as one forward
    over `prompt + completion` (tests/test_fused.py checks values and gradients against it); under
    autograd the cache copy's backward sums each row's gradient into its prompt.
    """
    device = next(model.parameters()).device
    unique: dict[tuple[int, ...], int] = {}
    group_B = torch.tensor([unique.setdefault(tuple(p), len(unique)) for p in prompts], device=device)
    width = max(len(p) for p in unique)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    prompts_U_W = torch.full((len(unique), width), pad_id, dtype=torch.long)
    prompt_mask_U_W = torch.zeros_like(prompts_U_W)
    for u, p in enumerate(unique):
        prompts_U_W[u, width - len(p):], prompt_mask_U_W[u, width - len(p):] = torch.tensor(p), 1
    prompts_U_W, prompt_mask_U_W = prompts_U_W.to(device), prompt_mask_U_W.to(device)
    backbone = getattr(model, model.base_model_prefix)
    cache = DynamicCache(config=model.config)
    last_U_H = backbone(input_ids=prompts_U_W, attention_mask=prompt_mask_U_W, past_key_values=cache, use_cache=True,
                        position_ids=(prompt_mask_U_W.cumsum(-1) - 1).clamp(min=0)).last_hidden_state[:, -1]
    cache.batch_select_indices(group_B)
    completions_B_R, completion_mask_B_R = right_pad(completions, pad_id, min_width=1)
    completions_B_R, completion_mask_B_R = completions_B_R.to(device), completion_mask_B_R.to(device)
    R = completions_B_R.shape[1]
    prompt_lens_B = prompt_mask_U_W.sum(-1)[group_B]
    hidden_B_R_H = backbone(input_ids=completions_B_R, past_key_values=cache, use_cache=True,
                            attention_mask=torch.cat([prompt_mask_U_W[group_B], completion_mask_B_R], dim=1),
                            position_ids=prompt_lens_B[:, None] + torch.arange(R, device=device)).last_hidden_state
    # the hidden state before completion token j: the prompt's last for j = 0, completion token j - 1's after
    hidden_B_R_H = torch.cat([last_U_H[group_B, None], hidden_B_R_H[:, :-1]], dim=1)
    return hidden_B_R_H, completions_B_R, completion_mask_B_R.bool()

