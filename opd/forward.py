"""The model-side forward: which head a model has, its features at the active rows, the shared-prompt forward.

Every kernel of `opd.kernels` takes features `[N, X]` and a head. What those are depends on what the
model is, structurally, and that is decided here only (`model_head`):

- `lm_head(last_hidden_state)` with a plain bias-free `nn.Linear`: the backbone's hidden states and
  `linear_head(W)`; logits exist only at the loss-mask rows, a chunk at a time;
- the same followed by Gemma 2's soft-cap: `softcapped_head`; an adapted (LoRA) `lm_head`: `module_head`;
- anything else (a logit scale, an FSDP-sharded root, an unknown wrapper): `model(...).logits` rows under
  the identity head, the same kernels on the materialized rows.

Each structural answer is confirmed once per model by a tiny forward whose head-made logits must equal
`model(...).logits` (a config field can hide under a name not listed), and cached per model.

The G completions of one prompt share it: `shared_prompt_hidden_states` runs each distinct prompt once
(the rows' group and lengths say which) and serves its KV cache to all of them, with gradients flowing
back through the cache copy.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import Tensor
from transformers import DynamicCache

from opd.grads import in_place_weight
from opd.heads import IDENTITY, Head, linear_head, module_head, softcapped_head
from opd.kernels import gathered_logprobs
from opd.logprobs import completion_mask
from opd.precision import casts_cached
from opd.tokenization import vocab_logits

# Config fields that rescale or cap the logits after the head (Gemma2/3 soft-capping, Cohere, Granite).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(kind, structure): answer}


def _parts(model: torch.nn.Module):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    transforms = {name: getattr(getattr(model, "config", None), name, None) for name in LOGIT_TRANSFORMS}
    return head, backbone, {name: v for name, v in transforms.items() if v not in (None, 1.0, 1)}


def _confirmed(model: torch.nn.Module, kind: str, head: Head) -> bool:
    """Whether `head(backbone(x).last_hidden_state)` equals `model(x).logits`, asked once per model and structure."""
    module, backbone, _ = _parts(model)
    key = (kind, id(module), type(module), id(backbone))
    answers = _CHECKED.setdefault(model, {})
    if key not in answers:
        answers[key] = _logits_match(model, backbone, head)
    return answers[key]


def supports_fused(model: torch.nn.Module) -> bool:
    """True when `model(...).logits` is exactly `lm_head(backbone(...).last_hidden_state)` with a plain weight.

    The output embedding is a plain bias-free `nn.Linear` (not a LoRA or other wrapper: TRL #6530 trained
    with the un-adapted head), no config field rescales or caps the logits (`LOGIT_TRANSFORMS`), the
    backbone is reachable under `base_model_prefix`, and one tiny forward confirms it.
    """
    from opd.distributed import is_sharded

    if is_sharded(model):  # calling the backbone directly would skip FSDP's unsharding of the root's parameters
        return False
    module, backbone, transforms = _parts(model)
    plain = (type(module) is torch.nn.Linear and module.bias is None and not transforms
             and isinstance(backbone, torch.nn.Module) and backbone is not model)
    return plain and _confirmed(model, "linear", linear_head(module.weight))


def model_head(model: torch.nn.Module, vocab_size: int | None = None) -> Head | None:
    """The head that makes `model(...).logits[..., :vocab_size]` from the backbone's last hidden state, or None.

    None: the model is not structurally `head(last_hidden_state)`, and its logits rows are the features.
    """
    if supports_fused(model):  # a student's weight gradient may go straight into its .grad (opd/grads.py)
        return linear_head(head_weight(model, vocab_size), grad_into=in_place_weight(model))
    from opd.distributed import is_sharded

    module, backbone, transforms = _parts(model)
    if is_sharded(model) or not isinstance(backbone, torch.nn.Module) or backbone is model or module is None:
        return None
    if (type(module) is torch.nn.Linear and module.bias is None and set(transforms) == {"final_logit_softcapping"}
            and _confirmed(model, "softcapped", softcapped_head(module.weight, transforms["final_logit_softcapping"]))):
        return softcapped_head(head_weight(model, vocab_size), transforms["final_logit_softcapping"])
    if type(module) is not torch.nn.Linear and not transforms and _confirmed(model, "module", module_head(module)):
        return module_head(module, vocab_size)
    return None


@torch.no_grad()
def _logits_match(model: torch.nn.Module, backbone: torch.nn.Module, head: Head) -> bool:
    """One 8-token forward both ways, in eval mode and the model's own dtype (no autocast): equal logits?"""
    parameter = next(model.parameters())
    module = model.get_output_embeddings()
    rows = min(getattr(module, "out_features", 1 << 30),
               getattr(model.get_input_embeddings(), "num_embeddings", 1 << 30))
    ids_1_S = (torch.arange(8, device=parameter.device) * 7 + 3)[None] % rows
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(parameter.device.type, enabled=False):
            plain_1_S_V = model(input_ids=ids_1_S).logits.float()
            hidden = getattr(backbone(input_ids=ids_1_S), "last_hidden_state", None)
            if hidden is None or hidden.shape[:2] != ids_1_S.shape:
                return False
            made_1_S_V = head(hidden[0]).float()[None]
    finally:
        model.train(was_training)
    tolerance = 1e-4 if parameter.dtype == torch.float32 else 2e-2  # relative to the logits' scale
    scale = plain_1_S_V.abs().max().clamp(min=1.0)
    return plain_1_S_V.shape == made_1_S_V.shape and bool(((plain_1_S_V - made_1_S_V).abs() <= tolerance * scale).all())


