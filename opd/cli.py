"""`opd` commands: train, demo, eval, build-tiny, build-tiny-gsm8k, plot."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _train(recipe: str | None, overrides: list[str]) -> Path:
    from omegaconf import OmegaConf

    from opd.config import load_config
    from opd.train import train

    config = load_config(recipe, overrides)  # fails here, before any model is loaded
    print(OmegaConf.to_yaml(OmegaConf.structured(config)), flush=True)
    Path(config.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(config.out_dir) / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return train(config)


def summarize(run_dir: Path) -> str:
    """Before/after table of a run: first vs last evaluation, first vs last 5 training steps."""
    from opd.metrics import read_metrics

    records = read_metrics(run_dir)
    evals = [r for r in records if "eval/student_accuracy" in r]
    steps = [r for r in records if "opd/sampled_reverse_kl" in r]
    rows = []
    if evals:
        for key in [f"{prefix}/{name}" for prefix in ("eval", "eval_train") for name in (  # eval_train: training rows
                "student_accuracy", "teacher_accuracy", "trace_gap", "trace_gap_pre_final", "trace_gap_final",
                "sampled_reverse_kl")]:
            if key in evals[0] and key in evals[-1]:
                rows.append((key, f"step {evals[0]['step']}", evals[0][key], f"step {evals[-1]['step']}", evals[-1][key]))
    if steps:
        head, tail = steps[:5], steps[-5:]
        for key in ("opd/sampled_reverse_kl", "task/reward"):
            rows.append((key, "first 5 steps", statistics.mean(r[key] for r in head), "last 5 steps",
                         statistics.mean(r[key] for r in tail)))
    lines = [f"{'metric':<33}{'before':>26}{'after':>26}"]
    lines += [f"{k:<33}{f'{a:.4f} ({la})':>26}{f'{b:.4f} ({lb})':>26}" for k, la, a, lb, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a recipe: opd train RECIPE.yaml key=value ...")
    p.add_argument("recipe", nargs="?", help="YAML recipe (optional; defaults come from opd.config.TrainConfig)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p = sub.add_parser("demo", help="distil the bundled tiny student from the bundled tiny teacher")
    p.add_argument("overrides", nargs="*", help="key=value overrides of recipes/demo.yaml")
    p = sub.add_parser("eval", help="held-out greedy accuracy of a teacher and a student")
    p.add_argument("--teacher", default="tiny:teacher")
    p.add_argument("--student", default="tiny:student")
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--n", type=int, default=200, help="held-out examples")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p = sub.add_parser("build-tiny", help="train and save the bundled tiny tokenizer, teacher and student")
    p.add_argument("--out", default=None, help="output folder (default: the package's assets/tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-steps", type=int, default=None)
    p.add_argument("--student-steps", type=int, default=None)
    p.add_argument("--n-eval", type=int, default=200, help="held-out problems for the accuracy bands")
    p = sub.add_parser("build-tiny-gsm8k", help="train and save the tiny GSM8K model of recipes/gsm8k_privileged.yaml")
    p.add_argument("--out", default=None, help="output folder (default: the package's assets/tiny/gsm8k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the spec's)")
    p.add_argument("--data-dir", default=None, help="folder with GSM8K train.jsonl/test.jsonl")
    p = sub.add_parser("plot", help="write PNG curves of a run folder")
    p.add_argument("run_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    try:
        if args.command in ("train", "demo"):
            recipe = args.recipe if args.command == "train" else RECIPES_DIR / "demo.yaml"
            overrides = args.overrides
            if args.command == "train" and recipe and "=" in recipe:  # no recipe, only overrides
                recipe, overrides = None, [recipe, *overrides]
            start = time.time()
            run_dir = _train(recipe, overrides)
            from opd.metrics import plot_run

            print(f"\n{summarize(run_dir)}\n\nrun folder: {run_dir}  (final student: {run_dir / 'final'}, "
                  f"curves: {plot_run(run_dir)}), {time.time() - start:.0f}s")
        elif args.command == "eval":
            from opd.evaluate import greedy_accuracy
            from opd.models import load_model, load_tokenizer
            from opd.tasks import load_task

            examples = load_task(args.task, "test", args.n)
            for name in ("teacher", "student"):
                path = getattr(args, name)
                accuracy, _ = greedy_accuracy(load_model(path), load_tokenizer(path), examples, args.max_new_tokens,
                                              teacher_prompt=name == "teacher")
                print(f"{name:<8} {path}: held-out greedy accuracy {accuracy:.1%} on {len(examples)} {args.task} problems")
        elif args.command == "build-tiny":
            from opd.tiny import TINY_DIR, build_tiny

            report = build_tiny(args.out or TINY_DIR, seed=args.seed, teacher_steps=args.teacher_steps,
                                student_steps=args.student_steps, n_eval=args.n_eval)
            for name in ("teacher", "student"):
                print(f"{name}: {report[name]['parameters']:,} parameters, held-out accuracy "
                      f"{report[name]['held_out_accuracy']:.1%}, {report[name]['train_seconds']:.0f}s")
        elif args.command == "build-tiny-gsm8k":
            from dataclasses import replace

            from opd.tiny_gsm8k import GSM8K_DIR, SPEC, build_tiny_gsm8k

            spec = replace(SPEC, max_steps=args.steps) if args.steps else SPEC
            report = build_tiny_gsm8k(args.out or GSM8K_DIR, seed=args.seed, spec=spec, data_dir=args.data_dir)
            rows = report["recipe_rows"]
            print(f"{report['parameters']:,} parameters, {report['train_seconds']:.0f}s; on the recipe's {rows['n']} "
                  f"rows: teacher NLL on its own greedy trace {rows['teacher_nll_on_own_greedy_trace']:.3f}, "
                  f"teacher-trace gap {rows['step0_eval']['eval/trace_gap']:.3f}")
        elif args.command == "plot":
            from opd.metrics import plot_run

            print(plot_run(args.run_dir))
    except (ValueError, FileNotFoundError) as e:
        print(f"opd {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
