"""The vLLM rollout engine: the student samples with `vllm.LLM`, imported lazily (GPU only).

Facts relied on (vLLM source, main branch of 2026-11, the 0.33 line; engine set-up rules in
opd/vllm_setup.py):
- `logprobs_mode="processed_logprobs"` (EngineArgs, vLLM >= 0.10.2) returns logprobs of
  the distribution really sampled: after logits processors (min_tokens, ...), temperature
  and top-k/top-p (`vllm/v1/sample/sampler.py::Sampler`, `vllm/v1/sample/ops/topk_topp_sampler.py`).
  The default `raw_logprobs` ignores all of them, so without the mode only τ = 1 with no
  truncation and no min_tokens is allowed (docs/design.md §4).
- `logprobs=k` gives, per generated token, a dict that always holds the sampled token
  ("the API will always return the log probability of the sampled token",
  `SamplingParams.logprobs`, `vllm/sampling_params.py`).
- the eos token is appended to the output before the stop check and stays in
  `CompletionOutput.token_ids`; a stop from `stop_token_ids` (e.g. extra eos ids of
  generation_config.json) sets `stop_reason` to that id (`check_stop`,
  `vllm/v1/core/sched/utils.py`). `skip_special_tokens` only affects the text.
- `SamplingParams.top_k` disables truncation with -1 in old versions and 0 in new ones
  (where -1 is still accepted); we use the installed default.
- n samples of one request are seeded `seed + j` (`vllm/v1/engine/parallel_sampling.py`).
- weights: `opd.vllm_setup.push_weights` (reload_weights, else apply_model). The engine runs
  in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as TRL's colocate mode) so the weights are not
  pickled.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import torch

from opd import vllm_setup
from opd.lora import merged_state_dict
from opd.rollout import Sampling
from opd.tokenization import stop_token_ids
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
                            finish_reason: str | None, stop_reason, eos_id: int | Sequence[int]) -> Rollout:
    """One `CompletionOutput` -> `Rollout`; a stop must end on a stop id (or the `stop_reason` id), kept in the ids.

    `eos_id`: the eos id, or the run's whole stop set (`opd.tokenization.stop_token_ids`).
    """
    where = f"prompt {prompt_index}"
    token_ids = [int(t) for t in token_ids]
    if not token_ids:
        raise ValueError(f"{where}: vLLM generated no token")
    if finish_reason == "stop":
        stop_ids = ({eos_id} if isinstance(eos_id, int) else set(eos_id)) if stop_reason is None else {stop_reason}
        if not all(isinstance(i, int) for i in stop_ids) or token_ids[-1] not in stop_ids:
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


class VLLMRolloutEngine:
    """Samples with an in-process `vllm.LLM` built from the student's folder; `load_weights` pushes the trained weights.

    `model_path_or_model`: a folder, or the HF student itself (its `name_or_path` is loaded,
    then its current weights pushed, and its dtype used unless `dtype` is given). `seed`: the
    run's seed (vLLM re-seeds this process's RNGs with it when the engine starts; the loop builds
    engines before a resume restores the RNG states, so resume stays exact). Extra keyword
    arguments go to `vllm.LLM`.
    """

    def __init__(self, model_path_or_model, tokenizer, *, gpu_memory_utilization: float = 0.3,
                 dtype: str | None = None, max_model_len: int | None = None, seed: int = 0, **llm_kwargs):
        try:
            import vllm
            from vllm import LLM, SamplingParams
            from vllm.engine.arg_utils import EngineArgs
        except ImportError as error:
            raise ImportError(_INSTALL) from error
        if hasattr(vllm, "__version__"):  # a stand-in module in tests has none
            vllm_setup.check_vllm_version(vllm.__version__)
        self._sampling_params_cls = SamplingParams
        module = None if isinstance(model_path_or_model, str | os.PathLike) else model_path_or_model
        # the run's stop set (every eos of the tokenizer and generation config), as the HF engine uses
        self.stop_ids = stop_token_ids(tokenizer, getattr(module, "generation_config", None))
        path = str(model_path_or_model if module is None else module.name_or_path)
        if dtype is None:
            dtype = "auto" if module is None else str(next(module.parameters()).dtype).removeprefix("torch.")
        self.processed = "logprobs_mode" in {f.name for f in dataclasses.fields(EngineArgs)}
        if self.processed:
            llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        if llm_kwargs.get("logprobs_mode", "processed_logprobs") != "processed_logprobs":
            raise ValueError(f"logprobs_mode={llm_kwargs['logprobs_mode']!r}: sampler logprobs must be "
                             "'processed_logprobs' (those of the distribution sampled)")
        vllm_setup.engines_in_process(True, vllm_setup.vllm_reads_multiprocessing)
        llm_kwargs |= vllm_setup.engine_kwargs(seed, vllm_setup.world_size(), llm_kwargs)
        self.llm = LLM(model=path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, **llm_kwargs)
        self.top_k_off = SamplingParams().top_k  # -1 in old vLLM, 0 in new
        self.sync_path = None  # "reload_weights" or "apply_model", once weights were pushed
        if module is not None:
            self.load_weights(module)

    def _sampling_params(self, sampling: Sampling, n: int, seed: int):
        if sampling.record_topk:
            raise ValueError(f"record_topk={sampling.record_topk}: the vLLM rollout engine does not record the "
                             "student's top-k ids (loss=student_topk_rkl); use rollout_backend=hf")
        if needs_processed_logprobs(sampling) and not self.processed:
            raise ValueError(f"sampling {sampling} needs the logprobs of the processed (temperature-scaled, "
                             "truncated) distribution, which this vLLM cannot return (no logprobs_mode); "
                             "install vllm>=0.10.2, or sample with temperature=1, top_k=0, top_p=1, min_new_tokens=0")
        common = dict(n=n, max_tokens=sampling.max_new_tokens, min_tokens=sampling.min_new_tokens, logprobs=1,
                      seed=seed, stop_token_ids=list(self.stop_ids), detokenize=False, ignore_eos=False, repetition_penalty=1.0, presence_penalty=0.0,
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
                                                 getattr(c, "stop_reason", None), self.stop_ids) for c in completions]
        return rollouts

    @torch.no_grad()
    def load_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s weights into the engine (`vllm_setup.push_weights`), then drop the stale KV cache."""
        weights = [(name, tensor.detach()) for name, tensor in merged_state_dict(model).items()]  # LoRA: W + BA
        self.sync_path = vllm_setup.push_weights(self.llm, weights, vllm_setup.is_quantized(self.llm))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

