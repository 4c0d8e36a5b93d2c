"""On-policy distillation vs RL vs off-policy distillation at equal compute, on the bundled tiny pair.

    python bench/bench_opd_vs_rl.py [--steps 150] [--seeds 0 1 2] [--eval-every 25] [--jobs 2] [--report-only] [--fresh]

The claim tested (Thinking Machines, "On-Policy Distillation", 2025; Qwen3 technical report):
a student reaches a given quality with far less compute by OPD than by RL on the task reward
or by supervised training on teacher samples. Four methods train the bundled student from
the same start with `recipes/demo.yaml` (lr, schedule, P prompts x G completions, temperature)
and the same step count, each seed seeing the same prompts at each step:

  OPD         `opd train`: sampled-token reverse KL, kl_coef=1, no task reward
  GRPO        `opd train teacher_backend=none task_reward=true kl_coef=0`: grader reward only, no teacher
  off-policy  `opd train-offpolicy`: cross-entropy on G teacher samples per prompt (sequence-level KD)
  OPD+GRPO    `opd train task_reward=true kl_coef=1`: Â = A_task - λ(p - q), λ = 1
  GRPO lr/5   GRPO at lr 3e-4: at the shared lr GRPO collapses, so it also runs once at a fifth of it
  OPD top-k   `opd train loss=topk_kl topk=20`: on-policy, but the teacher's top-20 forward KL per token

Compute, counted from the logged token counts (real tokens, no padding; what an engine that
skips padding and finished rows, like vLLM, would process):
  student forward tokens  = Σ (prompt + completion) over the student's samples (sampling; KV cache)
  teacher forward tokens  = Σ (teacher prompt + completion) scored (OPD) or sampled (off-policy)
  student train tokens    = Σ (prompt + completion) over the trained rows, forward + backward
  FLOPs = 2·N_student·fwd + 2·N_teacher·teacher_fwd + 6·N_student·train   (N = parameter count,
          tied embeddings counted once as the LM head; attention-score FLOPs, ~L·d per token at
          L ≤ 60, are left out for every method alike)
Wall time: the sum of `perf/step_s` (sampling + scoring + training; evaluation excluded), with
two runs sharing the machine, so it is indicative only. Evaluation (greedy accuracy on the
seed's held-out problems, teacher-trace gap) runs every `--eval-every` steps and costs nothing
on the x-axis. The target is the teacher's accuracy on the same problems minus 2 points.

Cost: the 12 runs of the four methods took 2,678 CPU-seconds (one thread each), i.e. ~22 min on 2 idle
cores with --jobs 2 (64 min measured on this shared machine); the two extra methods add ~1,200 CPU-s.
`--methods OPD GRPO off-policy OPD+GRPO` runs the four alone.

Writes bench/results/opd_vs_rl.json (every point of every run) and bench/results/opd_vs_rl.png;
prints the compute-to-target table. Runs live in runs/bench_opd_vs_rl/ (one folder each); a run
already complete with the same settings is reused unless --fresh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "runs" / "bench_opd_vs_rl"
RECIPE = ROOT / "recipes" / "demo.yaml"
METHODS = {  # name: (opd command, overrides on top of the recipe)
    "OPD": ("train", []),
    "GRPO": ("train", ["teacher_backend=none", "task_reward=true", "kl_coef=0"]),
    "off-policy": ("train-offpolicy", []),
    "OPD+GRPO": ("train", ["task_reward=true", "kl_coef=1"]),
    # GRPO at the shared lr (1.5e-3) collapses (reward 0.15 -> 0 by step ~65 on seed 0): rerun at lr / 5, one try.
    "GRPO lr/5": ("train", ["teacher_backend=none", "task_reward=true", "kl_coef=0", "lr=3e-4"]),
    # Not one of the four: OPD with the teacher's top-20 forward KL, a dense per-token target like the
    # off-policy cross-entropy but on the student's own samples; it separates "on-policy" from "sampled-token".
    "OPD top-k": ("train", ["loss=topk_kl", "topk=20"]),
}
COLORS = {"OPD": "tab:blue", "GRPO": "tab:red", "off-policy": "tab:green", "OPD+GRPO": "tab:purple",
          "GRPO lr/5": "tab:orange", "OPD top-k": "tab:cyan"}
TARGET_MARGIN = 0.02  # target accuracy: the teacher's minus 2 points


def run_dir(method: str, seed: int) -> Path:
    name = method.replace("+", "_").replace("-", "").replace(" ", "_").replace("/", "")
    return RUNS / f"{name}_seed{seed}"


def _matches(value, text: str) -> bool:
    try:
        return float(value) == float(text)
    except (TypeError, ValueError):
        return str(value).lower() == text.lower()


def complete(method: str, seed: int, common: list[str]) -> bool:
    """A finished run of exactly these settings is already in its folder (so an interrupted bench resumes)."""
    folder = run_dir(method, seed)
    if not (folder / "final").is_dir() or not (folder / "config.json").is_file():
        return False
    config = json.loads((folder / "config.json").read_text())
    wanted = [*common, *METHODS[method][1], f"seed={seed}"]
    return all(_matches(config.get(key), value) for key, value in (item.split("=", 1) for item in wanted))


def launch(runs: list[tuple[str, int]], common: list[str], jobs: int) -> dict[tuple[str, int], float]:
    """Run every (method, seed) as its own `python -m opd` process, `jobs` at a time, one thread each."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                        "HF_HUB_OFFLINE": "1"}
    pending, active, seconds = list(runs), {}, {}
    while pending or active:
        while pending and len(active) < jobs:
            method, seed = pending.pop(0)
            out = run_dir(method, seed)
            out.mkdir(parents=True, exist_ok=True)
            command, overrides = METHODS[method]
            argv = [sys.executable, "-m", "opd", command, str(RECIPE), *common, *overrides, f"seed={seed}",
                    f"out_dir={out}"]
            log = (out / "log.txt").open("w")
            active[(method, seed)] = (subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                                      time.time(), log)
            print(f"started {method} seed {seed}", flush=True)
        time.sleep(1.0)
        for key, (proc, start, log) in list(active.items()):
            if proc.poll() is None:
                continue
            log.close()
            del active[key]
            seconds[key] = time.time() - start
            if proc.returncode:
                raise RuntimeError(f"{key} failed (exit {proc.returncode}); see {run_dir(*key) / 'log.txt'}")
            print(f"finished {key[0]} seed {key[1]} in {seconds[key]:.0f}s", flush=True)
    return seconds


