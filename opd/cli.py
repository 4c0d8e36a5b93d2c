"""`opd` commands: one function per command, found in `COMMANDS` by name.

Each command is a `Command`: a one-line help, a function that adds its arguments, and a function
that runs it. `main` parses, runs the command, and turns any error into one line
`opd <command>: error: ...` with exit code 2 (`--debug`, anywhere on the line, shows the traceback).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from opd import bundled, cli_eval

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
EPILOG = """examples:
  opd demo                                      distil the bundled tiny student from the bundled tiny teacher
  opd train recipes/demo.yaml steps=50 lr=3e-4  a recipe, then key=value overrides (keys: opd/config.py)
  opd eval --teacher DIR --student DIR --n 50   the held-out report of a pair of model folders
  opd validate runs/demo                        check a finished run folder
  opd COMMAND --help                            the arguments of one command

Models are local Hugging Face folders, or the bundled tiny:teacher, tiny:student, tiny:gsm8k, tiny:arith_self,
tiny:automaton_teacher, tiny:automaton_student;
teacher=self makes the student its own teacher under the teacher prompt.
Add --debug anywhere on the line to see the traceback of an error."""
TRAIN_EPILOG = """Every key is a field of opd.config.TrainConfig (opd/config.py, one comment each); an unknown key
or a bad value stops before any model loads. Common ones: steps, lr, loss (reverse_kl | topk_kl | jsd),
teacher, student, data, task, prompts_per_step, completions_per_prompt, max_new_tokens, out_dir.

examples:
  opd train recipes/demo.yaml steps=50 out_dir=runs/short
  opd train data=my.jsonl teacher=/models/big student=/models/small reward=boxed epochs=2
  opd train recipes/arithmetic_self.yaml                 teacher=self: the student under the privileged prompt"""


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    description: str | None = None  # what `opd COMMAND --help` says first (default: `help`)
    epilog: str | None = None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; appends a default that says something ("(default: 200)")."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=30)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if action.option_strings and default is not None and default is not False and default != argparse.SUPPRESS \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """A usage error is one line, as every other error of `opd` (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


# ---- train, train-offpolicy, demo --------------------------------------------------------------------------------------

def recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", metavar="RECIPE.yaml",
                   help="a YAML recipe (optional: without one, defaults come from opd.config.TrainConfig)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config fields that override the recipe")


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of recipes/demo.yaml, e.g. steps=50")


def run_training(recipe: str | Path | None, overrides: list[str], offpolicy: bool) -> None:
    """The method is chosen here, once: `opd train` runs the on-policy loop, `opd train-offpolicy` the
    off-policy baseline; both read the same recipe schema, so one recipe compares them."""
    from omegaconf import OmegaConf

    from opd.config import load_config
    from opd.metrics import plot_run, read_metrics
    from opd.offpolicy import check_offpolicy_config
    from opd.report import summarize
    from opd.train import train, train_offpolicy

    if recipe and "=" in str(recipe):  # no recipe, only overrides
        recipe, overrides = None, [str(recipe), *overrides]
    start = time.time()
    config = load_config(recipe, overrides)  # fails here, before any model is loaded
    if offpolicy:
        check_offpolicy_config(config)
    print(OmegaConf.to_yaml(OmegaConf.structured(config)), flush=True)
    run_dir = train_offpolicy(config) if offpolicy else train(config)
    print(f"\n{summarize(read_metrics(run_dir))}\n\nrun folder: {run_dir}  (final student: {run_dir / 'final'}, "
          f"curves: {plot_run(run_dir)}), {time.time() - start:.0f}s")


def train_command(args: argparse.Namespace) -> None:
    run_training(args.recipe, args.overrides, offpolicy=False)


def train_offpolicy_command(args: argparse.Namespace) -> None:
    run_training(args.recipe, args.overrides, offpolicy=True)


def demo_command(args: argparse.Namespace) -> None:
    run_training(RECIPES_DIR / "demo.yaml", args.overrides, offpolicy=False)


# ---- validate, plot ----------------------------------------------------------------------------------------------------

def run_dir_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (the out_dir of opd train)")


def validate_arguments(p: argparse.ArgumentParser) -> None:
    run_dir_arguments(p)
    p.add_argument("--steps", type=int, metavar="N", help="expected steps (default: read from the run's config.json)")


def expected_steps(run_dir: str) -> int:
    """The run's `steps`: its config.json, else (derived from epochs inside the run) its latest checkpoint's."""
    from opd import checkpoint

    config = Path(run_dir) / "config.json"
    if not config.is_file():
        raise ValueError(f"{run_dir}: no config.json to read the number of steps from; pass --steps N")
    steps = json.loads(config.read_text())["steps"]
    latest = checkpoint.latest(Path(run_dir)) if steps is None else None  # derived from epochs (#19)
    if latest:
        steps = json.loads((latest / "config.json").read_text())["steps"]
    if steps is None:
        raise ValueError(f"{run_dir}: the run derived its steps from epochs and left no checkpoint; pass --steps N")
    return steps