def head_weight(model: torch.nn.Module, vocab_size: int | None) -> Tensor:
    """The output projection's `[V, H]` weight, cut to the tokenizer's `vocab_size` rows when the embedding is padded.

    No slice otherwise: a slice's backward allocates a zero-filled `[V, H]` gradient.
    """
    weight_V_H = model.get_output_embeddings().weight
    return weight_V_H[:vocab_size] if vocab_size is not None and vocab_size < weight_V_H.shape[0] else weight_V_H


def active_features(model: torch.nn.Module, head: Head | None, tokens_B_L: Tensor, attention_mask_B_L: Tensor,
                    active_B_T: Tensor, vocab_size: int | None = None, prompt_lens_B: Tensor | None = None,
                    completion_lens_B: Tensor | None = None, group_B: Tensor | None = None) -> Tensor:
    """features_N_X before each active target, row-major: hidden states for a head, else the logits rows."""
    if head is None:
        logits_B_L_V = model(input_ids=tokens_B_L, attention_mask=attention_mask_B_L).logits
        return vocab_logits(logits_B_L_V[:, :-1], vocab_size)[active_B_T]
    return active_hidden_states(model, tokens_B_L, attention_mask_B_L, active_B_T, prompt_lens_B, completion_lens_B,
                                group_B)


