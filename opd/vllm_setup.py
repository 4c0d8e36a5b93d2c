"""How opd builds and feeds vLLM engines: environment, parallel launch, seeds, weight sync, version range.

Nothing here imports vLLM at module level, so every rule is checked (and tested) on CPU; the
engines in opd/rollout/vllm.py and opd/teacher/vllm.py call these before and after building a
`vllm.LLM`. Read against vLLM's main branch of 2026-11 (the 0.33 line); facts relied on:
- `VLLM_ENABLE_V1_MULTIPROCESSING` (default 1) picks an engine core in its own process; vLLM
  freezes its env reads once an engine core starts (`vllm/envs.py::enable_envs_cache`, called from
  `EngineCore.__init__`, `vllm/v1/engine/core.py`), so a value set and later restored is not seen
  by later engines. opd sets 0 once, for the whole process, before the first engine.
- With the engine core in another process, `LLM.apply_model(fn)` must pickle `fn`, which vLLM
  refuses unless `VLLM_ALLOW_INSECURE_SERIALIZATION=1` (`vllm/v1/serial_utils.py`).
- Under torchrun each process runs its own engine with `distributed_executor_backend=
  "external_launcher"` (`vllm/v1/executor/uniproc_executor.py::ExecutorWithExternalLauncher`; TRL's
  colocate mode does the same); the worker takes its GPU from LOCAL_RANK, which
  `opd.distributed.init` also made the current device.
- The worker calls `set_random_seed(model_config.seed)` (`vllm/v1/worker/gpu_worker.py`), which
  re-seeds `random`, numpy and torch in an in-process engine's host process.
- `Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)` loads HF-named tensors
  layer by layer and re-runs each layer's post-load processing (quantization repacking), via
  `vllm/model_executor/model_loader/reload/`; older workers' `reload_weights()` takes no weights.
- `SamplingParams` rejects a temperature above 2 (`_MAX_TEMP`, `vllm/sampling_params.py`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"
MAX_TEMPERATURE = 2.0  # vLLM's SamplingParams limit
# The range opd's vLLM code is written against (see docs/scaling.md, "Served and vLLM teachers"). The floor is the
# first release with every API used here (logprobs_mode, return_token_ids, reload_weights with weights);
# the cap is the newest release read. Neither end has run on a GPU yet.
VLLM_FLOOR, VLLM_CAP = (0, 11), (0, 34)
VLLM_RANGE = "vllm>=0.11,<0.34"


def _parse_version(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a vLLM version from {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM below the floor (an API opd calls is missing); warn above the cap (not read yet)."""
    parsed = _parse_version(version)
    if parsed < VLLM_FLOOR:
        raise ImportError(f"vllm {version} is older than opd supports; install `{VLLM_RANGE}` (pip install "
                          "'opd[vllm]'), or use the 'hf' backends")
    if parsed >= VLLM_CAP:
        log.warning("vllm %s is newer than the range opd was written against (%s); its APIs may have moved",
                    version, VLLM_RANGE)


def _truthy(value: str) -> bool:
    return value.strip().lower() not in ("0", "false", "")


def engines_in_process(needs_in_process: bool, read_frozen: Callable[[], bool] | None = None) -> None:
    """Make the process's vLLM engines run in-process (set once, never restored), or refuse with the fix.

    `needs_in_process`: the rollout engine writes the student's weights into its model through
    direct calls, so it refuses an out-of-process engine core; a teacher engine accepts either.
    `read_frozen`: what `vllm.envs` reads for the variable once it is set (its cache may have been
    frozen by an engine built earlier in this process), e.g. `vllm_reads_multiprocessing`.
    """
    value = os.environ.setdefault(MULTIPROCESSING, "0")
    if not needs_in_process:
        return
    if _truthy(value):
        raise ValueError(f"{MULTIPROCESSING}={value!r}: opd's vLLM rollout engine syncs the student's weights "
                         "into an engine in this process; unset it (opd then sets 0) or set it to 0")
    if read_frozen is not None and read_frozen():
        raise ValueError(f"vLLM already froze {MULTIPROCESSING}=1 in this process (an engine was built before opd "
                         f"set it); build opd's engines first, or start the process with {MULTIPROCESSING}=0")