def validate_command(args: argparse.Namespace) -> None:
    """The run validator on a finished run folder; the expected steps default to its config.json."""
    from opd.validate import validate_run

    steps = args.steps if args.steps is not None else expected_steps(args.run_dir)
    records = validate_run(args.run_dir, steps)
    print(f"OK: {args.run_dir}: steps 0..{steps} logged once each, step-0 eval present, all {len(records)} records "
          f"finite, tokens trained every step, final student saved")


def plot_command(args: argparse.Namespace) -> None:
    from opd.metrics import plot_run

    print(plot_run(args.run_dir))


# ---- init-student ----------------------------------------------------------------------------------------------------

def init_student_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="teacher", required=True, metavar="DIR", help="the teacher's model folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", metavar="I,J,...", help="decoder layer indices to keep, e.g. 0,6,12")
    which.add_argument("--keep", type=int, metavar="K", help="number of decoder layers to keep")
    p.add_argument("--by", default="even", choices=("even", "importance"),
                   help="with --keep: spread evenly, or the layers whose skipping changes the teacher most")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the student (must not hold a model)")


def init_student_command(args: argparse.Namespace) -> None:
    from opd.prune import print_init_student

    print_init_student(args.teacher, args.out, args.layers, args.keep, args.by)


COMMANDS = {
    "train": Command("distil a student from a teacher (a recipe, key=value ...)", recipe_arguments, train_command,
                     epilog=TRAIN_EPILOG),
    "train-offpolicy": Command("the off-policy baseline: cross-entropy on teacher samples", recipe_arguments,
                               train_offpolicy_command, "The off-policy distillation baseline: the teacher samples, the "
                               "student learns its tokens by cross-entropy. It reads the same recipes as opd train, so "
                               "one recipe compares the two.", TRAIN_EPILOG),
    "demo": Command("distil the bundled tiny student from the bundled teacher", demo_arguments, demo_command,
                    "Distil the bundled 0.69M-parameter student from the bundled 3.9M-parameter teacher with "
                    "recipes/demo.yaml (about 6 minutes on 2 CPU cores); the run folder is runs/demo."),
    "eval": Command("the held-out report of a teacher/student pair", cli_eval.eval_arguments, cli_eval.eval_command,
                    "The held-out report of a teacher/student pair: the teacher-trace gap (whole trace, before the "
                    "answer, the answer), both greedy accuracies, the sampled reverse KL and perplexities."),
    "validate": Command("check a finished run folder", validate_arguments, validate_command,
                        "Check a finished run folder: every step logged once, a step-0 evaluation, finite metrics, "
                        "tokens trained every step, final/ saved."),
    "plot": Command("write a run folder's curves to RUN_DIR/curves.png", run_dir_arguments, plot_command),
    "init-student": Command("cut a student from a teacher's decoder layers", init_student_arguments,
                            init_student_command, "A student cut from the teacher by keeping some of its decoder "
                            "layers (depth pruning); it shares the teacher's tokenizer, embeddings and head."),
    "build-tiny": Command("rebuild the bundled tiny tokenizer, teacher and student", bundled.build_tiny_arguments,
                          bundled.build_tiny_command, "Train and save the bundled tokenizer, tiny:teacher and "
                          "tiny:student from a seed (about an hour on 2 CPU cores)."),
    "build-tiny-gsm8k": Command("rebuild tiny:gsm8k, the model of the GSM8K recipe", bundled.build_gsm8k_arguments,
                                bundled.build_gsm8k_command, "Train and save tiny:gsm8k, teacher and student of "
                                "recipes/gsm8k_privileged.yaml, from a seed (about 25 minutes on 2 CPU cores)."),
    "build-tiny-arith-self": Command("rebuild tiny:arith_self, the model of the self-distillation recipe",
                                     bundled.build_arith_self_arguments, bundled.build_arith_self_command,
                                     "Fine-tune tiny:student into tiny:arith_self, teacher (under the privileged "
                                     "prompt) and student of recipes/arithmetic_self.yaml, from a seed."),
    "build-tiny-automaton": Command("rebuild tiny:automaton_teacher and tiny:automaton_student (long-horizon task)",
                                    bundled.build_automaton_arguments, bundled.build_automaton_command,
                                    "Train and save the automaton task's teacher and student from a seed, and "
                                    "measure the student's SFT ceiling on the teacher's traces."),
}


def parser() -> argparse.ArgumentParser:
    top = Parser(prog="opd", description="On-policy distillation of language models: a student samples, a "
                                  "frozen teacher scores\nthose tokens, the student learns from the scores.",
                                  epilog=EPILOG, formatter_class=HelpFormatter)
    top.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=textwrap.fill(command.description or command.help, 100), epilog=command.epilog,
                           formatter_class=HelpFormatter)
        command.arguments(p)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # anywhere on the line, so it can be added to a failing command as it was typed
    args = parser().parse_args([a for a in argv if a != "--debug"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        COMMANDS[args.command].run(args)
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
