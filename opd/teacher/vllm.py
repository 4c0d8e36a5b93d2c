"""The vLLM teacher: `prompt_logprobs` over `teacher_prompt_ids + completion_ids`, one generated token.

The parsing helpers here import nothing from vLLM, so they run (and are tested) on CPU;
`VLLMTeacherScorer` imports vLLM lazily. Facts relied on (vLLM source, main branch of 2026-11,
the 0.33 line; engine set-up rules in opd/vllm_setup.py):
- `RequestOutput.prompt_logprobs` has one row per prompt token and the first is `None`
  ("logprob of first prompt token is None", `vllm/v1/engine/logprobs.py::LogprobsProcessor`);
  row `i` is `dict[int, Logprob(logprob, rank, decoded_token)]` (`vllm/logprobs.py`) for token `i`.
  It always holds the prompt token itself plus the top `prompt_logprobs` tokens (ranks 1..K),
  so `K = 0` returns just the prompt token (`Sampler.gather_logprobs`, `vllm/v1/sample/sampler.py`).
- prompt logprobs are `log_softmax` of the RAW logits: `SamplingParams.temperature` and
  `logprobs_mode=processed_*` do not apply to them (vllm PR #47680: "processed logprobs
  is not apply to prompt logprobs"); a `prompt_logprobs_temperature` field is proposed in
  vllm PR #37082 (open). Hence docs/design.md §4: τ ≠ 1 is refused unless that field exists.
- `SamplingParams(prompt_logprobs=K)` above the engine's `max_logprobs` (default 20) is an error.
- the OpenAI server clamps `-inf` prompt logprobs to `-9999.0` (`clamp_prompt_logprobs`,
  `vllm/entrypoints/openai/engine/serving.py`, formerly `serving_engine.py`); we map it back to `-inf`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch

from opd import vllm_setup
from opd.teacher import NEEDS_LOGPROBS_AT_IDS, TeacherScores
from opd.types import Rollout

HTTP_NEG_INF = -9999.0  # vLLM's JSON stand-in for -inf
_LOGPROB_SLACK = 1e-4  # a logprob above this is not a logprob (e.g. a server started with --logprobs-mode *_logits)


def check_prompt_logprob_temperature(temperature: float, supported: bool) -> None:
    """docs/design.md §4: a backend that cannot apply τ to prompt logprobs refuses τ ≠ 1; it never scores at 1 silently."""
    if not temperature > 0:
        raise ValueError(f"scoring temperature must be > 0, got {temperature}")
    if temperature != 1.0 and not supported:
        raise ValueError(
            f"teacher scoring at temperature {temperature} was asked, but vLLM computes prompt_logprobs from the raw "
            "logits (temperature 1) and this vLLM has no `prompt_logprobs_temperature`; set sampling.temperature "
            "(and loss_temperature) to 1.0, or use teacher_backend='hf', which applies any temperature exactly")


def split_by_tokens(lengths: Sequence[int], n_parts: int) -> list[range]:
    """Contiguous, order-preserving split of rows into `min(n_parts, len(lengths))` non-empty ranges.

    Guarantee: the largest part's token sum is the minimum possible over all contiguous
    splits into that many parts (linear partition: binary search on the capacity, greedy
    fill). Hence it is <= max(lengths) + sum(lengths) / n_parts, and one very long row
    sits alone rather than dragging its neighbours into the slowest part.
    """
    if n_parts < 1:
        raise ValueError(f"n_parts must be >= 1, got {n_parts}")
    if any(x < 0 for x in lengths):
        raise ValueError(f"lengths must be >= 0, got {list(lengths)}")
    m = min(n_parts, len(lengths))
    if m == 0:
        return []
    lo, hi = max(lengths), sum(lengths)
    while lo < hi:  # smallest capacity a greedy fill meets with <= m parts
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _greedy_parts(lengths, mid) <= m else (mid + 1, hi)
    parts, start, acc = [], 0, 0
    for i, x in enumerate(lengths):
        must_split = len(lengths) - i <= m - len(parts) - 1  # every later part needs a row of its own
        if i > start and (acc + x > lo or must_split):
            parts.append(range(start, i))
            start, acc = i, 0
        acc += x
    parts.append(range(start, len(lengths)))
    assert len(parts) == m, f"split into {len(parts)} parts, expected {m} (lengths={list(lengths)})"
    return parts


def _greedy_parts(lengths: Sequence[int], capacity: int) -> int:
    count, acc = 1, 0
    for x in lengths:
        if acc + x > capacity and acc > 0:
            count, acc = count + 1, 0
        acc += x
    return count


def _field(entry, name: str):
    """`entry.name` of a vLLM `Logprob`, or `entry[name]` of the HTTP API's JSON object."""
    return entry.get(name) if isinstance(entry, Mapping) else getattr(entry, name, None)


def _logprob(entry, where: str) -> float:
    value = _field(entry, "logprob")
    if value is None or math.isnan(float(value)):
        raise ValueError(f"{where}: logprob is {value!r}")
    value = float(value)
    if value > _LOGPROB_SLACK:
        raise ValueError(f"{where}: logprob {value} > 0; these are not logprobs (is the engine in a *_logits "
                         "logprobs_mode?)")
    return float("-inf") if value <= HTTP_NEG_INF else value


