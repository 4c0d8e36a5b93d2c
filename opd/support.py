"""What has run where (docs/scaling.md "What has run where"), and a one-time warning for paths that never ran.

A path the CI has never exercised on the hardware it needs is experimental: a user who picks it
is told so once, at the start of the run, rather than finding out from a wrong number later.
Update `RAN` (and the table in docs/scaling.md) when a path has run; `scripts/gpu-check.sh` is the GPU run
(first on 2026-12-04, one H200: CUDA, bf16 autocast and LoRA have run there; NCCL, FSDP2 and vLLM need
more than the one GPU and no-vLLM image lent so far).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

# path -> where it has run; "never" marks it experimental (the table in docs/scaling.md says the same)
RAN = {
    "CUDA": "one H200, 2026-12-04 (scripts/gpu-check.sh: Qwen3-0.6B/1.7B shapes, 2-3 steps per path)",
    "bf16 autocast on CUDA": "one H200, 2026-12-04 (scripts/gpu-check.sh); on CPU in CI (tests/test_precision.py)",
    "NCCL": "never (torchrun is tested with gloo on CPU)",
    "FSDP2 on CUDA": "never on a GPU; on 2 CPU processes in CI",
    "vLLM rollouts": "never (CPU tests parse hand-built vLLM outputs)",
    "vLLM teacher": "never (CPU tests parse hand-built vLLM outputs)",
    "served teacher": "never against a real `vllm serve`",
    "LoRA on CUDA": "one H200, 2026-12-04 (scripts/gpu-check.sh, rank 16, one step)",
}


def untested_paths(config) -> list[str]:
    """The paths of `RAN` marked never that `config` picks here (CUDA as resolved by device=auto)."""
    cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    picked = {
        "CUDA": cuda,
        "bf16 autocast on CUDA": cuda and config.dtype == "bfloat16",
        "NCCL": cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        "FSDP2 on CUDA": cuda and config.fsdp,
        "vLLM rollouts": config.rollout_backend == "vllm",
        "vLLM teacher": config.teacher_backend == "vllm",
        "served teacher": config.teacher_backend == "served",
        "LoRA on CUDA": cuda and bool(getattr(config, "lora_rank", 0)),
    }
    return [path for path, chosen in picked.items() if chosen and RAN[path].startswith("never")]


def warn_untested(config) -> list[str]:
    """Log one warning per experimental path the run uses; returns them (train() calls this once)."""
    paths = untested_paths(config)
    for path in paths:
        log.warning("experimental: %s (has run: %s); check its numbers (docs/scaling.md: What has run where)", path,
                    RAN[path])
    return paths