def parameter_counts() -> dict[str, int]:
    from opd.models import load_model

    return {name: sum(p.numel() for p in load_model(f"tiny:{name}").parameters()) for name in ("student", "teacher")}


def prompt_lengths(config: dict) -> tuple[list[int], list[int]]:
    """Token counts of every student and teacher prompt of the run's training pool, as the loop renders them."""
    from opd.models import load_tokenizer
    from opd.tasks import load_task
    from opd.tokenization import render_prompt

    examples = load_task(config["task"], "train", config["train_size"], config["seed"], config["data_dir"])
    student, teacher = load_tokenizer(config["student"]), load_tokenizer(config["teacher"])
    return ([len(render_prompt(student, ex.prompt)) for ex in examples],
            [len(render_prompt(teacher, ex.teacher_prompt)) for ex in examples])


def run_points(method: str, seed: int, params: dict[str, int]) -> list[dict]:
    """One point per evaluation: cumulative tokens, FLOPs and wall time up to that step, and the eval metrics."""
    from opd.metrics import read_metrics
    from opd.sampler import step_prompts

    folder = run_dir(method, seed)
    config = json.loads((folder / "config.json").read_text())
    student_prompt_len, teacher_prompt_len = prompt_lengths(config)
    G = config["completions_per_prompt"]
    totals = dict.fromkeys(("student_fwd_tokens", "teacher_fwd_tokens", "student_train_tokens", "wall_s"), 0.0)
    points = []
    for record in read_metrics(folder):
        step = record["step"]
        if step:
            chosen = step_prompts(len(student_prompt_len), config["prompts_per_step"], config["seed"], step)
            completion = record["gen/mean_length"] * len(chosen) * G  # Σ completion tokens of the step
            student_rows = G * sum(student_prompt_len[i] for i in chosen) + completion
            teacher_rows = G * sum(teacher_prompt_len[i] for i in chosen) + completion
            totals["student_train_tokens"] += student_rows
            if method != "off-policy":
                totals["student_fwd_tokens"] += student_rows  # the student samples its own rows
            if not method.startswith("GRPO"):
                totals["teacher_fwd_tokens"] += teacher_rows  # the teacher scores (OPD) or samples (off-policy)
            totals["wall_s"] += record["perf/step_s"]
        if "eval/student_accuracy" not in record:
            continue
        flops = (2 * params["student"] * totals["student_fwd_tokens"] + 2 * params["teacher"] * totals["teacher_fwd_tokens"]
                 + 6 * params["student"] * totals["student_train_tokens"])
        points.append({"method": method, "seed": seed, "step": step, "flops": flops, **totals,
                       "accuracy": record["eval/student_accuracy"], "teacher_accuracy": record["eval/teacher_accuracy"],
                       "trace_gap": record["eval/trace_gap"], "trace_gap_pre_final": record.get("eval/trace_gap_pre_final"),
                       "trace_gap_final": record.get("eval/trace_gap_final"),
                       "eval_sampled_reverse_kl": record["eval/sampled_reverse_kl"]})
    return points


