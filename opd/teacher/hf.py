"""The in-process frozen `transformers` teacher: one right-padded forward per chunk of rollouts.

It scores `teacher_prompt_ids + completion_ids` and cuts the completion out of its own
target space, `[len(teacher_prompt) - 1, len(teacher_prompt) - 1 + R)` (docs/design.md §3);
`collate` then places it at the student's positions. When rows share a prompt (the G
completions of one prompt), each distinct prompt runs through the teacher once and its KV cache
serves all of its completions: with privileged GSM8K prompts (~214 teacher tokens) and G = 4 that
is about half the teacher's tokens (`opd.forward.active_hidden_states`). Given the tokenizer's `vocab_size`,
every distribution is formed over the tokenizer's ids only, so a padded embedding scores
exactly as the unpadded one (docs/design.md §5).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from opd.batch import right_pad
from opd.forward import active_features, model_head
from opd.heads import IDENTITY
from opd.kernels import gathered_logprobs, head_vocab, teacher_topk
from opd.logprobs import completion_mask
from opd.teacher import TeacherScores
from opd.types import Rollout


@contextmanager
def evaluating(model: torch.nn.Module):
    """`model` in eval mode inside the block, its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (no dropout) and no gradients, for good."""
    model.eval()
    model.requires_grad_(False)
    return model


@torch.inference_mode()
def score_tokens(model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]], temperature: float,
                 topk: int = 0, full_logits: bool = False, batch_size: int = 64, vocab_size: int | None = None,
                 groups: list[int] | None = None, at_ids: list[list[list[int]]] | None = None) -> list[TeacherScores]:
    """`model`'s view of each completion after its prompt, at `temperature`, aligned with the completion.

    `vocab_size` = len(tokenizer): logits past it (a padded embedding) are dropped before any
    softmax; None keeps every output row. `groups`: rows of one group share their prompt, which then
    runs once (None: every row is its own group). `at_ids`: per row, K given ids at each completion position
    (the student's top-k, `Rollout.sampler_topk_ids`): their logprobs come back as `logprobs_at_sampler_topk_R_K`,
    from the same log-softmax at `temperature` as the sampled token's, in one gather.
    """
    if temperature <= 0:
        raise ValueError(f"scoring temperature must be > 0, got {temperature}")
    if len(prompts) != len(completions) or (groups is not None and len(groups) != len(prompts)):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions and "
                         f"{None if groups is None else len(groups)} groups")
    groups = list(range(len(prompts))) if groups is None else groups
    if at_ids is not None and (len(at_ids) != len(prompts) or topk):
        raise ValueError(f"at_ids: {len(at_ids)} rows of ids for {len(prompts)} prompts, with topk={topk}: give one "
                         "row per prompt, and either the teacher's own top-k or given ids, not both")
    head = model_head(model, vocab_size)
    scores = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        scores += _score_chunk(model, head, prompts[chunk], completions[chunk], groups[chunk], temperature, topk,
                               full_logits, vocab_size, None if at_ids is None else at_ids[chunk])
    return scores


def _score_chunk(model, head, prompts, completions, groups, temperature, topk, full_logits,
                 vocab_size, at_ids=None) -> list[TeacherScores]:
    """The head runs at the completion tokens only (no `[B, T, V]` logits for prompts or padding), each
    distinct prompt once; without a head (`forward.model_head` is None) the logits rows take its place."""
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    tokens_B_L, attention_mask_B_L = right_pad([p + c for p, c in zip(prompts, completions, strict=True)], pad_id)
    tokens_B_L, attention_mask_B_L = tokens_B_L.to(device), attention_mask_B_L.to(device)
    lengths = [len(c) for c in completions]
    prompt_lens_B, completion_lens_B = torch.tensor([len(p) for p in prompts]), torch.tensor(lengths)
    active_B_T = completion_mask(prompt_lens_B, completion_lens_B, tokens_B_L.shape[1] - 1).to(device) != 0
    features_N_X = active_features(model, head, tokens_B_L, attention_mask_B_L, active_B_T, vocab_size,
                                   prompt_lens_B, completion_lens_B, torch.tensor(groups))  # row by row, in order
    targets_N, kernel_head = tokens_B_L[:, 1:][active_B_T], head or IDENTITY
    topk_lp_R_K = topk_ids_R_K = at_R_K = [None] * len(lengths)
    if at_ids is not None:  # one gather: the sampled token's logprob, then the K given ids'
        both_N_K1 = gathered_logprobs(features_N_X, kernel_head, torch.cat([targets_N[:, None], _given_ids(
            at_ids, lengths, features_N_X, kernel_head)], dim=1), temperature)
        logprobs_N, at_R_K = both_N_K1[:, 0], both_N_K1[:, 1:].cpu().split(lengths)
    elif topk:
        logprobs_N, topk_lp_N_K, topk_ids_N_K = teacher_topk(features_N_X, kernel_head, targets_N, temperature, topk)
        topk_lp_R_K, topk_ids_R_K = topk_lp_N_K.cpu().split(lengths), topk_ids_N_K.cpu().split(lengths)
    else:
        logprobs_N = gathered_logprobs(features_N_X, kernel_head, targets_N[:, None], temperature)[:, 0]
    logits_R_V = hidden_R_H = [None] * len(lengths)
    if full_logits and head is not None and not topk:  # stays factored: the scorer's head makes the logits
        hidden_R_H = features_N_X.cpu().split(lengths)
    elif full_logits:
        logits_R_V = kernel_head(features_N_X).float().cpu().split(lengths)
    return [TeacherScores(logprobs_R=lp.clone(), topk_ids_R_K=_cloned(ids), topk_logprobs_R_K=_cloned(tlp),
                          logits_R_V=_cloned(logits), hidden_R_H=_cloned(hidden), logprobs_at_sampler_topk_R_K=_cloned(at))
            for lp, ids, tlp, logits, hidden, at in zip(logprobs_N.cpu().split(lengths), topk_ids_R_K, topk_lp_R_K,
                                                        logits_R_V, hidden_R_H, at_R_K, strict=True)]


def _given_ids(at_ids: list[list[list[int]]], lengths: list[int], features_N_X: torch.Tensor, head) -> torch.Tensor:
    """ids_N_K: the rows' given ids, row-major like the features, checked against the teacher's vocabulary."""
    for row, (ids, R) in enumerate(zip(at_ids, lengths, strict=True)):
        if ids is None or len(ids) != R:
            raise ValueError(f"row {row}: {None if ids is None else len(ids)} positions of given ids for {R} "
                             f"completion tokens (rollouts need sampler_topk_ids: Sampling.record_topk)")
    ids_N_K = torch.tensor([k for row in at_ids for k in row], dtype=torch.long, device=features_N_X.device)
    V = head_vocab(head, features_N_X) if features_N_X.shape[0] else 1
    if ids_N_K.numel() and (ids_N_K.min() < 0 or ids_N_K.max() >= V):
        raise ValueError(f"a student top-k id ({int(ids_N_K.max())}) is outside the teacher's vocabulary [0, {V}): "
                         "loss=student_topk_rkl needs every student token to be a teacher token")
    K = next((len(k) for row in at_ids for k in row), 0)
    return ids_N_K.reshape(features_N_X.shape[0], K)


def _cloned(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.clone()


class HFTeacherScorer:
    """Scores with a frozen in-process model; applies any temperature exactly.

    `vocab_size`: the teacher tokenizer's length (docs/design.md §5); None scores over every output row.
    `tokenizer`: the teacher's, needed only for `generate_greedy` (its eos and pad ids). `freeze_model`:
    False leaves the module's mode and gradients as they are (an evaluator borrowing a model).
    """

    def __init__(self, model: torch.nn.Module, batch_size: int = 64, vocab_size: int | None = None, tokenizer=None,
                 freeze_model: bool = True):
        self.model = freeze(model) if freeze_model else model
        self.batch_size, self.vocab_size, self.tokenizer = batch_size, vocab_size, tokenizer
        # what makes logits of the hidden states `score(full_logits=True)` returns; None: it returns logits
        self.head = model_head(self.model, vocab_size)

    def score(self, rollouts: list[Rollout], temperature: float, topk: int = 0, full_logits: bool = False,
              at_sampler_topk: bool = False) -> list[TeacherScores]:
        with evaluating(self.model):  # a borrowed model may be in train mode (its prompt cache is off there)
            return score_tokens(self.model, [r.teacher_prompt_ids for r in rollouts], [r.completion_ids for r in rollouts],
                                temperature, topk=topk, full_logits=full_logits, batch_size=self.batch_size,
                                vocab_size=self.vocab_size, groups=[r.prompt_index for r in rollouts],
                                at_ids=[r.sampler_topk_ids for r in rollouts] if at_sampler_topk else None)

    def generate_greedy(self, prompts_P: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        from opd.rollout import Sampling
        from opd.rollout.hf import HFRolloutEngine

        if self.tokenizer is None:
            raise ValueError("HFTeacherScorer needs the teacher's tokenizer for greedy traces (tokenizer=...)")
        greedy = Sampling(greedy=True, max_new_tokens=max_new_tokens)
        rollouts = HFRolloutEngine(self.model, self.tokenizer).generate(prompts_P, 1, greedy, seed=0)
        return [r.completion_ids for r in rollouts]
