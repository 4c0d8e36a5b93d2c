"""On-policy distillation vs RL vs off-policy distillation at equal compute, on a bundled pair.

    python bench/bench_opd_vs_rl.py [--task arithmetic|automaton] [--steps N] [--seeds 0 1 2] [--eval-every 25]
                                    [--jobs 2] [--methods ...] [--report-only] [--fresh] [--results STEM]

The claim tested (Thinking Machines, "On-Policy Distillation", 2025; Qwen3 technical report):
a student reaches a given quality with far less compute by OPD than by RL on the task reward
or by supervised training on teacher samples. Every method trains the task's bundled student from
the same start with the task's recipe (lr, schedule, P prompts x G completions, temperature) and
the same step count, each seed seeing the same prompts at each step.

`--task arithmetic` (recipes/demo.yaml, tiny:student/tiny:teacher; 20-token answers):
  OPD         `opd train`: sampled-token reverse KL, kl_coef=1, no task reward
  GRPO        `opd train teacher_backend=none task_reward=true kl_coef=0`: grader reward only, no teacher
  off-policy  `opd train-offpolicy`: cross-entropy on G teacher samples per prompt (sequence-level KD)
  OPD+GRPO    `opd train task_reward=true kl_coef=1`: Â = A_task - λ(p - q), λ = 1
  GRPO lr/5   GRPO at lr 3e-4: at the shared lr GRPO collapses, so it also runs once at a fifth of it
  OPD top-k   `opd train loss=topk_kl topk=20`: on-policy, but the teacher's top-20 forward KL per token
  OPD student-top-k, OPD full RKL: the two exact reverse-KL estimators, as below
  All at the recipe's lr (GRPO's second try aside).

`--task automaton` (recipes/automaton.yaml, tiny:automaton_student/teacher; 108-token solutions of
rule 30 where one wrong cell spoils every later line, opd.tasks.automaton), 200 steps of 8 prompts x 4
completions at a constant lr after warm-up (the task's `overrides`, for every method: the student's
SFT ceiling reaches the teacher in ~100 such steps, and an 80-step cosine run of 16 x 4 left every method
short of it, bench/results/opd_vs_rl_automaton_80steps.json):
  OPD                `opd train`: sampled-token reverse KL (the default loss)
  OPD student-top-k  `loss=student_topk_rkl`: exact reverse KL over the student's top-K tokens + a tail bucket
  OPD top-k          `loss=topk_kl topk=20`: the teacher's top-20 forward KL
  OPD full RKL       `loss=jsd jsd_beta=1`: the exact reverse KL over the whole vocabulary
  off-policy         `opd train-offpolicy`: cross-entropy on teacher samples
  GRPO               the grader reward only, no teacher
  two-stage          the Qwen3 report's schedule: off-policy for the first half of the steps, then OPD
                     (`opd train student=<stage 1>/final`) for the second half, the same total steps
  The learning-rate rule, the same for every method: seed 0 runs at the recipe's lr times each of the
  task's lr_factors (1 and 1/3), then one grid step further (x3 past 1, /3 past 1/3) while its best
  factor is the highest or lowest tried, up to EDGE_STEPS times: no method is judged at an lr the grid
  cut short. The factor with the higher final held-out accuracy (ties: the lower final teacher-trace
  gap) is used for the other seeds, and the table and plot show the chosen lr's seeds.
  two-stage inherits off-policy's factor for its first stage and OPD's for its second (no sweep of its own).

Compute, counted from the logged token counts (real tokens, no padding; what an engine that
skips padding and finished rows, like vLLM, would process):
  student forward tokens  = Σ (prompt + completion) over the student's samples (sampling; KV cache)
  teacher forward tokens  = Σ (teacher prompt + completion) scored (OPD) or sampled (off-policy)
  student train tokens    = Σ (prompt + completion) over the trained rows, forward + backward
  FLOPs = 2·N_student·fwd + 2·N_teacher·teacher_fwd + 6·N_student·train   (N = parameter count,
          tied embeddings counted once as the LM head; attention-score FLOPs, ~L·d per token,
          are left out for every method alike). The full-vocabulary and top-k losses' extra head
          work on the teacher's side is inside its forward count; the student's top-K bookkeeping is free.
Wall time: the sum of `perf/step_s` (sampling + scoring + training; evaluation excluded), with
two runs sharing the machine, so it is indicative only. Evaluation (greedy accuracy on the
seed's held-out problems, teacher-trace gap) runs every `--eval-every` steps and costs nothing
on the x-axis. The tables: compute to the first evaluation at the teacher's accuracy minus 5 and
minus 2 points (and the start plus 10 and 20), median over seeds, and its ratio to the best method.

Cost: arithmetic's 24 runs ~1 h 20 min on this shared machine; automaton's lr sweep (12 seed-0 runs plus those
past the edge: 23 in the committed run), 12 later runs and 3 two-stage pairs at 200 steps, 3-5 min a run two
at a time, ~55 min in all. Writes
bench/results/opd_vs_rl.json / .png (arithmetic) or opd_vs_rl_<task>.json / .png (every point of every
run, the sweep's too) and prints the tables. Runs live in runs/bench_opd_vs_rl/ (arithmetic) or
runs/bench_opd_vs_rl_<task>/, one folder each; a run already complete with the same
settings is reused unless --fresh.
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
TEACHER_FREE = ["teacher_backend=none", "task_reward=true", "kl_coef=0"]
ARITHMETIC_METHODS = {  # name: (opd command, overrides on top of the recipe)
    "OPD": ("train", []),
    "GRPO": ("train", TEACHER_FREE),
    "off-policy": ("train-offpolicy", []),
    "OPD+GRPO": ("train", ["task_reward=true", "kl_coef=1"]),
    # GRPO at the shared lr (1.5e-3) collapses (reward 0.15 -> 0 by step ~65 on seed 0): rerun at lr / 5, one try.
    "GRPO lr/5": ("train", [*TEACHER_FREE, "lr=3e-4"]),
    # Not one of the four: OPD with the teacher's top-20 forward KL, a dense per-token target like the
    # off-policy cross-entropy but on the student's own samples; it separates "on-policy" from "sampled-token".
    "OPD top-k": ("train", ["loss=topk_kl", "topk=20"]),
    # The two exact estimators over the student's own tokens, as on the automaton task.
    "OPD student-top-k": ("train", ["loss=student_topk_rkl"]),
    "OPD full RKL": ("train", ["loss=jsd", "jsd_beta=1"]),
}
AUTOMATON_METHODS = {
    "OPD": ("train", []),
    "OPD student-top-k": ("train", ["loss=student_topk_rkl"]),
    "OPD top-k": ("train", ["loss=topk_kl", "topk=20"]),
    "OPD full RKL": ("train", ["loss=jsd", "jsd_beta=1"]),
    "off-policy": ("train-offpolicy", []),
    "GRPO": ("train", TEACHER_FREE),
    "two-stage": ("two-stage", []),  # off-policy for steps / 2, then OPD from its final/ for steps / 2
}


@dataclass(frozen=True)
class Task:
    recipe: Path
    methods: dict[str, tuple[str, list[str]]]
    runs: Path
    stem: str  # results file name
    steps: int  # default --steps
    lr_factors: tuple[float, ...]  # seed 0 of every method runs at each; the best is kept for the other seeds
    overrides: tuple[str, ...] = ()  # the bench's settings on top of the recipe, the same for every method


TASKS = {
    "arithmetic": Task(ROOT / "recipes" / "demo.yaml", ARITHMETIC_METHODS, ROOT / "runs" / "bench_opd_vs_rl",
                       "opd_vs_rl", 150, (1.0,)),
    "automaton": Task(ROOT / "recipes" / "automaton.yaml", AUTOMATON_METHODS,
                      ROOT / "runs" / "bench_opd_vs_rl_automaton", "opd_vs_rl_automaton", 200, (1.0, 1 / 3),
                      # 32 rows a step, constant lr: the student's SFT ceiling needs ~100 such steps to reach the
                      # teacher (build report); a decaying lr over 80 steps of 64 rows stopped every method short of it.
                      ("prompts_per_step=8", "lr_schedule=constant")),
}
COLORS = {"OPD": "tab:blue", "GRPO": "tab:red", "off-policy": "tab:green", "OPD+GRPO": "tab:purple",
          "GRPO lr/5": "tab:orange", "OPD top-k": "tab:cyan", "OPD student-top-k": "tab:brown",
          "OPD full RKL": "tab:olive", "two-stage": "tab:pink"}
EDGE_STEPS = 3  # at most this many lr steps past the grid's edge (x27 or /27 at a grid step of 3)
LEVELS = (("teacher - 5 points", "teacher", -0.05), ("teacher - 2 points", "teacher", -0.02),
          ("start + 10 points", "start", 0.10), ("start + 20 points", "start", 0.20))


@dataclass(frozen=True)
class Run:
    """One `opd` process: a method's seed at one lr factor; a two-stage run is two of them (stage 1 and 2)."""

    method: str
    seed: int
    lr_factor: float = 1.0
    stage: int = 0  # 1 or 2 for the halves of a two-stage run

    def folder(self, task: Task) -> Path:
        name = self.method.replace("+", "_").replace("-", "").replace(" ", "_").replace("/", "")
        lr = f"_lr{self.lr_factor:.3g}" if len(task.lr_factors) > 1 and not self.stage else ""
        base = task.runs / f"{name}{lr}_seed{self.seed}"
        return base / f"stage{self.stage}" if self.stage else base