def vllm_reads_multiprocessing() -> bool:
    """The value vLLM itself uses now (`vllm.envs` answers from its frozen cache once an engine started)."""
    import vllm.envs as envs

    return bool(getattr(envs, MULTIPROCESSING))


def world_size() -> int:
    """Processes in this run (torchrun's WORLD_SIZE, or the initialized process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def engine_kwargs(seed: int, world: int, user_kwargs: dict) -> dict:
    """Arguments opd adds to `vllm.LLM(...)`: the run's seed, and one engine per torchrun process.

    With world > 1, vLLM would otherwise start its own workers and process group over opd's and put
    every rank on GPU 0; external_launcher runs one in-process worker per rank on LOCAL_RANK's GPU.
    Tensor parallelism across ranks would need every rank to send the same prompts, which opd's
    loop does not do, so it is refused.
    """
    kwargs = {"seed": seed}
    if world > 1:
        tp = user_kwargs.get("tensor_parallel_size", 1)
        if tp != 1:
            raise ValueError(f"tensor_parallel_size={tp} under torchrun with {world} processes: each opd rank "
                             "samples its own prompts, so each runs its own engine with tensor_parallel_size=1")
        backend = user_kwargs.get("distributed_executor_backend", "external_launcher")
        if backend != "external_launcher":
            raise ValueError(f"distributed_executor_backend={backend!r} under torchrun: opd needs "
                             "'external_launcher' (one engine per rank, on that rank's GPU)")
        kwargs |= {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1}
    return kwargs


def check_temperature(temperature: float, where: str) -> None:
    if not 0 < temperature <= MAX_TEMPERATURE:
        raise ValueError(f"{where}: vLLM samples at temperatures in (0, {MAX_TEMPERATURE:g}] only, got {temperature}; "
                         "lower it, or use rollout_backend=hf, which takes any temperature > 0")


def push_weights(llm, weights: Sequence[tuple[str, torch.Tensor]], quantized: bool) -> str:
    """Write HF-named `weights` into `llm`'s model; returns the path taken: "reload_weights" or "apply_model".

    `reload_weights` re-runs each layer's post-load processing, so it is right for quantized engines
    too. Older vLLM (a `reload_weights()` without weights) falls back to calling the model's
    `load_weights` through `apply_model` and checking that every engine parameter was written;
    that check cannot hold for a quantized engine (its parameters are not the checkpoint's), and
    loading there would skip re-quantization, so a quantized engine without reload_weights is refused.
    """
    rpc = getattr(llm, "collective_rpc", None)
    if rpc is not None:
        try:
            rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
            return "reload_weights"
        except TypeError as error:  # the worker's reload_weights takes no weights: an older vLLM
            if "weights_iterator" not in str(error) and "is_checkpoint_format" not in str(error):
                raise
    if quantized:
        raise RuntimeError("this vLLM cannot reload weights into a quantized engine (no reload_weights with "
                           f"weights); install `{VLLM_RANGE}` or sample from an unquantized student")
    if not hasattr(llm, "apply_model"):
        raise RuntimeError(f"this vLLM has neither reload_weights with weights nor LLM.apply_model; install "
                           f"`{VLLM_RANGE}`")

    def load(vllm_model: torch.nn.Module) -> list[str]:
        loaded = vllm_model.load_weights(list(weights))
        if loaded is None:  # a model without loaded-weights tracking: nothing to check
            return []
        return sorted({name for name, _ in vllm_model.named_parameters()} - set(loaded))

    for missing in llm.apply_model(load):
        if missing:
            raise RuntimeError(f"load_weights left {len(missing)} vLLM parameters unwritten, e.g. {missing[:5]}; "
                               "the student's state_dict names do not match the vLLM model")
    return "apply_model"


def is_quantized(llm) -> bool:
    """Whether the engine's model is quantized (`ModelConfig.quantization` set, e.g. 'fp8', 'awq')."""
    return getattr(llm.llm_engine.model_config, "quantization", None) is not None
