"""Atomic, verifiable checkpoints: the student as a `save_pretrained` folder plus the trainer state.

A checkpoint is written into `step_N.tmp/` and renamed to `step_N/` only when complete, so a
killed run never leaves a half-written checkpoint that `resume` would pick up. Its last file is
`manifest.json` (size and SHA-256 of every other file): a checkpoint damaged after it was written
(a truncated copy, a flipped bit, a zeroed block) fails `verify` and `latest` falls back past it.
Older checkpoints are deleted (`keep_last`) only once a newer one is complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from opd import lora

STEP_RE = re.compile(r"^step_(\d+)$")
TEACHERS_FILE = "teachers.json"  # the teacher manifest: names, paths, config hashes (#22)
STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: Path, step: int, student, tokenizer, optimizer_state: dict, scheduler, config,
         teachers: dict | None = None, self_teacher=None) -> Path:
    """`optimizer_state`: the full, name-keyed state of `distributed.optimizer_state` (the same with or without FSDP).
    `teachers`: the teacher manifest (`opd.teachers.manifest`), written as `teachers.json`; resume compares it.
    `self_teacher`: a `teacher=self` run's `opd.self_teacher.SelfTeacher`, whose snapshot or EMA weights are saved.

    Checks free space first; a failed write removes its own `.tmp` and leaves every earlier
    checkpoint as it was. Then keeps the newest `config.keep_last` checkpoints (0 = all).
    """
    final = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    need = checkpoint_size(newest(run_dir)) or state_nbytes(student.state_dict(), optimizer_state)
    check_space(final.parent, need, f"checkpoint {final.name}")
    try:
        lora.save_student(student, tmp / "model")  # safetensors; a LoRA student merged, plus its adapter
        tokenizer.save_pretrained(tmp / "model")
        state = {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
        torch.save(state, tmp / STATE_FILE)
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if teachers is not None:
            (tmp / TEACHERS_FILE).write_text(json.dumps(teachers, indent=2, sort_keys=True) + "\n")
        if self_teacher is not None:
            self_teacher.save(tmp)
        write_manifest(tmp, step)
    except BaseException as e:
        written, free = checkpoint_size(tmp), shutil.disk_usage(final.parent).free
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and (getattr(e, "errno", None) == errno.ENOSPC or free < need - written):
            # torch.save reports a full disk as "enforce fail at inline_container.cc", not as ENOSPC
            raise OSError(errno.ENOSPC, f"{no_space_message(final.parent, need, free + written)} while writing checkpoint "
                                        f"{final.name} (its partial files were removed; earlier checkpoints are "
                                        f"intact)") from e
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    prune(run_dir, config.keep_last)
    return final


def write_manifest(folder: Path, step: int) -> None:
    """fsync every file, then write `manifest.json` (their sizes and SHA-256) as the folder's last file."""
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        with file.open("rb") as f:
            os.fsync(f.fileno())
        files[file.relative_to(folder).as_posix()] = {"size": file.stat().st_size, "sha256": sha256(file)}
    manifest = folder / MANIFEST
    with manifest.open("w") as f:
        f.write(json.dumps({"step": step, "files": files}, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted, or None when every file matches its manifest."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete, or written by an opd without manifests)"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST}: {e}"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {entry['size']}"
        if sha256(file) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (damaged)"
    return None


def step_of(path: Path) -> int:
    return int(STEP_RE.match(path.name).group(1))


def checkpoints(run_dir: Path) -> list[Path]:
    """The renamed (complete-looking) checkpoint folders, newest first; nothing is verified here."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and STEP_RE.match(p.name)), key=step_of, reverse=True)


def newest(run_dir: Path) -> Path | None:
    return next(iter(checkpoints(run_dir)), None)


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint that matches its manifest, or None; each one skipped is logged with why."""
    for path in checkpoints(run_dir):
        if (reason := verify(path)) is None:
            return path
        log.warning("warning: skipping checkpoint %s: %s", path, reason)
    return None


def clean_partial(run_dir: Path) -> None:
    """Remove the `.tmp` folders of saves or deletions that a killed run left behind."""
    folder = Path(run_dir) / "checkpoints"
    for tmp in folder.glob("*.tmp") if folder.is_dir() else ():
        log.info("removing %s, left by a run that was stopped while writing it", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all); renamed to `.tmp` first, so a
    deletion cut short is cleaned at the next start rather than taken for a checkpoint."""
    for old in checkpoints(run_dir)[keep_last:] if keep_last else ():
        doomed = old.with_name(old.name + ".deleting.tmp")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def checkpoint_size(path: Path | None) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path is not None else 0


def state_nbytes(*states) -> int:
    """Bytes of the distinct tensors in nested dicts/lists (tied weights once): a first checkpoint's size."""
    seen: dict[int, int] = {}
    stack = list(states)
    while stack:
        state = stack.pop()
        if isinstance(state, torch.Tensor):
            seen[state.untyped_storage().data_ptr()] = state.numel() * state.element_size()
        elif isinstance(state, dict):
            stack.extend(state.values())
        elif isinstance(state, (list, tuple)):
            stack.extend(state)
    return sum(seen.values())


def check_space(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(errno.ENOSPC, f"{no_space_message(folder, need, free)} for {what}; free some space, or lower "
                                    f"keep_last (now keeping older checkpoints in {folder})")


def no_space_message(folder: Path, need: int, free: int) -> str:
    return f"no space left on {device_of(folder)}: need {need / 1e6:.1f} MB, have {free / 1e6:.1f} MB"


def device_of(folder: Path) -> str:
    """'<device> (mounted at <mount point>)' of the filesystem holding `folder`, from /proc/mounts where it exists."""
    mount = Path(folder).resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, point, *_ = line.split()
            if point == str(mount):
                return f"{device} (mounted at {mount})"
    except OSError:
        pass
    return str(mount)


def load(path: Path, student, optimizer, scheduler) -> int:
    """Restore weights, optimizer, scheduler and RNG states in place (sharded or not); returns the step.

    The optimizer's lr and weight decay stay as configured: they differ from the checkpoint's only
    when `resume_allow_changed` named them, and then the new values are what the user asked for.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    from transformers import AutoModelForCausalLM

    configured = [{k: g[k] for k in ("initial_lr", "weight_decay") if k in g} for g in optimizer.param_groups]
    try:
        options = StateDictOptions(full_state_dict=True, strict=True)  # strict: a checkpoint of another architecture raises
        if lora.is_lora(student):  # the frozen base is the student's own: only the adapter comes back
            lora.load_adapter(student, path / "model" / lora.ADAPTER_DIR)
        else:
            saved = AutoModelForCausalLM.from_pretrained(path / "model", dtype=next(student.parameters()).dtype)
            set_model_state_dict(student, saved.state_dict(), options=options)
        state = torch.load(path / STATE_FILE, weights_only=False)
        set_optimizer_state_dict(student, optimizer, state["optimizer"], options=options)
        scheduler.load_state_dict(state["scheduler"])
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {first}); move it aside to "
                         f"resume from the one before, or start over with overwrite=true") from e
    if any(g.get(k) != v for g, c in zip(optimizer.param_groups, configured, strict=True) for k, v in c.items()):
        for group, values in zip(optimizer.param_groups, configured, strict=True):
            group.update(values)
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):  # LambdaLR's own rule
            group["lr"] = group["initial_lr"] * factor(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    log.info("resumed from %s (step %d)", path, state["step"])
    return int(state["step"])


def save_final(run_dir: Path, student, tokenizer, dtype: str | None = None) -> Path:
    """The final student as a plain Hugging Face folder: `from_pretrained(run_dir / 'final')`, in `dtype` if given."""
    from opd.precision import save_pretrained_as

    final = Path(run_dir) / "final"
    tmp = final.with_name("final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if lora.is_lora(student):  # the merged model (fp32), plus final/adapter/
            lora.save_student(student, tmp)
        elif dtype is None:
            student.save_pretrained(tmp)
        else:
            save_pretrained_as(student, tmp, dtype)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