def recipe_lr(task: Task) -> float:
    from omegaconf import OmegaConf

    return float(OmegaConf.load(task.recipe).lr)


def command_of(run: Run, task: Task, steps: int, common: list[str], factors: dict[str, float]) -> tuple[str, list[str]]:
    """The `opd` subcommand and every override of the run (what it is launched with and what `complete` checks)."""
    if run.stage == 1:
        run = Run("off-policy", run.seed, factors.get("off-policy", 1.0), stage=1)
    elif run.stage == 2:
        first = Run("two-stage", run.seed, stage=1).folder(task) / "final"
        run = Run("OPD", run.seed, factors.get("OPD", 1.0), stage=2)
    command, overrides = task.methods[run.method]
    overrides = [f"steps={steps // 2 if run.stage else steps}", *task.overrides, *common, *overrides,
                 f"seed={run.seed}"]
    if run.lr_factor != 1.0:
        overrides.append(f"lr={recipe_lr(task) * run.lr_factor:.6g}")
    if run.stage == 2:
        overrides.append(f"student={first}")
    return command, overrides


def _matches(value, text: str) -> bool:
    try:
        return float(value) == float(text)
    except (TypeError, ValueError):
        return str(value).lower() == text.lower()


def complete(folder: Path, overrides: list[str]) -> bool:
    """A finished run of exactly these settings is already in its folder (so an interrupted bench resumes)."""
    if not (folder / "final").is_dir() or not (folder / "config.json").is_file():
        return False
    config = json.loads((folder / "config.json").read_text())
    return all(_matches(config.get(key), value) for key, value in (item.split("=", 1) for item in overrides))


