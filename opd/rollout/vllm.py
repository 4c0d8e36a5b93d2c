"""The vLLM rollout engine: the student samples with `vllm.LLM`, imported lazily (GPU only).

Facts relied on (vLLM source):
- `logprobs_mode="processed_logprobs"` (EngineArgs, vLLM >= 0.10.2) returns logprobs of
  the distribution really sampled: after logits processors (min_tokens, ...), temperature
  and top-k/top-p (`Sampler.sample` and `TopKTopPSampler.forward_native`,
  `vllm/v1/sample/`). The default `raw_logprobs` ignores all of them, so without the mode
  only τ = 1 with no truncation and no min_tokens is allowed (DESIGN.md §4).
- `logprobs=k` gives, per generated token, a dict that always holds the sampled token
  ("the API will always return the log probability of the sampled token",
  `SamplingParams.logprobs`).
- the eos token is appended to the output before the stop check and stays in
  `CompletionOutput.token_ids`; a stop from `stop_token_ids` (e.g. extra eos ids of
  generation_config.json) sets `stop_reason` to that id (`check_stop`,
  `vllm/v1/core/sched/utils.py`). `skip_special_tokens` only affects the text.
- `SamplingParams.top_k` disables truncation with -1 in old versions and 0 in new ones
  (where -1 is still accepted); we use the installed default.
- weights: `LLM.apply_model(fn)` runs `fn(model)` in each worker; `model.load_weights`
  takes `(hf_name, tensor)` pairs and returns the loaded parameter names, which vLLM's
  own loader checks against `named_parameters()` (`model_loader/default_loader.py`).
  The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as TRL's colocate mode)
  so `fn` and the weights are not pickled.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch

from opd.lora import merged_state_dict
from opd.rollout import Sampling
from opd.types import Rollout

_INSTALL = "the vLLM rollout backend needs vLLM: `pip install opd[vllm]` (GPU only), or use rollout_backend='hf'"


def sampled_logprobs(token_ids: Sequence[int], logprobs: Sequence | None, where: str) -> list[float]:
    """The logprob of each generated token, from vLLM's per-token dicts (int or str keys)."""
    if logprobs is None or len(logprobs) != len(token_ids):
        raise ValueError(f"{where}: {None if logprobs is None else len(logprobs)} logprob rows for "
                         f"{len(token_ids)} generated tokens")
    out = []
    for t, (token, row) in enumerate(zip(token_ids, logprobs, strict=True)):
        entries = {int(k): v for k, v in (row or {}).items() if v is not None}
        if int(token) not in entries:
            raise ValueError(f"{where}: no logprob for generated token {t} (id {token}); entries {sorted(entries)}")
        entry = entries[int(token)]
        value = float(entry["logprob"] if isinstance(entry, Mapping) else entry.logprob)
        if not math.isfinite(value):
            raise ValueError(f"{where}: generated token {t} (id {token}) has logprob {value} under the sampler")
        out.append(value)
    return out


def rollout_from_completion(prompt_ids: list[int], prompt_index: int, token_ids: Sequence[int], logprobs,
                            finish_reason: str | None, stop_reason, eos_id: int) -> Rollout:
    """One `CompletionOutput` -> `Rollout`; a stop must end on the eos (or the `stop_reason` id), kept in the ids."""
    where = f"prompt {prompt_index}"
    token_ids = [int(t) for t in token_ids]
    if not token_ids:
        raise ValueError(f"{where}: vLLM generated no token")
    if finish_reason == "stop":
        stop_id = eos_id if stop_reason is None else stop_reason
        if not isinstance(stop_id, int) or token_ids[-1] != stop_id:
            raise ValueError(f"{where}: finish_reason 'stop' (stop_reason={stop_reason!r}) but the last token is "
                             f"{token_ids[-1]}, not the stop token; stop strings are not supported")
    elif finish_reason != "length":
        raise ValueError(f"{where}: unsupported finish_reason {finish_reason!r} (expected 'stop' or 'length')")
    return Rollout(prompt_ids=list(prompt_ids), completion_ids=token_ids,
                   sampler_logprobs=sampled_logprobs(token_ids, logprobs, where), finish_reason=finish_reason,
                   prompt_index=prompt_index)


def needs_processed_logprobs(sampling: Sampling) -> bool:
    """Whether raw logprobs would differ from those of the distribution sampled."""
    if sampling.greedy:
        return sampling.min_new_tokens > 0
    return sampling.temperature != 1.0 or sampling.top_k > 0 or sampling.top_p < 1.0 or sampling.min_new_tokens > 0


def request_seed(seed: int, prompt_index: int, n: int) -> int:
    """Distinct per prompt; vLLM seeds the n samples of a request with seed + j (`parallel_sampling.py`)."""
    return (seed * 1_000_003 + prompt_index * n) % (2**62)