def active_hidden_states(model: torch.nn.Module, tokens_B_L: Tensor, attention_mask_B_L: Tensor, active_B_T: Tensor,
                         prompt_lens_B: Tensor | None = None, completion_lens_B: Tensor | None = None,
                         group_B: Tensor | None = None) -> Tensor:
    """hidden_N_H: the final hidden state before each active target, in the row-major order of `x_B_T[active_B_T]`.

    Given each row's prompt and completion lengths and group, rows of one group that have active targets
    share their prompt's forward (`shared_prompt_hidden_states`), gradients included; not under gradient
    checkpointing (transformers then drops the KV cache the second pass needs).
    """
    if prompt_lens_B is not None and group_B is not None:
        rows_A = active_B_T.any(-1).nonzero().squeeze(1)
        P_A, C_A, group_A = (x.to(active_B_T.device)[rows_A] for x in (prompt_lens_B, completion_lens_B, group_B))
        span_A_T = completion_mask(P_A, C_A, active_B_T.shape[1]) != 0
        shared = (rows_A.numel() >= 2 and torch.unique(group_A).numel() < rows_A.numel()
                  and not (active_B_T[rows_A] & ~span_A_T).any()
                  and not any(getattr(m, "gradient_checkpointing", False) for m in model.modules()))
        if shared:
            hidden_A_R_H, real_A_R = shared_prompt_hidden_states(model, tokens_B_L[rows_A], P_A, C_A, group_A)
            R = real_A_R.shape[1]
            targets_A_R = (P_A[:, None] - 1 + torch.arange(R, device=P_A.device)).clamp(max=active_B_T.shape[1] - 1)
            return hidden_A_R_H[real_A_R & active_B_T[rows_A].gather(1, targets_A_R)]
    hidden_B_L_H = getattr(model, model.base_model_prefix)(input_ids=tokens_B_L,
                                                           attention_mask=attention_mask_B_L).last_hidden_state
    return hidden_B_L_H[:, :-1][active_B_T]


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: `cache` in the transformers that deprecate `past_key_values`
    (5.24 warns at every call), `past_key_values` before; read from the model class's signature."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper takes **kwargs
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def shared_prompt_hidden_states(model: torch.nn.Module, tokens_A_L: Tensor, prompt_lens_A: Tensor,
                                completion_lens_A: Tensor, group_A: Tensor) -> tuple[Tensor, Tensor]:
    """(hidden_A_R_H, real_A_R): the final hidden state that predicts each completion token of right-padded rows.

    Pass 1 runs the U distinct prompts (one row per group), left-padded (positions follow the mask, as in
    the rollout engine); its last position predicts every row's first completion token, and its KV cache
    is copied to the rows. Pass 2 runs the right-padded completions on that cache, positions continuing
    each row's prompt. Causal attention makes this the same computation as one forward over
    `prompt + completion` (tests/test_fused.py); under autograd the cache copy's backward sums each
    row's gradient into its prompt. Rows of one group must hold the same prompt (checked).
    """
    device, (A, L) = tokens_A_L.device, tokens_A_L.shape
    _, group_A = torch.unique(group_A, return_inverse=True)
    U = int(group_A.max()) + 1
    rep_U = torch.full((U,), A, device=device).scatter_reduce_(0, group_A, torch.arange(A, device=device), "amin")
    P_A = prompt_lens_A.long()
    W = int(P_A.max())
    j_W = torch.arange(W, device=device)
    same_A = (P_A == P_A[rep_U][group_A]) & ((tokens_A_L[:, :W] == tokens_A_L[rep_U][group_A][:, :W])
                                             | (j_W >= P_A[:, None])).all(-1)
    if not same_A.all():
        row = int((~same_A).nonzero()[0])
        raise ValueError(f"row {row} shares a prompt group with row {int(rep_U[group_A[row]])} but not its prompt: "
                         "rows of one prompt index must hold the same prompt tokens")
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    P_U = P_A[rep_U]
    src_U_W = j_W - (W - P_U)[:, None]  # left padding
    prompt_mask_U_W = (src_U_W >= 0).long()
    prompts_U_W = torch.where(src_U_W >= 0, tokens_A_L[rep_U].gather(1, src_U_W.clamp(min=0)), pad_id)
    R = max(int(completion_lens_A.max()), 1)
    r_R = torch.arange(R, device=device)
    real_A_R = r_R < completion_lens_A[:, None]
    completions_A_R = torch.where(real_A_R, tokens_A_L.gather(1, (P_A[:, None] + r_R).clamp(max=L - 1)), pad_id)
    backbone = getattr(model, model.base_model_prefix)
    cache = DynamicCache(config=model.config)
    with casts_cached(model):  # bf16: the two passes share one cast of each weight (and its backward, one convert)
        last_U_H = backbone(input_ids=prompts_U_W, attention_mask=prompt_mask_U_W, **{cache_keyword(backbone): cache},
                            use_cache=True, position_ids=(prompt_mask_U_W.cumsum(-1) - 1).clamp(min=0)
                            ).last_hidden_state[:, -1]
        cache.batch_select_indices(group_A)
        hidden_A_R_H = backbone(input_ids=completions_A_R, **{cache_keyword(backbone): cache}, use_cache=True,
                                attention_mask=torch.cat([prompt_mask_U_W[group_A], real_A_R.long()], dim=1),
                                position_ids=P_A[:, None] + r_R).last_hidden_state
    # the hidden state before completion token j: the prompt's last for j = 0, completion token j - 1's after
    return torch.cat([last_U_H[group_A, None], hidden_A_R_H[:, :-1]], dim=1), real_A_R


def masked_token_logprobs(model: torch.nn.Module, tokens_B_L: Tensor, attention_mask_B_L: Tensor, mask_B_T: Tensor,
                          temperature: float = 1.0, vocab_size: int | None = None, top_k: int = 0, top_p: float = 1.0,
                          prompt_lens_B: Tensor | None = None, completion_lens_B: Tensor | None = None,
                          group_B: Tensor | None = None) -> Tensor:
    """logprobs_B_T of `tokens_B_L[:, 1:]` under `model` at the positions where `mask_B_T` is set, 0.0 elsewhere.

    The values of `token_logprobs(model(...).logits[:, :-1, :vocab_size], tokens[:, 1:], τ, top_k, top_p)` on the
    mask (docs/design.md §3: masked positions hold 0.0), through the model's head at the active rows only.
    """
    active_B_T = mask_B_T != 0
    head = model_head(model, vocab_size)
    features_N_X = active_features(model, head, tokens_B_L, attention_mask_B_L, active_B_T, vocab_size, prompt_lens_B,
                                   completion_lens_B, group_B)
    logprobs_N = gathered_logprobs(features_N_X, head or IDENTITY, tokens_B_L[:, 1:][active_B_T][:, None], temperature,
                                   top_k, top_p)[:, 0]
    return torch.zeros(mask_B_T.shape, dtype=logprobs_N.dtype, device=logprobs_N.device).masked_scatter(
        active_B_T, logprobs_N)


def active_logits(model: torch.nn.Module, tokens_B_L: Tensor, attention_mask_B_L: Tensor, active_B_T: Tensor,
                  vocab_size: int | None = None, **spans) -> Tensor:
    """logits_N_V predicting `tokens_B_L[:, 1:][active_B_T]`, row-major: `model(...).logits[:, :-1, :V][active]`."""
    head = model_head(model, vocab_size)
    features_N_X = active_features(model, head, tokens_B_L, attention_mask_B_L, active_B_T, vocab_size, **spans)
    return features_N_X if head is None else head(features_N_X)
