"""Soak test of the run folder (#17): SIGKILL `opd train` at random moments, resume, compare with an uninterrupted run.

Kills land during start-up (imports, model loading, resume), mid-step, and while a checkpoint is
being written (a `step_N.tmp` folder exists). Reports kills, resumes, steps lost or logged twice
in metrics.jsonl, metrics that differ from the uninterrupted run, and the max weight difference
of final/ (must be 0). Then a fault table: damaged checkpoints, a torn metrics line, two runs on
one folder, a full disk (a small tmpfs, when `mount` is allowed). Writes bench/results/bench_soak.json.

    python bench/bench_soak.py [--kills 22] [--steps 24]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["prompts_per_step=2", "completions_per_prompt=2", "max_new_tokens=8", "eval_size=2", "train_size=16",
        "eval_every=0", "progress=false", "log_samples=0", "save_every=1", "keep_last=3"]
ENV = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def opd(out: Path, *overrides: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "opd", "train", *TINY, f"out_dir={out}", *overrides], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def finish(out: Path, *overrides: str) -> tuple[int, str]:
    p = opd(out, *overrides)
    _, err = p.communicate(timeout=600)
    return p.returncode, err


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def metric_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def wait_for(p: subprocess.Popen, ready, timeout: float = 120) -> bool:
    end = time.time() + timeout
    while time.time() < end and p.poll() is None:
        if ready():
            return True
        time.sleep(0.001)
    return False


def soak(work: Path, kills: int, steps: int, rng: random.Random) -> dict:
    reference = work / "reference"
    rc, err = finish(reference, f"steps={steps}")
    assert rc == 0, err[-2000:]
    run, log, resumes = work / "soaked", [], 0
    while len(log) < kills:
        mode = "startup" if len(log) % 6 == 5 else ("checkpoint write" if len(log) % 2 else "mid-step")
        p = opd(run, f"steps={steps}", "resume=true")
        before = metric_lines(run)
        if mode == "startup":
            time.sleep(rng.uniform(0.2, 4.0))
        elif mode == "checkpoint write":  # a new step logged, then its save's .tmp (not one a kill left)
            wait_for(p, lambda: metric_lines(run) > before)
            wait_for(p, lambda: any((run / "checkpoints").glob("*.tmp")) if (run / "checkpoints").is_dir() else False)
            time.sleep(rng.uniform(0, 0.02))
        else:
            wait_for(p, lambda: metric_lines(run) > before)
            time.sleep(rng.uniform(0, 0.3))
        if p.poll() is not None:  # finished before the kill: start the soak over would waste time; stop here
            break
        tmp_present = (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("*.tmp"))
        p.send_signal(signal.SIGKILL)
        p.wait()
        resumes += 1
        log.append({"mode": mode, "tmp_present_at_kill": tmp_present, "lines_before": before,
                    "lines_after": metric_lines(run)})
    rc, err = finish(run, f"steps={steps}", "resume=true")
    assert rc == 0, err[-2000:]
    resumes += 1
    ref_records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records]
    by_step = {r["step"]: r for r in records}
    differing = sorted({k for a in ref_records if a["step"] in by_step for k, v in a.items()
                        if not k.startswith("perf/") and by_step[a["step"]].get(k) != v})
    return {"steps": steps, "kills": len(log), "kills_during_checkpoint_write": sum(k["tmp_present_at_kill"] for k in log),
            "kills_by_mode": {m: sum(k["mode"] == m for k in log) for m in ("startup", "mid-step", "checkpoint write")},
            "resumes": resumes, "steps_lost": len(set(range(steps + 1)) - set(logged)),
            "steps_duplicated": len(logged) - len(set(logged)), "metrics_differing_from_uninterrupted": differing,
            "max_weight_diff_final": max_weight_diff(reference, run), "kill_log": log}


def last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line or "warning:" in line or "resumed from" in line]
    return " | ".join(line.split(" ", 1)[-1] if line[:2].isdigit() else line for line in lines)[-400:]


def faults(work: Path) -> list[dict]:
    base = work / "fault_base"
    rc, err = finish(base, "steps=3")
    assert rc == 0, err[-2000:]
    whole = work / "fault_whole"
    finish(whole, "steps=4")
    rows = []

    def case(name: str, damage, *overrides: str, compare: bool = True):
        run = work / f"fault_{name.replace(' ', '_')}"
        shutil.copytree(base, run)
        damage(run)
        rc, err = finish(run, "steps=4", "resume=true", *overrides)
        diff = max_weight_diff(whole, run) if rc == 0 and compare else None
        rows.append({"fault": name, "exit": rc, "what opd said": last_line(err), "max_weight_diff_final": diff})
        print(f"{name:<34} exit {rc}  diff {diff}  {last_line(err)[:160]}", flush=True)

    newest = lambda run: run / "checkpoints" / "step_000003"  # noqa: E731

    def truncate(run):
        f = newest(run) / "model" / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    def flip(run):
        f = newest(run) / "trainer_state.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(data)

    def zero(run):
        with (newest(run) / "model" / "model.safetensors").open("r+b") as f:
            f.seek(1 << 20)
            f.write(bytes(1 << 16))

    def torn(run):
        with (run / "metrics.jsonl").open("a") as f:
            f.write('{"step": 4, "train/lo')

    case("truncated model.safetensors", truncate)
    case("one bit flipped in trainer_state.pt", flip)
    case("64 KiB zeroed in model.safetensors", zero)
    case("torn last line of metrics.jsonl", torn)
    case("all checkpoints damaged", lambda run: [(c / "manifest.json").unlink() for c in (run / "checkpoints").iterdir()])
    case("resume with lr changed", lambda run: None, "lr=1e-3")
    case("fresh run into a used folder", lambda run: None, "resume=false")

    two = work / "fault_two_runs"  # two runs on one folder, started together
    a, b = opd(two, "steps=6"), opd(two, "steps=6")
    (_, err_a), (_, err_b) = a.communicate(timeout=600), b.communicate(timeout=600)
    rows.append({"fault": "two concurrent runs on one folder", "exit": [a.returncode, b.returncode],
                 "what opd said": last_line(err_a + err_b), "max_weight_diff_final": None})
    print(rows[-1], flush=True)
    rows += full_disk(work)
    return rows


def full_disk(work: Path) -> list[dict]:
    disk = work / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        return [{"fault": "full disk (12 MB tmpfs)", "exit": None, "what opd said":
                 f"not run: mount -t tmpfs failed ({mounted.stderr.strip()[:100]}); needs root",
                 "max_weight_diff_final": None}]
    try:
        rc, err = finish(disk / "run", "steps=3", "keep_last=0")
        left = sorted(p.name for p in (disk / "run" / "checkpoints").iterdir())
        row = {"fault": "full disk (12 MB tmpfs, 8.4 MB checkpoints)", "exit": rc,
               "what opd said": last_line(err), "checkpoints_left": left, "max_weight_diff_final": None}
    finally:
        subprocess.run(["umount", "-l", str(disk)])
    print(row, flush=True)
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=22)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_soak_") as tmp:
        result = {"soak": soak(Path(tmp), args.kills, args.steps, random.Random(args.seed))}
        s = result["soak"]
        print(f"kills {s['kills']} ({s['kills_during_checkpoint_write']} during checkpoint writes, {s['kills_by_mode']}), "
              f"resumes {s['resumes']}, steps lost {s['steps_lost']}, duplicated {s['steps_duplicated']}, "
              f"metrics differing {s['metrics_differing_from_uninterrupted']}, "
              f"max weight diff {s['max_weight_diff_final']}", flush=True)
        result["faults"] = faults(Path(tmp))
    result["seconds"] = round(time.time() - start)
    result["note"] = "2 shared CPU cores (other jobs running); OMP_NUM_THREADS=1 in every run"
    out = ROOT / "bench" / "results" / "bench_soak.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
