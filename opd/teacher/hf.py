"""The in-process frozen `transformers` teacher: one right-padded forward per chunk of rollouts.

It scores `teacher_prompt_ids + completion_ids` and cuts the completion out of its own
target space, `[len(teacher_prompt) - 1, len(teacher_prompt) - 1 + R)` (docs/design.md §3);
`collate` then places it at the student's positions. When rows share a prompt (the G
completions of one prompt), each distinct prompt runs through the teacher once and its KV cache
serves all of its completions: with privileged GSM8K prompts (~214 teacher tokens) and G = 4 that
is about half the teacher's tokens (`opd.fused.active_hidden_states`). Given the tokenizer's `vocab_size`,
every distribution is formed over the tokenizer's ids only, so a padded embedding scores
exactly as the unpadded one (docs/design.md §5).
"""

from __future__ import annotations

import torch

from opd.batch import right_pad
from opd.fused import active_hidden_states, head_weight, linear_token_logprobs, supports_fused
from opd.logprobs import completion_mask, token_logprobs
from opd.teacher import TeacherScores
from opd.tokenization import vocab_logits
from opd.types import Rollout


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (no dropout) and no gradients, for good."""
    model.eval()
    model.requires_grad_(False)
    return model


@torch.inference_mode()
def score_tokens(model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]], temperature: float,
                 topk: int = 0, full_logits: bool = False, batch_size: int = 64,
                 vocab_size: int | None = None) -> list[TeacherScores]:
    """`model`'s view of each completion after its prompt, at `temperature`, aligned with the completion.

    `vocab_size` = len(tokenizer): logits past it (a padded embedding) are dropped before any
    softmax; None keeps every output row.
    """
    if temperature <= 0:
        raise ValueError(f"scoring temperature must be > 0, got {temperature}")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    scores = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        scores += _score_chunk(model, prompts[chunk], completions[chunk], temperature, topk, full_logits, vocab_size)
    return scores


def _score_chunk(model, prompts, completions, temperature, topk, full_logits, vocab_size) -> list[TeacherScores]:
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    tokens_B_L, attention_mask_B_L = right_pad([p + c for p, c in zip(prompts, completions, strict=True)], pad_id)
    tokens_B_L, attention_mask_B_L = tokens_B_L.to(device), attention_mask_B_L.to(device)
    if supports_fused(model):
        return _fused_scores(model, prompts, completions, tokens_B_L, attention_mask_B_L, temperature, topk,
                             full_logits, vocab_size)
    logits_B_L_V = model(input_ids=tokens_B_L, attention_mask=attention_mask_B_L).logits
    spans = [(row, slice(len(p) - 1, len(p) - 1 + len(c))) for row, (p, c) in enumerate(zip(prompts, completions,
                                                                                              strict=True))]
    return _scores_from_logits(vocab_logits(logits_B_L_V[:, :-1], vocab_size), tokens_B_L[:, 1:], spans, temperature,
                               topk, full_logits)


def _scores_from_logits(logits_B_T_V, targets_B_T, spans: list[tuple[int, slice]], temperature, topk,
                        full_logits) -> list[TeacherScores]:
    """One completion's scores per `(row, span)` of target space, from logits at `temperature`."""
    logprobs_B_T = token_logprobs(logits_B_T_V, targets_B_T, temperature=temperature).cpu()
    if topk:
        k = min(topk, logits_B_T_V.shape[-1])
        topk_logprobs_B_T_K, topk_ids_B_T_K = torch.log_softmax(logits_B_T_V.float() / temperature, -1).topk(k, -1)
        topk_logprobs_B_T_K, topk_ids_B_T_K = topk_logprobs_B_T_K.cpu(), topk_ids_B_T_K.cpu()
    return [TeacherScores(logprobs_R=logprobs_B_T[row, span].clone(),
                          topk_ids_R_K=topk_ids_B_T_K[row, span].clone() if topk else None,
                          topk_logprobs_R_K=topk_logprobs_B_T_K[row, span].clone() if topk else None,
                          logits_R_V=logits_B_T_V[row, span].float().cpu().clone() if full_logits else None)
            for row, span in spans]


def _fused_scores(model, prompts, completions, tokens_B_L, attention_mask_B_L, temperature, topk, full_logits,
                  vocab_size) -> list[TeacherScores]:
    """`_score_chunk`'s values through opd/fused.py: the head runs at the completion tokens only (no `[B, T, V]`
    logits for prompts or padding), and each distinct prompt runs once for all of its completions."""
    lengths = [len(c) for c in completions]
    mask_B_T = completion_mask(torch.tensor([len(p) for p in prompts]), torch.tensor(lengths), tokens_B_L.shape[1] - 1)
    active_B_T = mask_B_T.to(tokens_B_L.device) != 0
    hidden_N_H = active_hidden_states(model, tokens_B_L, attention_mask_B_L, active_B_T)  # row by row, in order
    targets_N, weight_V_H = tokens_B_L[:, 1:][active_B_T], head_weight(model, vocab_size)
    if not topk:  # logits one chunk of rows at a time; a full distribution stays factored as (hidden, head)
        logprobs_R = linear_token_logprobs(hidden_N_H, weight_V_H, targets_N, temperature).cpu().split(lengths)
        if not full_logits:
            return [TeacherScores(logprobs_R=lp.clone()) for lp in logprobs_R]
        head_V_H = weight_V_H.detach()  # a view of the frozen weight, never a copy
        return [TeacherScores(logprobs_R=lp.clone(), hidden_R_H=h.cpu().clone(), head_V_H=head_V_H)
                for lp, h in zip(logprobs_R, hidden_N_H.split(lengths), strict=True)]
    ends = torch.tensor(lengths).cumsum(0).tolist()
    return _scores_from_logits((hidden_N_H @ weight_V_H.T)[None], targets_N[None],
                               [(0, slice(end - n, end)) for n, end in zip(lengths, ends, strict=True)], temperature,
                               topk, full_logits)


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

    def score(self, rollouts: list[Rollout], temperature: float, topk: int = 0, full_logits: bool = False) -> list[TeacherScores]:
        return score_tokens(self.model, [r.teacher_prompt_ids for r in rollouts], [r.completion_ids for r in rollouts],
                            temperature, topk=topk, full_logits=full_logits, batch_size=self.batch_size,
                            vocab_size=self.vocab_size)

    def generate_greedy(self, prompts_P: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        from opd.rollout import Sampling
        from opd.rollout.hf import HFRolloutEngine

        if self.tokenizer is None:
            raise ValueError("HFTeacherScorer needs the teacher's tokenizer for greedy traces (tokenizer=...)")
        greedy = Sampling(greedy=True, max_new_tokens=max_new_tokens)
        rollouts = HFRolloutEngine(self.model, self.tokenizer).generate(prompts_P, 1, greedy, seed=0)
        return [r.completion_ids for r in rollouts]