def launch(jobs_list: list[tuple[Run, Path, str, list[str], list[Path]]], task: Task, jobs: int) -> dict[Run, float]:
    """Run each (run, folder, command, overrides, folders it needs finished) as its own `python -m opd` process,
    `jobs` at a time, one thread each; a run starts once the runs it needs have finished."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                        "HF_HUB_OFFLINE": "1"}
    pending, active, seconds, done = list(jobs_list), {}, {}, set()
    scheduled = {j[1] for j in jobs_list}
    finished = lambda need: need in done or (need not in scheduled and (need / "final").is_dir())  # noqa: E731
    while pending or active:
        while len(active) < jobs:
            ready = next((j for j in pending if all(finished(need) for need in j[4])), None)
            if ready is None:
                break
            pending.remove(ready)
            run, out, command, overrides, _ = ready
            if out.is_dir() and any(out.iterdir()):  # an interrupted or other-settings run: kept aside, started over
                out.rename(out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
            out.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "opd", command, str(task.recipe), *overrides, f"out_dir={out}"]
            log = (out / "log.txt").open("w")
            active[run] = (subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                           time.time(), log, out)
            print(f"started {run}", flush=True)
        if not active and pending:
            raise RuntimeError(f"runs wait on runs that are not scheduled: {[j[0] for j in pending]}")
        time.sleep(1.0)
        for run, (proc, start, log, out) in list(active.items()):
            if proc.poll() is None:
                continue
            log.close()
            del active[run]
            seconds[run] = time.time() - start
            if proc.returncode:
                raise RuntimeError(f"{run} failed (exit {proc.returncode}); see {out / 'log.txt'}")
            done.add(out)
            print(f"finished {run} in {seconds[run]:.0f}s", flush=True)
    return seconds


def schedule(runs: list[Run], task: Task, steps: int, common: list[str], factors: dict[str, float], fresh: bool):
    """The launch list of `runs` not already complete (a two-stage run's stage 2 needs its stage 1)."""
    out = []
    for run in runs:
        command, overrides = command_of(run, task, steps, common, factors)
        folder = run.folder(task)
        if fresh or not complete(folder, overrides):
            needs = [Run(run.method, run.seed, stage=1).folder(task)] if run.stage == 2 else []
            out.append((run, folder, command, overrides, needs))
    return out


def parameter_counts(config: dict) -> dict[str, int]:
    from opd.models import load_model

    return {role: sum(p.numel() for p in load_model(config[role]).parameters()) for role in ("student", "teacher")}


def prompt_lengths(config: dict) -> tuple[list[int], list[int]]:
    """Token counts of every student and teacher prompt of the run's training pool, as the loop renders them."""
    from opd.models import load_tokenizer
    from opd.tasks import load_task
    from opd.tokenization import render_prompt

    examples = load_task(config["task"], "train", config["train_size"], config["seed"], config["data_dir"])
    student, teacher = load_tokenizer(config["student"]), load_tokenizer(config["teacher"])
    return ([len(render_prompt(student, ex.prompt)) for ex in examples],
            [len(render_prompt(teacher, ex.teacher_prompt)) for ex in examples])


TOTALS = ("student_fwd_tokens", "teacher_fwd_tokens", "student_train_tokens", "wall_s")


def run_points(folder: Path, method: str, seed: int, command: str, overrides: list[str], params: dict[str, int],
               after: dict | None = None) -> list[dict]:
    """One point per evaluation: cumulative tokens, FLOPs and wall time up to that step, and the eval metrics.

    `after` (the last point of a two-stage run's stage 1) is where the counts and steps start; this run's
    step-0 evaluation, the same weights as that point's, is left out.
    """
    from opd.metrics import read_metrics
    from opd.sampler import step_prompts

    config = json.loads((folder / "config.json").read_text())
    student_prompt_len, teacher_prompt_len = prompt_lengths(config)
    G = config["completions_per_prompt"]
    offpolicy, teacher_free = command == "train-offpolicy", "teacher_backend=none" in overrides
    totals = {key: after[key] if after else 0.0 for key in TOTALS}
    points = []
    for record in read_metrics(folder):
        step = record["step"]
        if step:
            chosen = step_prompts(len(student_prompt_len), config["prompts_per_step"], config["seed"], step)
            completion = record["gen/mean_length"] * len(chosen) * G  # Σ completion tokens of the step
            student_rows = G * sum(student_prompt_len[i] for i in chosen) + completion
            teacher_rows = G * sum(teacher_prompt_len[i] for i in chosen) + completion
            totals["student_train_tokens"] += student_rows
            if not offpolicy:
                totals["student_fwd_tokens"] += student_rows  # the student samples its own rows
            if not teacher_free:
                totals["teacher_fwd_tokens"] += teacher_rows  # the teacher scores (OPD) or samples (off-policy)
            totals["wall_s"] += record["perf/step_s"]
        if "eval/student_accuracy" not in record or (after and not step):
            continue
        flops = (2 * params["student"] * totals["student_fwd_tokens"] + 2 * params["teacher"] * totals["teacher_fwd_tokens"]
                 + 6 * params["student"] * totals["student_train_tokens"])
        points.append({"method": method, "seed": seed, "lr": config["lr"], "step": step + (after["step"] if after else 0),
                       "flops": flops, **totals,
                       "accuracy": record["eval/student_accuracy"], "teacher_accuracy": record["eval/teacher_accuracy"],
                       "trace_gap": record["eval/trace_gap"], "trace_gap_pre_final": record.get("eval/trace_gap_pre_final"),
                       "trace_gap_final": record.get("eval/trace_gap_final"),
                       "eval_sampled_reverse_kl": record["eval/sampled_reverse_kl"]})
    return points


def points_of(run: Run, task: Task, steps: int, common: list[str], factors: dict[str, float],
              params: dict[str, int]) -> list[dict]:
    """A run's points; a two-stage run's are its stage 1's followed by its stage 2's, counted on from them."""
    if run.method != "two-stage":
        return run_points(run.folder(task), run.method, run.seed, *command_of(run, task, steps, common, factors), params)
    first = Run("two-stage", run.seed, stage=1)
    points = run_points(first.folder(task), "two-stage", run.seed, *command_of(first, task, steps, common, factors), params)
    second = Run("two-stage", run.seed, stage=2)
    return points + run_points(second.folder(task), "two-stage", run.seed,
                               *command_of(second, task, steps, common, factors), params, after=points[-1])


def best_factor(points_by_factor: dict[float, list[dict]]) -> float:
    """The lr rule: the higher final accuracy, then the lower final teacher-trace gap."""
    return max(points_by_factor, key=lambda f: (points_by_factor[f][-1]["accuracy"], -points_by_factor[f][-1]["trace_gap"]))


def past_edge(best: float, tried: list[float], grid: tuple[float, ...]) -> float | None:
    """The factor one grid step (the geometric step of `grid`) past `best` when `best` is the highest or the
    lowest factor tried so far, else None (the best lr is bracketed, or `grid` is one factor)."""
    if len(grid) < 2:
        return None  # no sweep, no edge
    step = (max(grid) / min(grid)) ** (1 / (len(grid) - 1))
    return best * step if best == max(tried) else best / step if best == min(tried) else None


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
    """r / the best method; a bound when r did not get there within its budget ('>'), '-' when no method did."""
    mine, theirs = r[key], base[key]
    if math.isfinite(mine) and math.isfinite(theirs):
        return f"{mine / theirs:.2f}x"
    if math.isfinite(theirs):
        return f">{r['budget_' + key] / theirs:.2f}x"
    return "-"


def table(title: str, result: dict[str, dict], seeds: int) -> str:
    """The compute-to-level table; ratios are to the method with the least median FLOPs to the level."""
    best = min(result, key=lambda m: result[m]["flops"])
    lines = [title, f"{'method':<19}{'seeds reached':>14}{'FLOPs (median)':>16}{'wall s':>9}{'FLOPs / best':>14}"
                    f"{'wall / best':>13}"]
    for method, r in result.items():
        reached = f"{r['reached']}/{seeds}"
        flops = f"{r['flops']:.3g}" if math.isfinite(r["flops"]) else "not reached"
        wall = f"{r['wall_s']:.0f}" if math.isfinite(r["wall_s"]) else "-"
        lines.append(f"{method:<19}{reached:>14}{flops:>16}{wall:>9}{_ratio(r, result[best], 'flops'):>14}"
                     f"{_ratio(r, result[best], 'wall_s'):>13}")
    return "\n".join(lines)


def plot(points_by_run: dict, methods: list[str], seeds: list[int], teacher: float, title: str, path: Path) -> None:
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
        ax.axhline(teacher - 0.05, color="black", lw=1, ls=":", label=f"teacher - 5 pts ({teacher - 0.05:.1%})")
        ax.axhline(teacher - 0.02, color="black", lw=1, ls="--", label=f"teacher - 2 pts ({teacher - 0.02:.1%})")
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
    fig.suptitle(f"{title}: OPD vs GRPO vs off-policy distillation, {len(seeds)} seeds "
                 "(line: mean, band: min-max over seeds; TFLOP = student sampling + teacher forward + student fwd/bwd)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="arithmetic")
    parser.add_argument("--steps", type=int, help="steps of every run (default: the task's; two-stage: half each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--methods", nargs="+", help="a subset of the task's methods (default: all)")
    parser.add_argument("--report-only", action="store_true", help="re-analyse the runs already in the runs folder")
    parser.add_argument("--fresh", action="store_true", help="re-run even the runs already complete")
    parser.add_argument("--results", help="file name stem under bench/results (default: the task's, or <it>_subset "
                                          "with --methods, so a subset never overwrites the full comparison)")
    args = parser.parse_args()
    task = TASKS[args.task]
    methods = args.methods or list(task.methods)
    unknown = sorted(set(methods) - set(task.methods))
    if unknown:
        parser.error(f"--methods: {unknown} are not methods of --task {args.task}; choose from {list(task.methods)}")
    steps = args.steps or task.steps
    stem = args.results or (task.stem if set(methods) == set(task.methods) else f"{task.stem}_subset")
    common = [f"eval_every={args.eval_every}", f"eval_size={args.eval_size}", "save_every=0", "log_samples=0",
              "progress=false"]
    start = time.time()
    single = [m for m in methods if m != "two-stage"]
    # The lr rule: seed 0 of every method at each factor, one more past the grid's edge while the best is on it
    # (at most EDGE_STEPS), then the other seeds at the best one.
    seed0, tried = args.seeds[0], {m: list(task.lr_factors) for m in single}
    sweep_points, process_s, params = {}, {}, None
    while new := [Run(m, seed0, f) for m in single for f in tried[m] if Run(m, seed0, f) not in sweep_points]:
        if not args.report_only:
            process_s |= launch(schedule(new, task, steps, common, {}, args.fresh), task, args.jobs)
        params = params or parameter_counts(json.loads((new[0].folder(task) / "config.json").read_text()))
        sweep_points |= {run: points_of(run, task, steps, common, {}, params) for run in new}
        factors = {m: best_factor({f: sweep_points[Run(m, seed0, f)] for f in tried[m]}) for m in single}
        for m in single:
            beyond = past_edge(factors[m], tried[m], task.lr_factors)
            if beyond and len(tried[m]) < len(task.lr_factors) + EDGE_STEPS:
                tried[m].append(beyond)
    runs = {(m, s): Run(m, s, factors[m]) for m in single for s in args.seeds}
    later = [run for (m, s), run in runs.items() if s != args.seeds[0]]
    if "two-stage" in methods:
        runs |= {("two-stage", s): Run("two-stage", s) for s in args.seeds}
        later += [Run("two-stage", s, stage=k) for s in args.seeds for k in (1, 2)]
    if not args.report_only:
        process_s |= launch(schedule(later, task, steps, common, factors, args.fresh), task, args.jobs)
    points_by_run = {key: points_of(run, task, steps, common, factors, params) for key, run in runs.items()}
    teacher_of_seed = {s: points_by_run[(methods[0], s)][0]["teacher_accuracy"] for s in args.seeds}
    start_of_seed = {s: points_by_run[(methods[0], s)][0]["accuracy"] for s in args.seeds}
    base_of = {"teacher": teacher_of_seed, "start": start_of_seed}
    results = {name: to_target(points_by_run, methods, args.seeds, lambda s, b=base, d=delta: base_of[b][s] + d)
               for name, base, delta in LEVELS}
    finals = {m: [points_by_run[(m, s)][-1] for s in args.seeds] for m in methods}

    RESULTS.mkdir(parents=True, exist_ok=True)
    teacher = statistics.mean(teacher_of_seed.values())
    plot(points_by_run, methods, args.seeds, teacher, f"{args.task} ({steps} steps)", RESULTS / f"{stem}.png")
    lr = recipe_lr(task)
    summary = {"args": vars(args), "task": args.task, "steps": steps, "parameters": params,
               "lr_rule": {"recipe_lr": lr, "factors": task.lr_factors, "tried": tried,
                           "chosen_lr": {m: lr * factors.get(m, 1.0) for m in single},
                           "sweep_final": {f"{r.method}/lr{lr * r.lr_factor:.3g}": pts[-1] for r, pts in sweep_points.items()}},
               "teacher_accuracy_per_seed": teacher_of_seed, "student_start_accuracy_per_seed": start_of_seed,
               "process_seconds": {f"{r.method}/seed{r.seed}/lr{r.lr_factor:.3g}/stage{r.stage}": v
                                   for r, v in process_s.items()},
               "to_level": results, "points": [p for key in runs for p in points_by_run[key]],
               "sweep_points": [p for pts in sweep_points.values() for p in pts]}
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")

    print(f"\nparameters: student {params['student']:,}, teacher {params['teacher']:,}; {steps} steps, "
          f"seeds {args.seeds}; teacher accuracy per seed {[f'{v:.1%}' for v in teacher_of_seed.values()]}, "
          f"student start {[f'{v:.1%}' for v in start_of_seed.values()]}")
    if len(task.lr_factors) > 1:
        print("lr chosen on seed 0 (final accuracy, then trace gap), per method: "
              + ", ".join(f"{m} {lr * factors[m]:.3g}" for m in single))
    print(f"\n{'method':<19}{'final accuracy (mean ± sd)':>28}{'final trace gap':>17}{'total FLOPs':>13}{'train wall s':>14}")
    for m, pts in finals.items():
        acc = [p["accuracy"] for p in pts]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"{m:<19}{f'{statistics.mean(acc):.1%} ± {sd:.1%}':>28}{statistics.mean(p['trace_gap'] for p in pts):>17.3f}"
              f"{statistics.mean(p['flops'] for p in pts):>13.3g}{statistics.mean(p['wall_s'] for p in pts):>14.0f}")
    for name, result in results.items():
        print("\n" + table(f"compute to reach {name} (per seed, first eval at or above it)", result, len(args.seeds)))
    print("(>r: the method did not get there within its whole run, so its ratio to the best is above r)")
    print(f"\nwrote {RESULTS / (stem + '.json')} and {RESULTS / (stem + '.png')} ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