def _row_entries(row) -> dict[int, object]:
    """One position's entries keyed by int token id (the HTTP API keys by str); None entries dropped."""
    if not row:
        return {}
    return {int(token): entry for token, entry in row.items() if entry is not None}


def parse_prompt_logprobs(prompt_logprobs: Sequence, token_ids: Sequence[int], prompt_len: int, topk: int,
                          row: int | None = None) -> TeacherScores:
    """The completion part of vLLM prompt logprobs, aligned with the completion (R = N - prompt_len tokens).

    `prompt_logprobs` has N rows (one per token of `token_ids`, the first None) or N - 1
    (first dropped); after dropping, row t is target position t (predicts `token_ids[t+1]`)
    and the completion is `[prompt_len - 1, N - 1)`, the span opd/teacher/hf.py cuts.
    Returns logprobs_R and, if topk > 0, the teacher's own top-k by rank (topk_ids_R_K,
    topk_logprobs_R_K; empty slots id 0 / -inf). A sampled token listed with rank > K
    gives its logprob but no top-k slot.
    """
    name = f"row {row}" if row is not None else "sequence"
    N, R = len(token_ids), len(token_ids) - prompt_len
    if not 1 <= prompt_len <= N or topk < 0:
        raise ValueError(f"{name}: need 1 <= prompt_len <= {N} and topk >= 0, got {prompt_len}, {topk}")
    rows = list(prompt_logprobs)
    if len(rows) == N:
        if rows[0]:
            raise ValueError(f"{name}: {N} prompt-logprob rows for {N} tokens but the first is not empty, so the "
                             "layout is ambiguous (vLLM gives None for the first prompt token)")
        rows = rows[1:]
    elif len(rows) != N - 1:
        raise ValueError(f"{name}: {len(rows)} prompt-logprob rows for {N} tokens; expected {N} or {N - 1}")
    logprobs_R = torch.zeros(R)
    topk_ids_R_K = torch.zeros((R, topk), dtype=torch.long)
    topk_logprobs_R_K = torch.full((R, topk), float("-inf"))
    for r in range(R):
        t = prompt_len - 1 + r  # target position: predicts token_ids[t + 1]
        where = f"{name}, completion token {r} (sequence position {t + 1}, token id {token_ids[t + 1]})"
        entries = _row_entries(rows[t])
        if int(token_ids[t + 1]) not in entries:
            raise ValueError(f"{where}: the scored token has no logprob entry (entries for ids {sorted(entries)})")
        logprobs_R[r] = _logprob(entries[int(token_ids[t + 1])], where)
        for k, (token, value) in enumerate(_topk(entries, topk, where)):
            topk_ids_R_K[r, k], topk_logprobs_R_K[r, k] = token, value
    if topk == 0:
        return TeacherScores(logprobs_R=logprobs_R)
    return TeacherScores(logprobs_R=logprobs_R, topk_ids_R_K=topk_ids_R_K, topk_logprobs_R_K=topk_logprobs_R_K)


def _topk(entries: dict[int, object], topk: int, where: str) -> list[tuple[int, float]]:
    """The teacher's top-k of one position by rank (1 = best); ranks beyond K are skipped.

    Without ranks (some clients drop them) the K highest logprobs are the same set: an
    extra entry, the scored token outside the top-k, is never above the K-th logprob.
    """
    if topk == 0:
        return []
    scored = [(token, _logprob(entry, where), _field(entry, "rank")) for token, entry in entries.items()]
    if all(rank is not None for _, _, rank in scored):
        chosen = sorted(((rank, -value, token) for token, value, rank in scored if 1 <= rank <= topk))
        return [(token, -neg) for _, neg, token in chosen[:topk]]
    return [(token, value) for token, value, _ in sorted(scored, key=lambda x: (-x[1], x[0]))[:topk]]


