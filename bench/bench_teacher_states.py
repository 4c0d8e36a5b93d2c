"""Is the teacher right on the student's own states? Rule-consistency on the automaton task, before and after an error.

    python bench/bench_teacher_states.py [--student tiny:automaton_student] [--problems 64] [--samples 4]

On-policy distillation trains the student where the student goes, so it needs a teacher that is
right there too, also after the student's first mistake. The automaton task (opd.tasks.automaton)
makes "right" checkable at every cell: a cell's rule-consistent value is rule 30 applied to the
sample's own previous line (line 0: the prompt's row), whatever that line holds. The student
samples `--samples` completions (τ = 1, no truncation, as `opd train` does) of `--problems` held-out
problems; teacher and student score each sample (teacher forcing), and every cell is counted as
"clean" (no rule-breaking cell earlier in the sample) or "after the first error". Per group: the
fraction of cells where the teacher's argmax is the rule-consistent value, its mean probability
of that value, the same for the student, and the fraction of the sample's own cells that follow
the rule, and the sampled reverse KL per cell (log p - log q of the sampled token: what OPD's default
loss pushes on) with each group's share of it, and the share at cells where the teacher's argmax
breaks the rule. Writes bench/results/teacher_states.json. ~1 min on one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cell_positions(tokens: list[str], offset: int) -> list[list[int]]:
    """The sequence positions of each line's cells (the tokens between '[' and ']'), line by line."""
    lines, current, inside = [], [], False
    for j, token in enumerate(tokens):
        if token == "[":
            inside, current = True, []
        elif token == "]":
            inside = False
            lines.append(current)
        elif inside:
            current.append(offset + j)
    return lines


def main() -> None:
    from opd.models import load_model, load_tokenizer
    from opd.tasks import load_task
    from opd.tasks.automaton import CELLS, step
    from opd.tokenization import render_prompt

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="tiny:automaton_student")
    parser.add_argument("--teacher", default="tiny:automaton_teacher")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "teacher_states.json"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.student)
    models = {"teacher": load_model(args.teacher).eval(), "student": load_model(args.student).eval()}
    digit = {0: tokenizer.convert_tokens_to_ids("0"), 1: tokenizer.convert_tokens_to_ids("1")}
    cells = {group: {"teacher_argmax": [], "teacher_p": [], "student_p": [], "sample": [], "kl": []}
             for group in ("clean", "after")}
    for example in load_task("automaton", "test", args.problems, args.seed):
        prompt = render_prompt(tokenizer, example.prompt)
        row = [int(c) for c in example.prompt[-1]["content"].split(": ")[-1]]
        with torch.inference_mode():
            samples = models["student"].generate(torch.tensor([prompt] * args.samples), do_sample=True, temperature=1.0,
                                                 top_k=0, top_p=1.0, max_new_tokens=128,
                                                 pad_token_id=tokenizer.pad_token_id)
        for ids in samples.tolist():
            with torch.inference_mode():
                logprobs = {name: torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), -1)
                            for name, m in models.items()}
            previous, broken = row, False
            for k, positions in enumerate(cell_positions(tokenizer.convert_ids_to_tokens(ids[len(prompt):]), len(prompt))):
                if len(positions) != CELLS:
                    break  # a malformed line: nothing after it is a rule's to judge
                target = previous if k == 0 else step(previous)  # the rule on the sample's own previous line
                for position, value in zip(positions, target, strict=True):
                    want, group = digit[value], cells["after" if broken else "clean"]
                    group["teacher_argmax"].append(float(logprobs["teacher"][position - 1].argmax() == want))
                    group["teacher_p"].append(logprobs["teacher"][position - 1, want].exp().item())
                    group["student_p"].append(logprobs["student"][position - 1, want].exp().item())
                    group["sample"].append(float(ids[position] == want))
                    group["kl"].append((logprobs["student"][position - 1, ids[position]]
                                        - logprobs["teacher"][position - 1, ids[position]]).item())  # OPD's signal
                    broken |= ids[position] != want  # later cells are "after the first error"
                previous = [int(ids[p] == digit[1]) for p in positions]
    total, total_kl = sum(len(g["sample"]) for g in cells.values()), sum(sum(g["kl"]) for g in cells.values())
    wrong = sum(k for g in cells.values() for k, ok in zip(g["kl"], g["teacher_argmax"], strict=True) if not ok)
    result = {"student": args.student, "teacher": args.teacher, "problems": args.problems, "samples": args.samples,
              "groups": {name: {"cells": len(g["sample"]), "share": len(g["sample"]) / total,
                                **{key: statistics.mean(values) for key, values in g.items()},
                                "kl_share": sum(g["kl"]) / total_kl}
                         for name, g in cells.items() if g["sample"]},
              "kl_share_where_teacher_breaks_the_rule": wrong / total_kl}
    print(f"{args.student} samples ({args.problems} problems x {args.samples}), scored by {args.teacher} and itself")
    print(f"{'cells':<22}{'count':>8}{'share':>8}{'teacher argmax ok':>19}{'teacher p(rule)':>17}"
          f"{'student p(rule)':>17}{'sample ok':>11}{'sampled KL/cell':>17}{'KL share':>10}")
    for name, g in result["groups"].items():
        label = "clean prefix" if name == "clean" else "after the first error"
        print(f"{label:<22}{g['cells']:>8}{g['share']:>8.1%}{g['teacher_argmax']:>19.4f}{g['teacher_p']:>17.4f}"
              f"{g['student_p']:>17.4f}{g['sample']:>11.4f}{g['kl']:>17.4f}{g['kl_share']:>10.1%}")
    print(f"share of the cells' sampled reverse KL (log p - log q of the sampled cell, OPD's signal) at cells where "
          f"the teacher's argmax breaks the rule: {result['kl_share_where_teacher_breaks_the_rule']:.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