def first_reaching(points: list[dict], level: float) -> dict | None:
    return next((p for p in points if p["accuracy"] >= level - 1e-9), None)


def to_target(points_by_run: dict[tuple[str, int], list[dict]], methods: list[str], seeds: list[int],
              level_of_seed) -> dict[str, dict]:
    """Per method: FLOPs and wall time to the first eval at or above the seed's level, median over seeds.

    A seed that never gets there counts as +inf, so the median is finite only if most seeds reach it;
    `budget_*` (the median of the whole run's FLOPs and wall time) then bounds what it would need from below.
    """
    out = {}
    for method in methods:
        runs = [points_by_run[(method, s)] for s in seeds]
        hits = [first_reaching(points, level_of_seed(s)) for points, s in zip(runs, seeds, strict=True)]
        flops = [h["flops"] if h else math.inf for h in hits]
        wall = [h["wall_s"] if h else math.inf for h in hits]
        out[method] = {"reached": sum(h is not None for h in hits), "flops": statistics.median(flops),
                       "wall_s": statistics.median(wall), "per_seed_flops": [f if math.isfinite(f) else None for f in flops],
                       "budget_flops": statistics.median(r[-1]["flops"] for r in runs),
                       "budget_wall_s": statistics.median(r[-1]["wall_s"] for r in runs)}
    return out


def _ratio(r: dict, base: dict, key: str) -> str:
    """r / OPD; a bound when one of them did not get there within its budget ('>' or '<'), '-' when neither did."""
    mine, theirs = r[key], base[key]
    if math.isfinite(mine) and math.isfinite(theirs):
        return f"{mine / theirs:.2f}x"
    if math.isfinite(mine):
        return f"<{mine / base['budget_' + key]:.2f}x"
    if math.isfinite(theirs):
        return f">{r['budget_' + key] / theirs:.2f}x"
    return "-"


def table(title: str, result: dict[str, dict], seeds: int) -> str:
    lines = [title, f"{'method':<12}{'seeds reached':>14}{'FLOPs (median)':>16}{'wall s':>9}{'FLOPs / OPD':>13}"
                    f"{'wall / OPD':>12}"]
    base = result.get("OPD")
    for method, r in result.items():
        reached = f"{r['reached']}/{seeds}"
        flops = f"{r['flops']:.3g}" if math.isfinite(r["flops"]) else "not reached"
        wall = f"{r['wall_s']:.0f}" if math.isfinite(r["wall_s"]) else "-"
        ratio = _ratio(r, base, "flops") if base else "-"
        wall_ratio = _ratio(r, base, "wall_s") if base else "-"
        lines.append(f"{method:<12}{reached:>14}{flops:>16}{wall:>9}{ratio:>13}{wall_ratio:>12}")
    return "\n".join(lines)


