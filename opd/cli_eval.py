"""`opd eval`: the held-out report of a teacher/student pair (`opd.evaluate.Evaluator`, printed by
`opd.report.format_report`), on a built-in task's test split or on your rows, with the teacher's noise floor
on the same samples (`opd.noise_floor`); one of `opd.cli.COMMANDS`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def at_least(low: int):
    """An argparse type: an integer >= `low`, else a one-line error naming the bound."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its message on a non-integer
    return parse


def eval_arguments(p: argparse.ArgumentParser) -> None:
    models = p.add_argument_group("models")
    models.add_argument("--teacher", default="tiny:teacher", metavar="DIR", help="teacher model folder")
    models.add_argument("--student", default="tiny:student", metavar="DIR", help="student model folder")
    models.add_argument("--teacher-url", metavar="URL[,URL]",
                        help="score against `vllm serve` there; --teacher then gives only the tokenizer and config")
    models.add_argument("--teacher-model-name", metavar="NAME", help="the served teacher's name (default: --teacher)")
    models.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    rows = p.add_argument_group("rows (a built-in task's test split, or your own file)")
    rows.add_argument("--task", metavar="NAME", help="arithmetic (the default), gsm8k or gsm8k_privileged")
    rows.add_argument("--data-dir", metavar="DIR", help="folder with test.jsonl for the GSM8K tasks")
    rows.add_argument("--data", metavar="PATH", help="your rows instead of --task: .jsonl/.json/.parquet/.csv, "
                                                     "a save_to_disk folder or hf:NAME[:SPLIT]")
    rows.add_argument("--prompt-key", metavar="COLUMN", help="column of the student prompt (with --data)")
    rows.add_argument("--teacher-prompt-key", metavar="COLUMN", help="column of the teacher prompt (with --data)")
    rows.add_argument("--answer-key", metavar="COLUMN", help="column of the answer, a.b for nested (with --data)")
    rows.add_argument("--system-prompt", metavar="TEXT", help="system message added to rows that have none")
    rows.add_argument("--reward", metavar="NAME", help="final_answer, boxed, exact, none or module:function "
                                                       "(default: final_answer for --task, none for --data)")
    rows.add_argument("--n", type=at_least(1), default=200, help="rows evaluated: the first N")
    run = p.add_argument_group("sampling and output")
    run.add_argument("--temperature", type=float, default=1.0, metavar="T", help="τ of the samples and trace NLLs")
    run.add_argument("--max-new-tokens", type=at_least(1), default=48, metavar="N", help="completion budget")
    run.add_argument("--seed", type=int, default=0, help="seed of the student's samples")
    run.add_argument("--samples", type=at_least(0), default=2, metavar="N", help="greedy transcripts to print")
    run.add_argument("--json", metavar="PATH", help="also write the report to this JSON file")


def check_model_folder(flag: str, folder: str) -> None:
    from opd.models import resolve

    if not (resolve(folder) / "config.json").is_file():
        raise ValueError(f"{flag} {folder!r} is not a model folder (no config.json there); give a Hugging Face "
                         f"model folder, or tiny:teacher / tiny:student")


def eval_pair(args: argparse.Namespace, examples: list):
    """(teacher: a frozen model or a served scorer, student in eval mode, student tokenizer, teacher tokenizer)."""
    from opd.models import load_model, load_tokenizer, resolve
    from opd.teacher.hf import freeze
    from opd.tokenization import check_tokenizers_compatible
    from opd.validate import validate_setup

    tokenizer, teacher_tokenizer = load_tokenizer(args.student), load_tokenizer(args.teacher)
    check_tokenizers_compatible(teacher_tokenizer, tokenizer)
    if args.teacher_url:  # a served teacher (#18): its tokenizer and config only, scored over HTTP
        from transformers import AutoConfig

        teacher = AutoConfig.from_pretrained(resolve(args.teacher))
    else:
        teacher = freeze(load_model(args.teacher, device=args.device))
    student = load_model(args.student, device=args.device).eval()
    validate_setup(args.task or "arithmetic", examples[:1], teacher, student, teacher_tokenizer, tokenizer)
    if args.teacher_url:
        from opd.teacher.served import ServedTeacherScorer

        teacher = ServedTeacherScorer(args.teacher_url.split(","), args.teacher_model_name or args.teacher)
    return teacher, student, tokenizer, teacher_tokenizer


def eval_command(args: argparse.Namespace) -> dict:
    """The full held-out report of `opd.evaluate.Evaluator` for a teacher/student pair; printed, and saved if asked."""
    from opd import noise_floor
    from opd.data import eval_rows
    from opd.evaluate import Evaluator
    from opd.report import format_report

    for flag, folder in (("--teacher", args.teacher), ("--student", args.student)):
        check_model_folder(flag, folder)
    examples, reward = eval_rows(args)  # read and validated before any model loads (#19)
    teacher, student, tokenizer, teacher_tokenizer = eval_pair(args, examples)
    evaluator = Evaluator(teacher, tokenizer, teacher_tokenizer, examples, args.temperature, args.max_new_tokens,
                          seed=args.seed, reward=reward)
    metrics = evaluator(student)
    floor = noise_floor.check(evaluator.teacher, evaluator.samples(student), args.temperature)  # the same samples
    metrics |= noise_floor.metrics(floor) if floor is not None else {}
    samples = metrics.pop("eval/samples")
    source = args.data or args.task or "arithmetic"
    rows = f"{len(examples)} rows of {source}" if args.data else f"{len(examples)} held-out {source} examples"
    print(f"student {args.student} vs teacher {args.teacher}: {rows}, "
          f"temperature {args.temperature}, at most {args.max_new_tokens} new tokens\n")
    print(format_report(metrics))
    if args.samples:
        print("greedy transcripts (prompt -> student; the first also the teacher's greedy trace on its own prompt)")
    for sample in samples[: args.samples]:
        print(f"  {sample}")
    if args.json:
        write_eval_json(args, source, len(examples), metrics, samples)
    return metrics


def write_eval_json(args: argparse.Namespace, source: str, n: int, metrics: dict, samples: list[str]) -> None:
    report = {"teacher": args.teacher, "student": args.student, "task": source, "n": n,
              "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
              "metrics": metrics, "samples": samples}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nreport: {args.json}")
