"""`opd` commands: train, train-offpolicy, demo, eval, validate, build-tiny, build-tiny-gsm8k, plot."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import statistics
import sys
import time
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _train(recipe: str | None, overrides: list[str], offpolicy: bool = False) -> Path:
    """The method is chosen here, once: `opd train` runs the on-policy loop, `opd train-offpolicy` the
    off-policy baseline; both read the same recipe schema, so one recipe compares them."""
    from omegaconf import OmegaConf

    from opd.config import load_config
    from opd.offpolicy import check_offpolicy_config
    from opd.train import train, train_offpolicy

    config = load_config(recipe, overrides)  # fails here, before any model is loaded
    if offpolicy:
        check_offpolicy_config(config)
    print(OmegaConf.to_yaml(OmegaConf.structured(config)), flush=True)
    return train_offpolicy(config) if offpolicy else train(config)


def _eval(args: argparse.Namespace) -> dict:
    """The full held-out report of `opd.evaluate.Evaluator` for a teacher/student pair; printed, and saved if asked."""
    from opd.data import eval_rows
    from opd.evaluate import Evaluator, format_report
    from opd.models import load_model, load_tokenizer
    from opd.teacher.hf import freeze
    from opd.tokenization import check_tokenizers_compatible
    from opd.validate import validate_setup

    examples, reward = eval_rows(args)  # read and validated before any model loads (#19)
    source = args.data or args.task or "arithmetic"
    tokenizer, teacher_tokenizer = load_tokenizer(args.student), load_tokenizer(args.teacher)
    check_tokenizers_compatible(teacher_tokenizer, tokenizer)
    if args.teacher_url:  # a served teacher (#18): its tokenizer and config only, scored over HTTP
        from transformers import AutoConfig

        from opd.models import resolve
        from opd.teacher.served import ServedTeacherScorer

        teacher = AutoConfig.from_pretrained(resolve(args.teacher))
    else:
        teacher = freeze(load_model(args.teacher, device=args.device))
    student = load_model(args.student, device=args.device)
    student.eval()
    validate_setup(args.task or "arithmetic", examples[:1], teacher, student, teacher_tokenizer, tokenizer)
    if args.teacher_url:
        teacher = ServedTeacherScorer(args.teacher_url.split(","), args.teacher_model_name or args.teacher)
    evaluator = Evaluator(teacher, tokenizer, teacher_tokenizer, examples, args.temperature, args.max_new_tokens,
                          seed=args.seed, reward=reward)
    metrics = evaluator(student)
    samples = metrics.pop("eval/samples")
    rows = f"{len(examples)} rows of {source}" if args.data else f"{len(examples)} held-out {source} examples"
    print(f"student {args.student} vs teacher {args.teacher}: {rows}, "
          f"temperature {args.temperature}, at most {args.max_new_tokens} new tokens\n")
    print(format_report(metrics))
    print("greedy transcripts (prompt -> student; the first also the teacher's greedy trace on its own prompt)")
    for sample in samples[: args.samples]:
        print(f"  {sample}")
    if args.json:
        report = {"teacher": args.teacher, "student": args.student, "task": source, "n": len(examples),
                  "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                  "metrics": metrics, "samples": samples}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nreport: {args.json}")
    return metrics


def _validate(run_dir: str, steps: int | None) -> None:
    """The run validator on a finished run folder; the expected steps default to its config.json."""
    from opd.validate import validate_run

    if steps is None:
        config = Path(run_dir) / "config.json"
        if not config.is_file():
            raise ValueError(f"{run_dir}: no config.json to read the number of steps from; pass --steps N")
        steps = json.loads(config.read_text())["steps"]
        if steps is None:  # derived from epochs inside the run: its checkpoints record the number (#19)
            from opd import checkpoint

            latest = checkpoint.latest(Path(run_dir))
            steps = json.loads((latest / "config.json").read_text())["steps"] if latest else None
        if steps is None:
            raise ValueError(f"{run_dir}: the run derived its steps from epochs and left no checkpoint; pass --steps N")
    records = validate_run(run_dir, steps)
    print(f"OK: {run_dir}: steps 0..{steps} logged once each, step-0 eval present, all {len(records)} records finite, "
          f"tokens trained every step, final student saved")


def summarize(run_dir: Path) -> str:
    """Before/after table of a run: first vs last evaluation, first vs last 5 training steps."""
    from opd.metrics import read_metrics

    records = read_metrics(run_dir)
    evals = [r for r in records if "eval/trace_gap" in r or "eval/student_accuracy" in r]  # reward=none: no accuracy
    steps = [r for r in records if "train/loss" in r]
    rows = []
    if evals:
        for key in [f"{prefix}/{name}" for prefix in ("eval", "eval_train") for name in (  # eval_train: training rows
                "student_accuracy", "teacher_accuracy", "trace_gap", "trace_gap_pre_final", "trace_gap_final",
                "sampled_reverse_kl")]:
            if key in evals[0] and key in evals[-1]:
                rows.append((key, f"step {evals[0]['step']}", evals[0][key], f"step {evals[-1]['step']}", evals[-1][key]))
    if steps:
        head, tail = steps[:5], steps[-5:]
        for key in ("opd/sampled_reverse_kl", "task/reward", "sft/nll"):
            if key in head[0] and key in tail[-1]:
                rows.append((key, "first 5 steps", statistics.mean(r[key] for r in head), "last 5 steps",
                             statistics.mean(r[key] for r in tail)))
    lines = [f"{'metric':<33}{'before':>26}{'after':>26}"]
    lines += [f"{k:<33}{f'{a:.4f} ({la})':>26}{f'{b:.4f} ({lb})':>26}" for k, la, a, lb, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # anywhere on the line, so it can be added to a failing command as it was typed
    argv = [a for a in argv if a != "--debug"]
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a recipe: opd train RECIPE.yaml key=value ...")
    p.add_argument("recipe", nargs="?", help="YAML recipe (optional; defaults come from opd.config.TrainConfig)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p = sub.add_parser("train-offpolicy", help="off-policy distillation baseline: cross-entropy on teacher samples")
    p.add_argument("recipe", nargs="?", help="YAML recipe (the same schema as `opd train`)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p = sub.add_parser("demo", help="distil the bundled tiny student from the bundled tiny teacher")
    p.add_argument("overrides", nargs="*", help="key=value overrides of recipes/demo.yaml")
    p = sub.add_parser("eval", help="held-out report: teacher-trace gap, accuracies, sampled reverse KL, perplexities")
    p.add_argument("--teacher", default="tiny:teacher", help="model folder, or tiny:teacher")
    p.add_argument("--student", default="tiny:student", help="model folder, or tiny:student")
    p.add_argument("--teacher-url", default=None, help="score against `vllm serve` here (--teacher: tokenizer+config)")
    p.add_argument("--teacher-model-name", default=None, help="the served teacher's name (default: --teacher)")
    p.add_argument("--task", default=None, help="arithmetic (default), gsm8k or gsm8k_privileged")
    p.add_argument("--data-dir", default=None, help="folder with test.jsonl for the GSM8K tasks")
    p.add_argument("--data", default=None, help="your own rows instead of --task: .jsonl/.json/.parquet/.csv, "
                                                "a save_to_disk folder or hf:NAME[:SPLIT] (every row, up to --n)")
    p.add_argument("--prompt-key", default=None, help="column of the student prompt (with --data)")
    p.add_argument("--teacher-prompt-key", default=None, help="column of the teacher prompt (with --data)")
    p.add_argument("--answer-key", default=None, help="column of the answer, a.b for nested (with --data)")
    p.add_argument("--system-prompt", default=None, help="system message added to rows that have none")
    p.add_argument("--reward", default=None, help="final_answer, boxed, exact, none or module:function "
                                                  "(default: final_answer for --task, none for --data)")
    p.add_argument("--n", type=int, default=200, help="held-out examples")
    p.add_argument("--temperature", type=float, default=1.0, help="τ of the sampled metrics and the trace NLLs")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--samples", type=int, default=2, help="student transcripts to print")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    p = sub.add_parser("validate", help="check a finished run folder: steps, step-0 eval, finite metrics, tokens")
    p.add_argument("run_dir")
    p.add_argument("--steps", type=int, default=None, help="expected steps (default: the run's config.json)")
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
    p = sub.add_parser("init-student", help="a student cut from the teacher: keep some of its decoder layers")
    p.add_argument("--from", dest="teacher", required=True, help="teacher model folder, or tiny:teacher")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", default=None, help="comma-separated layer indices to keep, e.g. 0,6,12")
    which.add_argument("--keep", type=int, default=None, help="number of layers to keep")
    p.add_argument("--by", default="even", choices=("even", "importance"),
                   help="with --keep: spread evenly, or the layers whose skipping changes the teacher most")
    p.add_argument("--out", required=True, help="output folder for the student")
    p = sub.add_parser("plot", help="write PNG curves of a run folder")
    p.add_argument("run_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    try:
        if args.command in ("train", "train-offpolicy", "demo"):
            recipe = RECIPES_DIR / "demo.yaml" if args.command == "demo" else args.recipe
            overrides = args.overrides
            if args.command != "demo" and recipe and "=" in recipe:  # no recipe, only overrides
                recipe, overrides = None, [recipe, *overrides]
            start = time.time()
            run_dir = _train(recipe, overrides, offpolicy=args.command == "train-offpolicy")
            from opd.metrics import plot_run

            print(f"\n{summarize(run_dir)}\n\nrun folder: {run_dir}  (final student: {run_dir / 'final'}, "
                  f"curves: {plot_run(run_dir)}), {time.time() - start:.0f}s")
        elif args.command == "eval":
            _eval(args)
        elif args.command == "validate":
            _validate(args.run_dir, args.steps)
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
        elif args.command == "init-student":
            from opd.prune import print_init_student

            print_init_student(args.teacher, args.out, args.layers, args.keep, args.by)
        elif args.command == "plot":
            from opd.metrics import plot_run

            print(plot_run(args.run_dir))
    except KeyboardInterrupt:
        print(f"opd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"opd {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def one_line(e: Exception) -> str:
    """A user's error in one line: ours as written, an OS error with its path, anything else with its type.

    Our ValueErrors name the field and the fix; an OSError (ENOSPC, EACCES, a missing file) names
    the path; a foreign exception keeps its type and first line, and points to `--debug`.
    """
    if isinstance(e, OSError) and e.strerror:
        hint = {errno.EACCES: "; check its permissions or choose another path",
                errno.EROFS: "; choose a path on a writable filesystem",
                errno.ENOSPC: "; free some space or choose another out_dir"}.get(e.errno, "") if e.filename else ""
        return f"{e.filename}: {e.strerror}{hint}" if e.filename else e.strerror
    if isinstance(e, (ValueError, OSError)):
        return " ".join(str(e).split())
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first} (rerun with --debug for the traceback)"
