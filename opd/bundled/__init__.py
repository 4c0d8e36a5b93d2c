"""Builders of the bundled models; nothing in the training runtime imports this package.

`tiny.py` trains the bundled tokenizer, `tiny:teacher` and `tiny:student` (`opd build-tiny`);
`gsm8k.py` trains `tiny:gsm8k`, the privileged GSM8K recipe's model (`opd build-tiny-gsm8k`).
`arith_self.py` fine-tunes `tiny:arith_self`, the privileged arithmetic recipe's model (`opd build-tiny-arith-self`).
`automaton.py` trains `tiny:automaton_teacher` and `tiny:automaton_student`, the long-horizon task's pair
(`opd build-tiny-automaton`).
The trained folders are committed under `opd/assets/tiny/`, where `opd.models.resolve` finds
`tiny:NAME`; a run only loads them, as it loads any checkpoint.

`opd build-tiny` and `opd build-tiny-gsm8k` are the argument and run functions below (`opd.cli.COMMANDS`);
the builders are imported when a command runs.
"""

from __future__ import annotations

import argparse


def build_tiny_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="output folder (default: opd/assets/tiny, the bundled models)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    p.add_argument("--teacher-steps", type=int, metavar="N", help="cap on the teacher's pre-training steps per cycle")
    p.add_argument("--student-steps", type=int, metavar="N", help="cap on the student's pre-training steps")
    p.add_argument("--n-eval", type=int, default=200, metavar="N", help="held-out problems for the accuracy bands")


def build_tiny_command(args: argparse.Namespace) -> None:
    from opd.bundled.tiny import build_tiny
    from opd.models import TINY_DIR

    report = build_tiny(args.out or TINY_DIR, seed=args.seed, teacher_steps=args.teacher_steps,
                        student_steps=args.student_steps, n_eval=args.n_eval)
    for name in ("teacher", "student"):
        print(f"{name}: {report[name]['parameters']:,} parameters, held-out accuracy "
              f"{report[name]['held_out_accuracy']:.1%}, {report[name]['train_seconds']:.0f}s")


def build_gsm8k_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="output folder (default: opd/assets/tiny/gsm8k, the bundled model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    p.add_argument("--steps", type=int, metavar="N", help="pre-training steps (default: the spec's 1,600)")
    p.add_argument("--data-dir", metavar="DIR", help="folder with GSM8K train.jsonl/test.jsonl (default: the bundled copy)")


def build_gsm8k_command(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from opd.bundled.gsm8k import GSM8K_DIR, SPEC, build_tiny_gsm8k

    spec = replace(SPEC, max_steps=args.steps) if args.steps else SPEC
    report = build_tiny_gsm8k(args.out or GSM8K_DIR, seed=args.seed, spec=spec, data_dir=args.data_dir)
    rows = report["recipe_rows"]
    print(f"{report['parameters']:,} parameters, {report['train_seconds']:.0f}s; on the recipe's {rows['n']} "
          f"rows: teacher NLL on its own greedy trace {rows['teacher_nll_on_own_greedy_trace']:.3f}, "
          f"teacher-trace gap {rows['step0_eval']['eval/trace_gap']:.3f}")


def build_arith_self_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="output folder (default: opd/assets/tiny/arith_self, the bundled model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data")
    p.add_argument("--steps", type=int, metavar="N", help="cap on the fine-tuning steps (default: the spec's 1,500)")


def build_arith_self_command(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from opd.bundled.arith_self import ARITH_SELF_DIR, SPEC, build_arith_self

    spec = replace(SPEC, max_steps=args.steps) if args.steps else SPEC
    report = build_arith_self(args.out or ARITH_SELF_DIR, seed=args.seed, spec=spec)
    final = report["final"]
    print(f"{report['parameters']:,} parameters, {report['train_seconds']:.0f}s, step {final['step']}: held-out "
          f"accuracy {final['plain_accuracy']:.1%} alone, {final['privileged_accuracy']:.1%} with the solution shown")


def build_automaton_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="output folder (default: opd/assets/tiny, the bundled models)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    p.add_argument("--teacher-steps", type=int, metavar="N", help="cap on the teacher's pre-training steps")
    p.add_argument("--student-steps", type=int, metavar="N", help="cap on the student's pre-training steps")
    p.add_argument("--ceiling-steps", type=int, default=1000, metavar="N",
                   help="steps of the student's SFT on teacher traces (its ceiling; 0 skips it)")
    p.add_argument("--n-eval", type=int, default=200, metavar="N", help="held-out problems for the accuracy bands")


def build_automaton_command(args: argparse.Namespace) -> None:
    from opd.bundled.automaton import STUDENT_NAME, TEACHER_NAME, build_automaton
    from opd.models import TINY_DIR

    report = build_automaton(args.out or TINY_DIR, seed=args.seed, teacher_steps=args.teacher_steps,
                             student_steps=args.student_steps, ceiling_steps=args.ceiling_steps, n_eval=args.n_eval)
    for name in (TEACHER_NAME, STUDENT_NAME):
        print(f"{name}: {report[name]['parameters']:,} parameters, held-out accuracy "
              f"{report[name]['held_out_accuracy']:.1%}, {report[name]['train_seconds']:.0f}s")
    ceiling = report.get("student_sft_ceiling")
    if ceiling:
        print(f"student SFT ceiling on {ceiling['pool']} teacher traces: {ceiling['best_accuracy']:.1%} "
              f"(best of {ceiling['steps']} steps)")
