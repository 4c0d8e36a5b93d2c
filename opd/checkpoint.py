"""Atomic checkpoints: the student as a `save_pretrained` folder plus the trainer state.

A checkpoint is written into `step_N.tmp/` and renamed to `step_N/` only when complete,
so a killed run never leaves a half-written checkpoint that `resume` would pick up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STEP_RE = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: Path, step: int, student, tokenizer, optimizer_state: dict, scheduler, config) -> Path:
    """`optimizer_state`: the full, name-keyed state of `distributed.optimizer_state` (the same with or without FSDP)."""
    final = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp / "model")  # safetensors
    tokenizer.save_pretrained(tmp / "model")
    state = {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    torch.save(state, tmp / STATE_FILE)
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    for file in tmp.rglob("*"):
        if file.is_file():
            with file.open("rb") as f:
                os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def latest(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    complete = [p for p in folder.iterdir() if STEP_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return max(complete, key=lambda p: int(STEP_RE.match(p.name).group(1)), default=None)


def load(path: Path, student, optimizer, scheduler) -> int:
    """Restore weights, optimizer, scheduler and RNG states in place (sharded or not); returns the step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(path / "model", dtype=next(student.parameters()).dtype)
    options = StateDictOptions(full_state_dict=True, strict=True)  # strict: a checkpoint of another architecture raises
    set_model_state_dict(student, saved.state_dict(), options=options)
    state = torch.load(path / STATE_FILE, weights_only=False)
    set_optimizer_state_dict(student, optimizer, state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def save_final(run_dir: Path, student, tokenizer, dtype: str | None = None) -> Path:
    """The final student as a plain Hugging Face folder: `from_pretrained(run_dir / 'final')`, in `dtype` if given."""
    from opd.precision import save_pretrained_as

    final = Path(run_dir) / "final"
    tmp = final.with_name("final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if dtype is None:
        student.save_pretrained(tmp)
    else:
        save_pretrained_as(student, tmp, dtype)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
