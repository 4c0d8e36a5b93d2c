"""Rollout engines: the student samples completions with the logprobs of what it sampled.

The backend is chosen here, once; the loop only sees the `RolloutEngine` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from opd.types import Rollout


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn. `greedy` ignores temperature and truncation."""

    temperature: float = 1.0  # τ: the student samples from softmax(z / τ)
    top_k: int = 0  # 0 = no top-k truncation
    top_p: float = 1.0  # 1.0 = no nucleus truncation
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # > 0 forbids eos before that many tokens (benchmarks only)
    greedy: bool = False
    # > 0: each rollout also records the K most likely ids of the distribution each token was drawn from
    # (`Rollout.sampler_topk_ids`; loss=student_topk_rkl, docs/design.md §4)
    record_topk: int = 0

    def __post_init__(self) -> None:
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"sampling temperature must be > 0 (got {self.temperature}); use greedy=True for argmax")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got top_k={self.top_k}, top_p={self.top_p}")
        if self.record_topk < 0:
            raise ValueError(f"record_topk must be >= 0 (0 = off), got {self.record_topk}")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens, got "
                             f"{self.max_new_tokens}, {self.min_new_tokens}")


class RolloutEngine(Protocol):
    def generate(self, prompts_P: list[list[int]], n: int, sampling: Sampling, seed: int) -> list[Rollout]:
        """`n` completions of each prompt, prompt-major (rollouts_PG), with sampler logprobs."""
        ...

    def load_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (stay on-policy)."""
        ...


def make_rollout_engine(backend: str, model: torch.nn.Module, tokenizer, batch_size: int = 256,
                        seed: int = 0) -> RolloutEngine:
    """`seed`: the run's seed, for engines that take one at construction (vLLM re-seeds the process with it)."""
    if backend == "hf":
        from opd.rollout.hf import HFRolloutEngine

        return HFRolloutEngine(model, tokenizer, batch_size=batch_size)
    if backend == "vllm":
        from opd.rollout.vllm import VLLMRolloutEngine  # optional dependency, GPU only

        return VLLMRolloutEngine(model, tokenizer, seed=seed)
    raise ValueError(f"unknown rollout backend {backend!r}; accepted: 'hf', 'vllm'")
