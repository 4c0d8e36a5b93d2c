"""The `transformers` rollout engine: batched, KV-cached generation with left padding.

The sampler logprob of each token is read from the processed scores of the very step
that sampled it (temperature, top-k, top-p applied, renormalized), so `p` is the
distribution that was really sampled (DESIGN.md §4) and needs no second forward.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from opd.distributed import is_sharded
from opd.rollout import Sampling
from opd.types import Rollout


class HFRolloutEngine:
    """Samples from the very `model` object it is given, so `load_weights` is a no-op when shared."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 256):
        self.model = model
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.batch_size = batch_size
        if self.pad_id is None or self.eos_id is None:
            raise ValueError("the tokenizer needs a pad and an eos token for batched generation")

    def load_weights(self, model: torch.nn.Module) -> None:
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())

    def _generation_config(self, sampling: Sampling) -> GenerationConfig:
        # Every knob explicit: transformers fills an unset top_k with 50, and a checkpoint's
        # generation_config.json may set others; either would truncate behind our back.
        common = dict(max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens,
                      eos_token_id=self.eos_id, pad_token_id=self.pad_id, return_dict_in_generate=True,
                      output_scores=True)
        if sampling.greedy:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                                min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
                                **common)

    @torch.no_grad()
    def generate(self, prompts_P: list[list[int]], n: int, sampling: Sampling, seed: int) -> list[Rollout]:
        prompts = [(i, ids) for i, ids in enumerate(prompts_P) for _ in range(n)]  # prompt-major
        torch.manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        rollouts = []
        try:
            for start in range(0, len(prompts), self.batch_size):
                rollouts += self._generate_chunk(prompts[start : start + self.batch_size], sampling)
        finally:
            self.model.train(was_training)
        return rollouts

    def _generate_chunk(self, prompts: list[tuple[int, list[int]]], sampling: Sampling) -> list[Rollout]:
        device = next(self.model.parameters()).device
        width = max(len(ids) for _, ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, (_, ids) in enumerate(prompts):  # left padding; generate derives positions from the mask
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                  generation_config=self._generation_config(sampling),
                                  synced_gpus=is_sharded(self.model))  # FSDP: ranks decode in lockstep
        new_tokens_B_N = out.sequences[:, width:].cpu()
        scores_B_N_V = torch.stack(out.scores, dim=1).float()
        logprobs_B_N = torch.log_softmax(scores_B_N_V, dim=-1).gather(-1, new_tokens_B_N.to(scores_B_N_V.device)[..., None])
        logprobs_B_N = logprobs_B_N.squeeze(-1).cpu()
        rollouts = []
        for row, (prompt_index, ids) in enumerate(prompts):
            tokens = new_tokens_B_N[row].tolist()
            stop = tokens.index(self.eos_id) + 1 if self.eos_id in tokens else None
            rollouts.append(Rollout(
                prompt_ids=list(ids), completion_ids=tokens[:stop], sampler_logprobs=logprobs_B_N[row, :stop].tolist(), finish_reason="stop" if stop else "length",
                prompt_index=prompt_index))
        return rollouts
