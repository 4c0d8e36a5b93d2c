"""The run folder (#17) on the bundled pair: refusals, the lock, damaged checkpoints, retention, disk, metrics."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd import checkpoint, runfolder
from opd.config import TrainConfig, load_config
from opd.metrics import parse_metrics, read_metrics
from opd.train import train

TINY = ["prompts_per_step=2", "completions_per_prompt=2", "max_new_tokens=8", "eval_size=2", "train_size=16",
        "eval_every=0", "progress=false", "log_samples=0", "lr_schedule=constant"]


def config(out, *overrides):
    return load_config(None, [*TINY, f"out_dir={out}", *overrides])


def no_models(monkeypatch):
    import opd.train

    def refuse(*args, **kwargs):
        raise AssertionError("models were loaded before the run folder was checked")

    monkeypatch.setattr(opd.train, "load_models", refuse)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run of 2 steps with a checkpoint after each; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("runs") / "two"
    train(config(out, "steps=2", "save_every=1"))
    return out


def copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def final_weights(run: Path) -> dict:
    return load_file(run / "final" / "model.safetensors")


def test_every_checkpoint_has_a_manifest_and_the_run_config(two_steps):
    ckpt = checkpoint.latest(two_steps)
    assert ckpt.name == "step_000002" and checkpoint.verify(ckpt) is None
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert {"model/model.safetensors", "trainer_state.pt", "config.json"} <= set(manifest["files"])
    assert json.loads((ckpt / "config.json").read_text())["steps"] == 2
    assert (two_steps / ".lock").read_text().strip() == str(os.getpid())  # the holder's pid, released at the end
    runfolder.FolderLock(two_steps).release()


def test_a_fresh_run_into_a_used_folder_is_refused_and_overwrite_moves_it_aside(two_steps, tmp_path, monkeypatch):
    run = copy(two_steps, tmp_path)
    with monkeypatch.context() as m:
        no_models(m)
        with pytest.raises(ValueError, match=r"already holds a run \(checkpoints, metrics.jsonl, final, config.json\); "
                                             r"continue it with resume=true, or start over with overwrite=true"):
            train(config(run, "steps=1", "lr=1e-3", "seed=1"))
    assert checkpoint.latest(run).name == "step_000002"  # nothing was touched
    train(config(run, "steps=1", "save_every=1", "overwrite=true"))
    [aside] = tmp_path.glob("run.old-*")
    assert [r["step"] for r in read_metrics(aside)] == [0, 1, 2]  # the old run, whole, beside the new one
    assert checkpoint.latest(aside).name == "step_000002"
    assert [r["step"] for r in read_metrics(run)] == [0, 1]
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_000001"]


def test_resume_with_a_changed_lr_is_refused_unless_named(two_steps, tmp_path, monkeypatch, caplog):
    run = copy(two_steps, tmp_path)
    with monkeypatch.context() as m:
        no_models(m)
        with pytest.raises(ValueError, match=r"belongs to another run \(lr 0.0001 -> 0.01, seed 0 -> 1\); .*"
                                             r"resume_allow_changed=lr,seed"):
            train(config(run, "steps=3", "resume=true", "lr=1e-2", "seed=1"))
        with pytest.raises(ValueError, match=r"step_000002 is at step 2, past steps=1; set steps>=2"):
            train(config(run, "steps=1", "resume=true"))
    cosine = config(run, "steps=3", "resume=true", "lr_schedule=cosine")
    with pytest.raises(ValueError, match=r"steps 2 -> 3 changes the lr_schedule=cosine .* resume_allow_changed=steps"):
        runfolder.check_steps(run, 2, cosine.to_dict() | {"steps": 2}, cosine)
    with caplog.at_level(logging.INFO):
        train(config(run, "steps=3", "resume=true", "lr=1e-2", "resume_allow_changed=lr"))
    assert f"resumed from {run / 'checkpoints' / 'step_000002'} (step 2)" in caplog.text
    assert "lr changed 0.0001 -> 0.01 (allowed by resume_allow_changed)" in caplog.text
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[2]["train/lr"] == 1e-4 and records[3]["train/lr"] == 1e-2  # the new lr, not the scheduler's old one


def test_a_second_process_is_refused_and_a_killed_holders_lock_is_released(tmp_path, monkeypatch):
    code = textwrap.dedent(f"""
        import sys, time
        from opd.runfolder import FolderLock
        lock = FolderLock({str(tmp_path)!r})
        print("locked", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=os.environ | {"PYTHONPATH": str(Path(__file__).parent.parent)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        no_models(monkeypatch)
        with pytest.raises(ValueError, match=rf"is in use by another opd process \(pid {holder.pid}\)"):
            train(config(tmp_path, "steps=1"))
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    runfolder.FolderLock(tmp_path).release()  # the OS dropped the dead process's flock


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(two_steps, tmp_path, caplog):
    run = copy(two_steps, tmp_path)
    weights = run / "checkpoints" / "step_000002" / "model" / "model.safetensors"
    with weights.open("r+b") as f:  # 64 KiB of zeros inside the tensors: same size, wrong bytes
        f.seek(1 << 20)
        f.write(bytes(1 << 16))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "train/lo')  # and a torn line, as a kill mid-write leaves it
    with caplog.at_level(logging.INFO):
        train(config(run, "steps=3", "save_every=1", "resume=true"))
    assert "model/model.safetensors does not match its SHA-256 in the manifest (damaged)" in caplog.text
    assert f"resumed from {run / 'checkpoints' / 'step_000001'} (step 1)" in caplog.text
    assert f"{run / 'metrics.jsonl'}:4 is a torn line" in caplog.text
    assert (run / "checkpoints" / "step_000002.damaged").is_dir()  # kept for a look, never taken again
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]
    whole = train(config(tmp_path / "whole", "steps=3"))
    for name, tensor in final_weights(whole).items():  # the fallback re-ran step 2 exactly
        assert torch.equal(tensor, final_weights(run)[name]), name


@pytest.mark.parametrize("damage", ["truncated", "bit_flip", "zeroed", "no_manifest"])
def test_verify_names_what_is_wrong(two_steps, tmp_path, damage, caplog):
    run = copy(two_steps, tmp_path)
    newest = run / "checkpoints" / "step_000002"
    state = newest / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    if damage == "truncated":
        state.write_bytes(data[: len(data) // 2])
    elif damage == "bit_flip":
        data[len(data) // 3] ^= 0x10
        state.write_bytes(data)
    elif damage == "zeroed":
        state.write_bytes(data[:4096] + bytes(4096) + data[8192:])
    else:
        (newest / "manifest.json").unlink()
    expected = {"truncated": f"trainer_state.pt has {len(data) // 2} bytes, the manifest says {len(data)}",
                "bit_flip": "trainer_state.pt does not match its SHA-256",
                "zeroed": "trainer_state.pt does not match its SHA-256",
                "no_manifest": "no manifest.json"}[damage]
    assert expected in checkpoint.verify(newest)
    assert checkpoint.latest(run).name == "step_000001"
    assert f"skipping checkpoint {newest}: {expected}" in caplog.text


def test_every_checkpoint_damaged_is_refused_naming_them(two_steps, tmp_path):
    run = copy(two_steps, tmp_path)
    for ckpt in checkpoint.checkpoints(run):
        (ckpt / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"every checkpoint in .* is damaged \(step_000002: no manifest.json.*"
                                         r"step_000001: no manifest.json"):
        runfolder.open_run(config(run, "steps=2", "resume=true"))
    assert not checkpoint.checkpoints(run) and len(list((run / "checkpoints").glob("*.damaged"))) == 2


def test_keep_last_keeps_the_newest_and_partial_folders_are_cleaned(tmp_path):
    (tmp_path / "checkpoints" / "step_000009.tmp").mkdir(parents=True)  # a killed save
    (tmp_path / "checkpoints" / "step_000001.deleting.tmp").mkdir()  # a killed deletion
    train(config(tmp_path, "steps=3", "save_every=1", "keep_last=2", "resume=true"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000003"]


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_named(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "x')
    assert parse_metrics(path) == [{"step": 0}, {"step": 1}]
    assert f"{path}:3 is a torn line" in caplog.text
    path.write_text('{"step": 0}\n{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not a JSON line"):
        parse_metrics(path)


def test_every_field_not_listed_as_not_training_is_part_of_the_run_identity():
    names = {f for f in TrainConfig.__dataclass_fields__}
    assert runfolder.NOT_TRAINING <= names  # a misspelt entry would silently make a field training-relevant
    a = TrainConfig().to_dict()
    assert runfolder.run_hash(a) == runfolder.run_hash(a | {"out_dir": "elsewhere", "eval_every": 7, "steps": 9})
    for name in ("lr", "seed", "loss", "task", "student", "prompts_per_step", "temperature", "dtype", "kl_coef"):
        assert name in runfolder.training_fields(a)
    assert runfolder.run_hash(a) != runfolder.run_hash(a | {"lr": 3e-4})
    assert runfolder.training_fields({k: v for k, v in a.items() if k != "kl_coef"}) == runfolder.training_fields(a)


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")


@pytest.mark.skipif(os.geteuid() != 0, reason="a small full disk needs `mount -t tmpfs` (root)")
def test_a_full_disk_fails_the_save_cleanly_and_keeps_the_previous_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "12m")  # room for one checkpoint of the tiny student (8.4 MB), not two
    try:
        with pytest.raises(OSError, match=r"no space left on tmpfs \(mounted at .*\): need 8.4 MB, have \d.\d MB "
                                          r"for checkpoint step_000002"):
            train(config(disk / "run", "steps=2", "save_every=1", "keep_last=0"))
        assert [p.name for p in (disk / "run" / "checkpoints").iterdir()] == ["step_000001"]
        assert checkpoint.verify(disk / "run" / "checkpoints" / "step_000001") is None
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)  # -l: the failed run's files may be open