@contextmanager
def _env_default(name: str, value: str):
    """Set `name` for the duration unless the user set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


class VLLMRolloutEngine:
    """Samples with an in-process `vllm.LLM` built from the student's folder; `load_weights` pushes the trained weights.

    `model_path_or_model`: a folder, or the HF student itself (its `name_or_path` is loaded,
    then its current weights pushed, and its dtype used unless `dtype` is given). Extra
    keyword arguments go to `vllm.LLM`.
    """

    def __init__(self, model_path_or_model, tokenizer, *, gpu_memory_utilization: float = 0.3,
                 dtype: str | None = None, max_model_len: int | None = None, seed: int = 0, **llm_kwargs):
        try:
            from vllm import LLM, SamplingParams
            from vllm.engine.arg_utils import EngineArgs
        except ImportError as error:
            raise ImportError(_INSTALL) from error
        self._sampling_params_cls = SamplingParams
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer needs an eos token")
        module = None if isinstance(model_path_or_model, str | os.PathLike) else model_path_or_model
        path = str(model_path_or_model if module is None else module.name_or_path)
        if dtype is None:
            dtype = "auto" if module is None else str(next(module.parameters()).dtype).removeprefix("torch.")
        self.processed = "logprobs_mode" in {f.name for f in dataclasses.fields(EngineArgs)}
        if self.processed:
            llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        if llm_kwargs.get("logprobs_mode", "processed_logprobs") != "processed_logprobs":
            raise ValueError(f"logprobs_mode={llm_kwargs['logprobs_mode']!r}: sampler logprobs must be "
                             "'processed_logprobs' (those of the distribution sampled)")
        with _env_default("VLLM_ENABLE_V1_MULTIPROCESSING", "0"):
            self.llm = LLM(model=path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                           max_model_len=max_model_len, seed=seed, **llm_kwargs)
        self.top_k_off = SamplingParams().top_k  # -1 in old vLLM, 0 in new
        if module is not None:
            self.load_weights(module)

    def _sampling_params(self, sampling: Sampling, n: int, seed: int):
        if needs_processed_logprobs(sampling) and not self.processed:
            raise ValueError(f"sampling {sampling} needs the logprobs of the processed (temperature-scaled, "
                             "truncated) distribution, which this vLLM cannot return (no logprobs_mode); "
                             "install vllm>=0.10.2, or sample with temperature=1, top_k=0, top_p=1, min_new_tokens=0")
        common = dict(n=n, max_tokens=sampling.max_new_tokens, min_tokens=sampling.min_new_tokens, logprobs=1,
                      seed=seed, detokenize=False, ignore_eos=False, repetition_penalty=1.0, presence_penalty=0.0,
                      frequency_penalty=0.0, min_p=0.0)
        if sampling.greedy:
            return self._sampling_params_cls(temperature=0.0, **common)
        return self._sampling_params_cls(temperature=sampling.temperature, top_p=sampling.top_p,
                                         top_k=sampling.top_k if sampling.top_k > 0 else self.top_k_off, **common)

    def generate(self, prompts_P: list[list[int]], n: int, sampling: Sampling, seed: int) -> list[Rollout]:
        # vLLM forbids n > 1 when greedy: send n copies of the prompt instead.
        copies, per_request = (n, 1) if sampling.greedy else (1, n)
        requests = [(i, ids) for i, ids in enumerate(prompts_P) for _ in range(copies)]  # prompt-major
        params = [self._sampling_params(sampling, per_request, request_seed(seed, k, n))
                  for k, _ in enumerate(requests)]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for _, ids in requests], params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        rollouts = []
        for (prompt_index, ids), output in zip(requests, outputs, strict=True):
            if list(output.prompt_token_ids) != list(ids):
                raise ValueError(f"prompt {prompt_index}: vLLM generated from other prompt tokens than were sent")
            completions = sorted(output.outputs, key=lambda c: c.index)
            if len(completions) != per_request:
                raise ValueError(f"prompt {prompt_index}: {len(completions)} completions, asked for {per_request}")
            rollouts += [rollout_from_completion(ids, prompt_index, c.token_ids, c.logprobs, c.finish_reason,
                                                 getattr(c, "stop_reason", None), self.eos_id) for c in completions]
        return rollouts

    @torch.no_grad()
    def load_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s weights into the engine, check every engine parameter was written, drop stale KV cache."""
        weights = [(name, tensor.detach()) for name, tensor in merged_state_dict(model).items()]  # LoRA: W + BA
        if not hasattr(self.llm, "apply_model"):
            raise RuntimeError("this vLLM has no LLM.apply_model (added in vLLM 0.9); install vllm>=0.10.2")

        def load(vllm_model: torch.nn.Module) -> list[str]:
            loaded = vllm_model.load_weights(weights)
            if loaded is None:  # a model without loaded-weights tracking: nothing to check
                return []
            return sorted({name for name, _ in vllm_model.named_parameters()} - set(loaded))

        for missing in self.llm.apply_model(load):
            if missing:
                raise RuntimeError(f"load_weights left {len(missing)} vLLM parameters unwritten, e.g. {missing[:5]}; "
                                   "the student's state_dict names do not match the vLLM model")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