def plot(points_by_run: dict, methods: list[str], seeds: list[int], target: float, teacher: float, path: Path) -> None:
    """Accuracy and teacher-trace gap vs FLOPs, accuracy vs wall time: mean over seeds at each eval, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("flops", "accuracy"), ("flops", "trace_gap"), ("wall_s", "accuracy"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for method in methods:
        runs = [points_by_run[(method, s)] for s in seeds]
        n = min(len(r) for r in runs)
        for ax, (x_key, y_key) in zip(axes, panels, strict=True):
            scale = 1e-12 if x_key == "flops" else 1.0
            x = [statistics.mean(r[i][x_key] for r in runs) * scale for i in range(n)]
            ys = [[r[i][y_key] for r in runs] for i in range(n)]
            ax.plot(x, [statistics.mean(y) for y in ys], marker="o", ms=3, color=COLORS[method], label=method)
            ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], color=COLORS[method], alpha=0.18)
    for ax in (axes[0], axes[2]):
        ax.axhline(teacher, color="black", lw=1, label=f"teacher ({teacher:.1%})")
        ax.axhline(target, color="black", lw=1, ls="--", label=f"target: teacher - 2 pts ({target:.1%})")
        ax.set_ylabel("held-out greedy accuracy")
    axes[1].set_ylabel("teacher-trace gap (student - teacher NLL, nats/token)")
    axes[1].set_yscale("log")  # a collapsed run's gap is ~10x the others'; log keeps both readable
    axes[0].set_xlabel("training compute, TFLOP")
    axes[1].set_xlabel("training compute, TFLOP")
    axes[2].set_xlabel("training wall time, s (2 runs sharing 2 cores; eval excluded)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    for ax in (axes[0], axes[2]):  # above the curves, below the teacher's line
        ax.set_ylim(0.0, 1.0)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, 0.88))
    axes[1].legend(fontsize=7, loc="center right")
    fig.suptitle(f"tiny pair: OPD vs GRPO vs off-policy distillation, {len(seeds)} seeds "
                 "(line: mean, band: min-max over seeds; TFLOP = student sampling + teacher forward + student fwd/bwd)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--report-only", action="store_true", help="re-analyse the runs already in runs/bench_opd_vs_rl")
    parser.add_argument("--fresh", action="store_true", help="re-run even the runs already complete")
    args = parser.parse_args()
    common = [f"steps={args.steps}", f"eval_every={args.eval_every}", f"eval_size={args.eval_size}", "save_every=0",
              "log_samples=0", "progress=false"]
    runs = [(m, s) for s in args.seeds for m in args.methods]
    start = time.time()
    todo = [key for key in runs if args.fresh or not complete(*key, common)]
    process_s = {} if args.report_only else launch(todo, common, args.jobs)
    params = parameter_counts()
    points_by_run = {key: run_points(*key, params) for key in runs}
    teacher_of_seed = {s: points_by_run[(args.methods[0], s)][0]["teacher_accuracy"] for s in args.seeds}
    start_of_seed = {s: points_by_run[(args.methods[0], s)][0]["accuracy"] for s in args.seeds}
    levels = {"teacher - 2 points": lambda s: teacher_of_seed[s] - TARGET_MARGIN,
              "start + 10 points": lambda s: start_of_seed[s] + 0.10,
              "start + 20 points": lambda s: start_of_seed[s] + 0.20}
    results = {name: to_target(points_by_run, args.methods, args.seeds, level) for name, level in levels.items()}
    finals = {m: [points_by_run[(m, s)][-1] for s in args.seeds] for m in args.methods}

    RESULTS.mkdir(parents=True, exist_ok=True)
    teacher = statistics.mean(teacher_of_seed.values())
    plot(points_by_run, args.methods, args.seeds, teacher - TARGET_MARGIN, teacher, RESULTS / "opd_vs_rl.png")
    summary = {"args": vars(args), "parameters": params, "teacher_accuracy_per_seed": teacher_of_seed,
               "student_start_accuracy_per_seed": start_of_seed, "process_seconds": {f"{m}/seed{s}": v for (m, s), v
                                                                                    in process_s.items()},
               "to_level": results, "points": [p for key in runs for p in points_by_run[key]]}
    (RESULTS / "opd_vs_rl.json").write_text(json.dumps(summary, indent=1) + "\n")

    print(f"\nparameters: student {params['student']:,}, teacher {params['teacher']:,}; {args.steps} steps, "
          f"seeds {args.seeds}; teacher accuracy per seed {[f'{v:.1%}' for v in teacher_of_seed.values()]}, "
          f"student start {[f'{v:.1%}' for v in start_of_seed.values()]}\n")
    print(f"{'method':<12}{'final accuracy (mean ± sd)':>28}{'final trace gap':>17}{'total FLOPs':>13}{'train wall s':>14}")
    for m, pts in finals.items():
        acc = [p["accuracy"] for p in pts]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"{m:<12}{f'{statistics.mean(acc):.1%} ± {sd:.1%}':>28}{statistics.mean(p['trace_gap'] for p in pts):>17.3f}"
              f"{statistics.mean(p['flops'] for p in pts):>13.3g}{statistics.mean(p['wall_s'] for p in pts):>14.0f}")
    for name, result in results.items():
        print("\n" + table(f"compute to reach {name} (per seed, first eval at or above it)", result, len(args.seeds)))
    print("(ratio <r: OPD did not get there within its whole run, so the ratio is below r; >r: the reverse)")
    print(f"\nwrote {RESULTS / 'opd_vs_rl.json'} and {RESULTS / 'opd_vs_rl.png'} ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
