"""The `transformers` rollout engine: a KV-cached decode loop over `model(...)`, left-padded batches.

Why not `model.generate`: on the small models this library trains on CPU, generate's per-step
machinery (logits-processor lists, stopping criteria, `output_scores` kept for every step and
stacked into `[B, N, V]` at the end) and `torch.multinomial` (one exponential random number per
vocabulary entry per row per step) cost as much as the forward itself (bench/bench_step.py).
This loop does the same work with less around it:
- one forward per step over the rows still running: a row that sampled a stop id leaves the batch
  (its KV cache rows are dropped), so finished rows cost nothing;
- the KV cache is preallocated for prompt + max_new_tokens and each step writes one slot in
  place (`PreallocatedLayer`); transformers' DynamicCache concatenates, copying the whole cache
  every step, which was the largest single cost of a decode step on the tiny student;
- the sampler logprob of each token is read from the very distribution it was drawn from:
  `log_softmax` of `z / τ` after top-k / top-p truncation and after min_new_tokens removed the stops
  (docs/design.md §4), so `p` needs no second forward and equals the trainer's recomputation;
- sampling by inverse CDF: one uniform number per row and a float64 cumulative sum, instead of
  `V` exponentials per row; exact up to float64 rounding, and a zero-probability token (truncated,
  or a stop before min_new_tokens) can never be drawn;
- logits are cut to the tokenizer's ids before anything else, so padded embedding rows
  (e.g. 151,936 rows for 151,665 tokens) are never sampled and never enter a softmax (§5).
Positions follow the attention mask (left padding), so a prompt generates the same alone or in
a batch. The random stream is a `torch.Generator` seeded per call: deterministic, and the global
RNG is left alone. A sample ends at any id of the stop set (`opd.tokenization.stop_token_ids`: the
tokenizer's eos and every `generation_config.eos_token_id`), and that id is its last completion token.
No pad token is needed: padding is masked out, so any id fills it (`opd.tokenization.pad_id`).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from opd.distributed import is_sharded
from opd.forward import cache_keyword
from opd.kernels import truncation_threshold
from opd.precision import casts_cached
from opd.rollout import Sampling
from opd.tokenization import pad_id, stop_token_ids
from opd.types import Rollout


class HFRolloutEngine:
    """Samples from the very `model` object it is given, so `load_weights` is a no-op when shared.

    `stop_ids`: the ids that end a sample (default: `stop_token_ids(tokenizer, model.generation_config)`).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 256, stop_ids=None):
        self.model = model
        self.pad_id = pad_id(tokenizer)
        if stop_ids is None:
            stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        self.stop_ids = tuple(int(i) for i in stop_ids)
        if not self.stop_ids:
            raise ValueError("HFRolloutEngine needs at least one stop id")
        self.vocab_size = len(tokenizer)  # ids at or above this are embedding padding, never tokens
        self.batch_size = batch_size

    def load_weights(self, model: torch.nn.Module) -> None:
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())

    @torch.no_grad()
    def generate(self, prompts_P: list[list[int]], n: int, sampling: Sampling, seed: int) -> list[Rollout]:
        prompts = [(i, ids) for i, ids in enumerate(prompts_P) for _ in range(n)]  # prompt-major
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        rollouts = []
        try:
            with casts_cached(self.model):  # bf16: the student's weights cast once per call, not once per token
                for start in range(0, len(prompts), self.batch_size):
                    rollouts += self._generate_chunk(prompts[start : start + self.batch_size], sampling, generator,
                                                     device)
        finally:
            self.model.train(was_training)
        return rollouts

    def _generate_chunk(self, prompts: list[tuple[int, list[int]]], sampling: Sampling, generator: torch.Generator,
                        device: torch.device) -> list[Rollout]:
        B, N, K = len(prompts), sampling.max_new_tokens, sampling.record_topk
        if K > self.vocab_size:
            raise ValueError(f"record_topk={K} (student_topk) exceeds the student's vocabulary of {self.vocab_size} "
                             f"tokens; lower it to at most {self.vocab_size}")
        width = max(len(ids) for _, ids in prompts)
        input_ids_B_W = torch.full((B, width), self.pad_id, dtype=torch.long)
        attention_mask_B_W = torch.zeros_like(input_ids_B_W)
        for row, (_, ids) in enumerate(prompts):  # left padding; positions follow the mask
            input_ids_B_W[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask_B_W[row, width - len(ids) :] = 1
        input_ids_A_S, attention_mask_A_W = input_ids_B_W.to(device), attention_mask_B_W.to(device)
        position_ids_A_S = (attention_mask_A_W.cumsum(-1) - 1).clamp(min=0)
        tokens_B_N = torch.full((B, N), self.pad_id, dtype=torch.long, device=device)
        logprobs_B_N = torch.zeros((B, N), device=device)
        topk_B_N_K = torch.zeros((B, N, K), dtype=torch.long, device=device)
        stop_B = torch.zeros(B, dtype=torch.long, device=device)  # completion length if a stop was sampled, else 0
        stops_S = torch.tensor(self.stop_ids, device=device)
        rows_A = torch.arange(B, device=device)  # original row of each running (A) row
        cache = preallocated_cache(self.model.config, width + N)
        cache_kwargs = {cache_keyword(self.model): cache}  # the newer name where the model takes it
        lockstep = is_sharded(self.model)  # FSDP (opd/distributed.py)
        for step in range(N):
            logits_A_V = self.model(input_ids=input_ids_A_S, attention_mask=attention_mask_A_W,
                                    position_ids=position_ids_A_S, use_cache=True, logits_to_keep=1,
                                    **cache_kwargs).logits[:, -1, : self.vocab_size]
            ids_A, logprobs_A, topk_A_K = _sample(logits_A_V, sampling, stops_S if step < sampling.min_new_tokens
                                                  else None, generator)
            tokens_B_N[rows_A, step], logprobs_B_N[rows_A, step] = ids_A, logprobs_A
            if K:
                topk_B_N_K[rows_A, step] = topk_A_K
            running_A = ~torch.isin(ids_A, stops_S)
            if lockstep:  # every row stays: a sharded forward is a collective, so each rank runs all N of them
                first_A = ~running_A & (stop_B[rows_A] == 0)
                stop_B[rows_A[first_A]] = step + 1
            elif not running_A.all():  # finished rows leave the batch and the cache
                stop_B[rows_A[~running_A]] = step + 1
                keep_A = running_A.nonzero().squeeze(1)
                if keep_A.numel() == 0:
                    break
                cache.batch_select_indices(keep_A)
                rows_A, ids_A = rows_A[keep_A], ids_A[keep_A]
                attention_mask_A_W, position_ids_A_S = attention_mask_A_W[keep_A], position_ids_A_S[keep_A]
            input_ids_A_S = ids_A[:, None]
            position_ids_A_S = position_ids_A_S[:, -1:] + 1
            attention_mask_A_W = torch.cat([attention_mask_A_W, attention_mask_A_W.new_ones((len(rows_A), 1))], dim=1)
        tokens, logprobs, stops = tokens_B_N.tolist(), logprobs_B_N.tolist(), stop_B.tolist()
        topk = topk_B_N_K.tolist() if K else None
        return [Rollout(prompt_ids=list(ids), completion_ids=tokens[row][: stops[row] or N],
                        sampler_logprobs=logprobs[row][: stops[row] or N], finish_reason="stop" if stops[row] else "length",
                        prompt_index=prompt_index, sampler_topk_ids=topk[row][: stops[row] or N] if K else None)
                for row, (prompt_index, ids) in enumerate(prompts)]


class PreallocatedLayer(DynamicLayer):
    """A full-attention KV layer written in place into `[B, H, max_len, D]` buffers; it hands out views.

    Same contract as transformers' DynamicLayer (whose concatenation copies the cache each step);
    `batch_select_indices` drops finished rows. Only replaces plain DynamicLayers (full attention).
    """

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len, self.length = max_len, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buffer = key_states.new_empty((*key_states.shape[:2], self.max_len, key_states.shape[-1]))
        self.value_buffer = value_states.new_empty((*value_states.shape[:2], self.max_len, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot take position {end}")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]


def preallocated_cache(config, max_len: int) -> DynamicCache:
    """transformers' own cache for `config`, with each plain full-attention layer preallocated."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(max_len) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def sample_next(logits_A_V: torch.Tensor, sampling: Sampling, forbid_ids: torch.Tensor | int | None,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_A, logprobs_A): one token per row and its logprob under the distribution it was drawn from.

    `forbid_ids` (every stop id, before min_new_tokens) are removed first, as transformers'
    MinNewTokensLengthLogitsProcessor does with each eos id; then z = logits / τ, truncated by top-k
    then top-p with the trainer's own threshold (`opd.kernels`), so the logprob equals `token_logprobs` recomputed on the same logits. Greedy
    takes the argmax of the raw logits and reports its logprob under softmax(logits).
    """
    return _sample(logits_A_V, sampling, forbid_ids, generator)[:2]


def _sample(logits_A_V: torch.Tensor, sampling: Sampling, forbid_ids: torch.Tensor | int | None,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`sample_next`, and with `sampling.record_topk = K > 0` the K most likely ids of the very distribution
    each token was drawn from (`[A, K]`, after the stops were removed and z scaled by τ), else None."""
    z_A_V = logits_A_V.float()
    if forbid_ids is not None:
        z_A_V[:, forbid_ids] = float("-inf")
    if sampling.greedy:
        logprobs_A_V = torch.log_softmax(z_A_V, dim=-1)
        ids_A = logprobs_A_V.argmax(-1)
        return ids_A, logprobs_A_V.gather(-1, ids_A[:, None]).squeeze(1), _topk_ids(logprobs_A_V, sampling)
    if sampling.temperature != 1.0:  # z / 1 is z: the division (a [rows, V] pass per token) is skipped
        z_A_V = z_A_V / sampling.temperature
    if (0 < sampling.top_k < z_A_V.shape[-1]) or sampling.top_p < 1.0:
        threshold_A = truncation_threshold(z_A_V, sampling.top_k, sampling.top_p)
        z_A_V.masked_fill_(z_A_V < threshold_A[:, None], float("-inf"))
    logprobs_A_V = torch.log_softmax(z_A_V, dim=-1)
    cdf_A_V = torch.cumsum(logprobs_A_V.exp(), dim=-1, dtype=torch.float64)
    u_A_1 = torch.rand((z_A_V.shape[0], 1), generator=generator, device=z_A_V.device, dtype=torch.float64)
    # first id whose cdf exceeds u·total: an id of zero probability never does (its cdf equals its
    # predecessor's); u·total rounding up to the total itself falls back to the last id of positive mass
    ids_A = torch.searchsorted(cdf_A_V, u_A_1 * cdf_A_V[:, -1:], right=True).squeeze(1)
    past_end_A = ids_A >= z_A_V.shape[-1]
    if past_end_A.any():
        last_positive_A = z_A_V.shape[-1] - 1 - torch.isfinite(z_A_V).flip(-1).int().argmax(-1)
        ids_A = torch.where(past_end_A, last_positive_A, ids_A)
    return ids_A, logprobs_A_V.gather(-1, ids_A[:, None]).squeeze(1), _topk_ids(logprobs_A_V, sampling)


def _topk_ids(logprobs_A_V: torch.Tensor, sampling: Sampling) -> torch.Tensor | None:
    return logprobs_A_V.topk(sampling.record_topk, dim=-1).indices if sampling.record_topk else None