class VLLMTeacherScorer:
    """Scores with one or more in-process `vllm.LLM` engines; work is split by `split_by_tokens`.

    `model_path_or_model`: a folder, or a loaded HF model (its `name_or_path` is loaded, in
    its dtype unless `dtype` is given); `llms`: ready `vllm.LLM` engines to use instead.
    `seed`: the run's seed (vLLM re-seeds this process's RNGs with it at start-up).
    Extra keyword arguments go to `vllm.LLM` (`max_logprobs=K` for a top-k above 20).
    Prefix caching is off by default: prompt logprobs are needed for every token, which
    older vLLM refuses with caching on. Several engines run one after another: in one process
    they share vLLM's global forward context (`vllm/forward_context.py`), so threads would race on it.
    """

    def __init__(self, model_path_or_model, *, llms: list | None = None, gpu_memory_utilization: float = 0.3,
                 dtype: str | None = None, max_model_len: int | None = None, seed: int = 0, **llm_kwargs):
        try:
            import vllm
            from vllm import LLM, SamplingParams
        except ImportError as error:
            raise ImportError("the vLLM teacher backend needs vLLM: `pip install opd[vllm]` (GPU only), "
                              "or use teacher_backend='hf'") from error
        if hasattr(vllm, "__version__"):  # a stand-in module in tests has none
            vllm_setup.check_vllm_version(vllm.__version__)
        self._sampling_params_cls = SamplingParams
        if llms is None:
            module = None if isinstance(model_path_or_model, str | os.PathLike) else model_path_or_model
            path = model_path_or_model if module is None else module.name_or_path
            if dtype is None:  # vLLM's "auto" would run a float32 checkpoint in float16
                dtype = "auto" if module is None else str(next(module.parameters()).dtype).removeprefix("torch.")
            llm_kwargs.setdefault("enable_prefix_caching", False)
            vllm_setup.engines_in_process(False)
            llm_kwargs |= vllm_setup.engine_kwargs(seed, vllm_setup.world_size(), llm_kwargs)
            llms = [LLM(model=str(path), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                        max_model_len=max_model_len, **llm_kwargs)]
        if not llms:
            raise ValueError("VLLMTeacherScorer needs at least one engine")
        for llm in llms:
            mode = getattr(llm.llm_engine.model_config, "logprobs_mode", "raw_logprobs")
            if not str(mode).endswith("logprobs"):
                raise ValueError(f"a teacher engine has logprobs_mode={mode!r}; prompt logprobs would be logits")
        self.llms = llms
        self.max_model_lens = [llm.llm_engine.model_config.max_model_len for llm in llms]
        self.max_logprobs = [getattr(llm.llm_engine.model_config, "max_logprobs", None) for llm in llms]
        self.prompt_temperature_supported = hasattr(SamplingParams(), "prompt_logprobs_temperature")

    def _check_lengths(self, seqs: list[list[int]], extra: int) -> None:
        for row, seq in enumerate(seqs):
            if len(seq) + extra > min(self.max_model_lens):
                raise ValueError(f"row {row}: {len(seq)} tokens + {extra} generated exceed the teacher engine's "
                                 f"max_model_len={min(self.max_model_lens)}")

    def score(self, rollouts: list[Rollout], temperature: float, topk: int = 0, full_logits: bool = False,
              at_sampler_topk: bool = False) -> list[TeacherScores]:
        if at_sampler_topk:
            raise ValueError(NEEDS_LOGPROBS_AT_IDS)
        if full_logits:
            raise ValueError("the vLLM teacher cannot return full-vocabulary logits; use teacher_backend='hf' "
                             "for full-vocabulary losses")
        check_prompt_logprob_temperature(temperature, self.prompt_temperature_supported)
        limit = min((m for m in self.max_logprobs if m is not None and m >= 0), default=None)
        if limit is not None and topk > limit:
            raise ValueError(f"topk={topk} exceeds the teacher engine's max_logprobs={limit}; build it with "
                             f"max_logprobs={topk} (VLLMTeacherScorer(..., max_logprobs={topk})) or lower topk")
        seqs = [r.teacher_prompt_ids + r.completion_ids for r in rollouts]
        self._check_lengths(seqs, 1)  # + the one token vLLM must generate
        extra = {"prompt_logprobs_temperature": temperature} if temperature != 1.0 else {}
        params = self._sampling_params_cls(max_tokens=1, temperature=1.0, prompt_logprobs=topk, detokenize=False,
                                           **extra)
        scores = []
        for row, seq, output in zip(range(len(seqs)), seqs, self._generate_all(seqs, params), strict=True):
            if list(output.prompt_token_ids) != seq:
                raise ValueError(f"row {row}: vLLM scored other prompt tokens than were sent")
            scores.append(parse_prompt_logprobs(output.prompt_logprobs, seq, len(rollouts[row].teacher_prompt_ids),
                                                topk, row=row))
        return scores

    def generate_greedy(self, prompts_P: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy completions; vLLM stops on the tokenizer's eos and generation_config's eos ids, and keeps them."""
        self._check_lengths(prompts_P, max_new_tokens)
        params = self._sampling_params_cls(max_tokens=max_new_tokens, temperature=0.0, detokenize=False)
        traces = []
        for row, (prompt, output) in enumerate(zip(prompts_P, self._generate_all(prompts_P, params), strict=True)):
            if list(output.prompt_token_ids) != list(prompt):
                raise ValueError(f"prompt {row}: vLLM generated from other prompt tokens than were sent")
            traces.append([int(t) for t in output.outputs[0].token_ids])
        return traces

    def _generate_all(self, seqs: list[list[int]], params) -> list:
        """One output per sequence, in order; the engines take contiguous parts, one engine after another."""
        outputs = []
        for llm, part in zip(self.llms, split_by_tokens([len(s) for s in seqs], len(self.llms))):
            outputs += self._generate(llm, [seqs[j] for j in part], params)
        return outputs

    @staticmethod
    def _generate(llm, seqs: list[list[int]], params) -> list:
        outputs = llm.generate([{"prompt_token_ids": seq} for seq in seqs], params, use_tqdm=False)
        if len(outputs) != len(seqs):
            raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(seqs)} prompts")
        return outputs
