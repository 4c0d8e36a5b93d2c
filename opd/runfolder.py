"""The run folder (docs/design.md §7): one process at a time, the same run on resume, nothing silently lost.

`open_run` is called once at the top of a training loop, before any model loads. It takes the
folder's lock (an `fcntl.flock` the OS drops when the process dies, so kill -9 leaves no stale
lock), removes partial `.tmp` folders, refuses a fresh run into a used folder unless
`overwrite=true` (which moves the old contents aside), and with `resume=true` picks the newest
checkpoint that matches its manifest and belongs to this run: its recorded config must equal
this one in every training-relevant field, or name the difference in `resume_allow_changed`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

from opd import checkpoint, distributed

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"
USED = ("checkpoints", "metrics.jsonl", "final", "config.json")  # what makes a folder a run's

# Fields that change what is measured, logged or kept, or where it runs, but not the weights a step
# produces. Every other TrainConfig field, a new one included, is training-relevant: resuming with a
# different value needs `resume_allow_changed=<field>`. `steps` is checked on its own (`check_steps`).
NOT_TRAINING = frozenset({
    "out_dir", "resume", "overwrite", "resume_allow_changed", "keep_last", "save_every",
    "eval_every", "eval_size", "eval_train_size", "log_samples", "progress", "tensorboard", "wandb_project",
    "preflight_noise",  # a check before the first step: it changes no sample and no update (opd/noise_floor.py)
    "device", "teacher_url",  # the same run on another device, or its teacher served at a new address
    "micro_batch_size", "fsdp",  # the step-global normalizer makes the gradient independent of grouping (§4)
    "steps",
})


def training_fields(config_dict: dict) -> dict:
    """The training-relevant part of a config (as `TrainConfig.to_dict()`); absent fields take their defaults."""
    from opd.config import TrainConfig

    defaults = {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)}
    relevant = {name: config_dict.get(name, default) for name, default in defaults.items() if name not in NOT_TRAINING}
    if relevant["teachers"]:  # a teacher's address or device is where it runs, as teacher_url and device
        relevant["teachers"] = {name: ({k: v for k, v in entry.items() if k not in ("url", "device")}
                                       if isinstance(entry, dict) else entry)
                                for name, entry in relevant["teachers"].items()}
    if relevant["loss_temperature"] is None:  # recorded before it was resolved on construction: it meant τ
        relevant["loss_temperature"] = relevant["temperature"]
    return relevant


def run_hash(config_dict: dict) -> str:
    """A short hash of the training-relevant fields: equal for checkpoints of one run."""
    return hashlib.sha256(json.dumps(training_fields(config_dict), sort_keys=True).encode()).hexdigest()[:16]


def allowed_changes(config) -> set[str]:
    return {name.strip() for name in config.resume_allow_changed.split(",") if name.strip()}


class FolderLock:
    """An exclusive `flock` on `<run_dir>/.lock`, holding the holder's pid; the OS releases it when the process ends."""

    held: dict[Path, FolderLock] = {}  # per process: a train() that raised left its lock here

    def __init__(self, run_dir: Path):
        self.path = (Path(run_dir) / LOCK_FILE).resolve()
        if (previous := FolderLock.held.get(self.path)) is not None:
            previous.release()  # this process's own, from a run that ended by an exception
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise ValueError(f"out_dir {self.path.parent} is in use by another opd process (pid {holder}); wait for "
                             f"it to finish, stop it, or choose another out_dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        FolderLock.held[self.path] = self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
            FolderLock.held.pop(self.path, None)


@dataclass
class RunFolder:
    path: Path
    checkpoint: Path | None  # where to resume from; None: start at step 0
    lock: FolderLock | None  # rank 0 holds it

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


def open_run(config, d: distributed.Dist = distributed.Dist()) -> RunFolder:
    """Lock, clean and check `config.out_dir`; the checkpoint to resume from. Rank 0 decides; the others follow."""
    path = Path(config.out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(path) if d.main else None
    except OSError as e:
        raise ValueError(f"out_dir={config.out_dir!r} cannot be used: {e.strerror or e}; choose a folder you can "
                         f"write") from None
    if d.main:
        try:
            checkpoint.clean_partial(path)
            resume = pick_checkpoint(path, config) if config.resume else refuse_used(path, config)
        except BaseException:
            lock.release()  # a refused run leaves the folder free for the corrected command
            raise
    distributed.barrier(d)
    if not d.main:  # rank 0 moved every damaged checkpoint above the chosen one aside
        resume = checkpoint.newest(path) if config.resume else None
    return RunFolder(path, resume, lock)


def refuse_used(path: Path, config) -> None:
    """A fresh run: the folder must hold no run, or `overwrite=true` moves the old one aside."""
    found = [name for name in USED if (path / name).exists() and not _empty_dir(path / name)]
    if not found:
        return None
    aside = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    if not config.overwrite:
        raise ValueError(f"out_dir {path} already holds a run ({', '.join(found)}); continue it with resume=true, or "
                         f"start over with overwrite=true (moves the old contents to {aside.name}/, deletes nothing)")
    n = 1
    while aside.exists():
        aside, n = aside.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    aside.mkdir()
    for entry in path.iterdir():
        if entry.name != LOCK_FILE:
            os.replace(entry, aside / entry.name)
    log.info("overwrite=true: moved the old contents of %s to %s", path, aside)
    return None


def pick_checkpoint(path: Path, config) -> Path | None:
    """The newest checkpoint that matches its manifest; damaged ones above it are moved to `*.damaged`."""
    damaged = []
    for candidate in checkpoint.checkpoints(path):
        if (reason := checkpoint.verify(candidate)) is None:
            saved = json.loads((candidate / "config.json").read_text())
            check_same_run(candidate, saved, config)
            check_same_teachers(candidate, config)
            check_steps(candidate, checkpoint.step_of(candidate), saved, config)
            return candidate
        aside = _free_name(candidate.with_name(candidate.name + ".damaged"))
        os.replace(candidate, aside)
        damaged.append(f"{candidate.name}: {reason}")
        log.warning("warning: checkpoint %s is damaged (%s); moved it to %s and falling back to the one before",
                    candidate, reason, aside.name)
    if damaged:
        raise ValueError(f"resume=true: every checkpoint in {path / 'checkpoints'} is damaged ({'; '.join(damaged)}); "
                         f"they were moved to step_*.damaged; run again with resume=true to start from step 0")
    if (path / "config.json").is_file():  # a run that stopped before its first checkpoint: still the same run?
        check_same_run(path / "config.json", json.loads((path / "config.json").read_text()), config)
    log.info("resume=true: no checkpoint in %s; starting at step 0", path)
    return None


def check_same_run(source: Path, saved: dict, config) -> None:
    """Refuse to resume another run's checkpoint: training-relevant fields must match or be allowed to change."""
    old, new = training_fields(saved), training_fields(config.to_dict())
    changed = {name: (old[name], new[name]) for name in new if old[name] != new[name]}
    refused = {name: values for name, values in changed.items() if name not in allowed_changes(config)}
    if refused:
        diff = ", ".join(f"{name} {a!r} -> {b!r}" for name, (a, b) in refused.items())
        raise ValueError(f"resume=true: {source} belongs to another run ({diff}); to continue it with these changes "
                         f"name them: resume_allow_changed={','.join(refused)}; or start a fresh run in another "
                         f"out_dir")
    for name, (a, b) in changed.items():
        log.info("resume: %s changed %r -> %r (allowed by resume_allow_changed)", name, a, b)


def check_same_teachers(source: Path, config) -> None:
    """Refuse a checkpoint scored by other teachers: its `teachers.json` (names, paths, config hashes) must equal
    the run's now, unless `resume_allow_changed=teachers`. A checkpoint from before #22 has none: not compared."""
    from opd.models import resolve
    from opd.teachers import manifest, teacher_specs

    recorded = source / checkpoint.TEACHERS_FILE
    if not recorded.is_file() or "teachers" in allowed_changes(config):
        return
    old, new = json.loads(recorded.read_text()), manifest(teacher_specs(config), resolve)
    if old != new:
        name = next((n for n in sorted(old.keys() | new.keys()) if old.get(n) != new.get(n)))
        raise ValueError(f"resume=true: {source} was trained against other teachers: teacher {name!r} "
                         f"{old.get(name)} -> {new.get(name)}; resume with the teachers it was trained against, "
                         f"accept the change with resume_allow_changed=teachers, or start a fresh run in another out_dir")


def check_steps(source: Path, step: int, saved: dict, config) -> None:
    """A checkpoint past `steps` is refused; a new `steps` under a decaying schedule changes every later lr."""
    if step > config.steps:
        raise ValueError(f"resume=true: {source} is at step {step}, past steps={config.steps}; set steps>={step} to "
                         f"continue it, or start a fresh run in another out_dir")
    before = saved.get("steps", config.steps)
    if before != config.steps and config.lr_schedule != "constant" and "steps" not in allowed_changes(config):
        raise ValueError(f"resume=true: steps {before} -> {config.steps} changes the lr_schedule={config.lr_schedule} "
                         f"of every remaining step; name it to accept that: resume_allow_changed=steps")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` as a whole or not at all: a temp file in the same folder, fsynced, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _free_name(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
    return candidate
