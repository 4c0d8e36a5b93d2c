"""`tiny:automaton_teacher` and `tiny:automaton_student`, the bundled pair of the long-horizon task (#23).

Both are small Llamas on the bundled tokenizer, pre-trained from scratch by supervised learning on
`opd.tasks.automaton` (rule 30, 12 cells, 5 steps; 108-token worked solutions), deterministically
from a seed, with `opd.bundled.tiny.pretrain`. The teacher trains until its held-out greedy accuracy
reaches its band (>= 95%, else its last evaluation); the student, the same architecture from another
seed, stops at the first evaluation in its band (10-30%): the gap between them is training, not size. Then the student's SFT ceiling is measured: a copy of it is fine-tuned on the
teacher's own greedy traces of training problems (off-policy distillation run long), and the report
keeps that accuracy curve, the most that imitation of teacher traces buys this student.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from opd.bundled.tiny import TinySpec, make_model, pretrain, sft_batch
from opd.evaluate import greedy_accuracy
from opd.models import TINY_DIR, load_tokenizer
from opd.tasks import load_task

log = logging.getLogger(__name__)

TEACHER_NAME, STUDENT_NAME = "automaton_teacher", "automaton_student"
MAX_NEW_TOKENS = 128  # the solutions are 108 tokens with eos
TEACHER = TinySpec(128, 2, 4, 384, lr=3e-3, max_steps=3000, schedule="cosine", eval_every=250, band=(0.95, 1.0),
                   warmup_steps=50)
STUDENT = TinySpec(128, 2, 4, 384, lr=3e-3, max_steps=3000, schedule="constant", eval_every=50, band=(0.1, 0.3),
                   warmup_steps=50)
BATCH_SIZE = 32
CEILING_STEPS, CEILING_EVAL_EVERY, CEILING_POOL, CEILING_LR = 1000, 100, 2048, 1e-3


def automaton_examples(n: int, split: str, seed: int = 0) -> list:
    return load_task("automaton", split, n, seed)  # `pretrain`'s make_examples(n, split, seed=) signature


def teacher_traces(teacher, tokenizer, examples: list) -> tuple[list, float]:
    """The examples with the teacher's greedy completion as their solution, and the teacher's accuracy on them."""
    accuracy, texts = greedy_accuracy(teacher, tokenizer, examples, max_new_tokens=MAX_NEW_TOKENS)
    return [replace(ex, solution=text) for ex, text in zip(examples, texts, strict=True)], accuracy


def sft_ceiling(student, traces: list, tokenizer, held_out: list, seed: int, steps: int = CEILING_STEPS) -> dict:
    """Fine-tune a copy of `student` on teacher traces (constant lr, fresh batches from the pool); the accuracy curve."""
    model = copy.deepcopy(student)
    optimizer = torch.optim.AdamW(model.parameters(), lr=CEILING_LR, weight_decay=0.01, betas=(0.9, 0.98))
    rng, start = random.Random(seed), time.time()
    history = [{"step": 0, "accuracy": greedy_accuracy(model, tokenizer, held_out, max_new_tokens=MAX_NEW_TOKENS)[0]}]
    for step in range(1, steps + 1):
        model.train()
        loss = model(**sft_batch(tokenizer, rng.sample(traces, BATCH_SIZE))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % CEILING_EVAL_EVERY == 0:
            accuracy, _ = greedy_accuracy(model, tokenizer, held_out, max_new_tokens=MAX_NEW_TOKENS)
            history.append({"step": step, "loss": round(loss.item(), 4), "accuracy": accuracy,
                            "seconds": round(time.time() - start, 1)})
            log.info("SFT ceiling step %d loss %.4f held-out accuracy %.3f", step, loss.item(), accuracy)
    return {"steps": steps, "lr": CEILING_LR, "pool": len(traces), "batch_size": BATCH_SIZE, "history": history,
            "best_accuracy": max(h["accuracy"] for h in history)}


def build_automaton(out_dir: str | Path = TINY_DIR, seed: int = 0, teacher_steps: int | None = None,
                    student_steps: int | None = None, ceiling_steps: int = CEILING_STEPS, n_eval: int = 200) -> dict:
    """Train and save the automaton teacher and student under `out_dir`, measure the SFT ceiling; returns the report."""
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer("tiny:teacher")  # the bundled tokenizer: one token per digit
    held_out = automaton_examples(n_eval, "test", seed=seed)
    report = {"seed": seed, "torch": torch.__version__, "threads": torch.get_num_threads(), "task": "automaton",
              "batch_size": BATCH_SIZE, "max_new_tokens": MAX_NEW_TOKENS, "n_eval": n_eval}
    models = {}
    for name, spec, steps, model_seed in ((TEACHER_NAME, TEACHER, teacher_steps, seed),
                                          (STUDENT_NAME, STUDENT, student_steps, seed + 1)):
        model = make_model(spec, tokenizer, model_seed)
        start = time.time()
        result = pretrain(model, tokenizer, spec, held_out, seed=model_seed, max_steps=steps, batch_size=BATCH_SIZE,
                          make_examples=automaton_examples, max_new_tokens=MAX_NEW_TOKENS)
        model.eval()
        accuracy, _ = greedy_accuracy(model, tokenizer, held_out, max_new_tokens=MAX_NEW_TOKENS)
        report[name] = {"spec": asdict(spec), "parameters": sum(p.numel() for p in model.parameters()),
                        "held_out_accuracy": accuracy, "train_seconds": round(time.time() - start, 1), **result}
        model.save_pretrained(out_dir / name)  # safetensors
        tokenizer.save_pretrained(out_dir / name)
        models[name] = model
        log.info("%s: %d parameters, held-out greedy accuracy %.3f", name, report[name]["parameters"], accuracy)
    traces, trace_accuracy = teacher_traces(models[TEACHER_NAME], tokenizer,
                                            automaton_examples(CEILING_POOL, "train", seed=seed + 2))
    lengths = [len(tokenizer(ex.solution, add_special_tokens=False).input_ids) for ex in traces]
    report["teacher_traces"] = {"n": len(traces), "accuracy": trace_accuracy, "mean_tokens": sum(lengths) / len(lengths)}
    if ceiling_steps:
        report["student_sft_ceiling"] = sft_ceiling(models[STUDENT_NAME], traces, tokenizer, held_out, seed,
                                                    ceiling_steps)
    (out_dir / "automaton_build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
