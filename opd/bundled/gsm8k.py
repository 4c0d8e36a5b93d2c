"""The tiny GSM8K model of the privileged recipe: one model that is both teacher and student.

Pre-trained by supervised learning, deterministically from a seed, in two phases: first
strings of random words to repeat (so that the model learns to copy at all), then GSM8K
train solutions with a mix of the two prompt formats of `opd.tasks.gsm8k`: the plain one
(question -> solution) and the privileged one (question + worked solution -> solution).
Under the privileged prompt the model copies the solution it is shown, so it is a far
better teacher of that trace than it is a student under the plain prompt; that difference
is the teacher-trace gap the recipe distils away (recipes/gsm8k_privileged.yaml).
It reuses the bundled tokenizer (trained on GSM8K text too, digits as single tokens) and
the architecture helpers of `opd.bundled.tiny`; the weights are stored in bf16 to keep the
package small and are loaded as float32.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from opd.evaluate import Evaluator
from opd.models import TINY_DIR, load_tokenizer
from opd.tasks import Example, gsm8k_examples
from opd.tasks.gsm8k import PRIVILEGED_HEADER
from opd.bundled.tiny import make_model, sft_batch
from opd.tokenization import encode_completion, render_prompt

log = logging.getLogger(__name__)

GSM8K_DIR = TINY_DIR / "gsm8k"


@dataclass(frozen=True)
class GSM8KSpec:
    """Architecture (read by `opd.bundled.tiny.make_model`) and pre-training budget."""

    # 4 x 128: on the copy strings a 4 x 256 model was still at 3.5 nats after 300 steps of
    # 32 (lr 3e-3), while 4 x 128 passed its abrupt drop by step 300 in 2.5x less time per step.
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    lr: float = 3e-3  # peak; linear warm-up, then cosine decay to 10% at max_steps
    warmup_steps: int = 50
    max_steps: int = 1600  # all steps, the copy phase included
    copy_steps: int = 400  # first steps: shuffled-word strings to repeat (copy_examples)
    copy_batch_size: int = 32
    copy_words: int = 12  # words per string to repeat
    batch_size: int = 16  # GSM8K rows per step after the copy phase
    privileged_fraction: float = 0.6  # share of GSM8K rows shown with the privileged prompt
    max_tokens: int = 400  # drop rows whose privileged prompt + solution is longer (keeps steps short)
    train_rows: int | None = None  # the first N train rows (None: all 7,473; tests use a few)
    eval_every: int = 100
    n_eval: int = 32  # held-out test rows for the completion NLL of both formats


SPEC = GSM8KSpec()
RECIPE_ROWS = 8  # the recipe's training rows: the first 8 of the train split


def length(tokenizer, ex: Example) -> int:
    """Tokens of the privileged prompt + solution + eos: the longer of a row's two formats."""
    return len(render_prompt(tokenizer, ex.teacher_prompt)) + len(encode_completion(tokenizer, ex.solution))


def batches(rows: list[Example], lengths: list[int], spec: GSM8KSpec, rng: random.Random):
    """Endless length-bucketed batches: shuffle, sort chunks of 32 batches by length, shuffle the batches.

    Each row appears once per epoch, in the plain or privileged format drawn afresh; sorting
    within chunks keeps padding (pure waste on a CPU) small without a fixed order.
    """
    while True:
        order = rng.sample(range(len(rows)), len(rows))
        chunk = 32 * spec.batch_size
        epoch = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lengths.__getitem__)
            epoch += [part[i : i + spec.batch_size] for i in range(0, len(part), spec.batch_size)]
        rng.shuffle(epoch)
        for indices in epoch:
            yield [replace(rows[i], prompt=rows[i].teacher_prompt) if rng.random() < spec.privileged_fraction
                   else rows[i] for i in indices]


def copy_examples(words: list[str], spec: GSM8KSpec, rng: random.Random) -> list[Example]:
    """Strings of random GSM8K words under the privileged header, to be repeated as the completion.

    Nothing but copying predicts a word drawn at random, so these make the model learn to
    copy (induction heads, Olsson et al. 2022) within a few hundred steps; on GSM8K rows
    alone a 4 x 256 model showed almost none after 1,200 steps (the privileged prompt
    lowered its completion NLL by only 0.2 nats of 2.6, and it did not copy the answer).
    """
    texts = [" ".join(rng.choices(words, k=spec.copy_words)) for _ in range(spec.copy_batch_size)]
    prompts = [[{"role": "user", "content": f"{PRIVILEGED_HEADER}\n{text}"}] for text in texts]
    return [Example(prompt=p, teacher_prompt=p, answer="", solution=text) for p, text in zip(prompts, texts, strict=True)]


@torch.no_grad()
def completion_nll(model, tokenizer, examples: list[Example]) -> float:
    """Token-weighted completion NLL (eos included) under each example's `prompt`."""
    model.eval()
    batch = sft_batch(tokenizer, examples)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100).item()


def pretrain(model, tokenizer, spec: GSM8KSpec, seed: int, data_dir: str | None = None) -> list[dict]:
    """SFT: `spec.copy_steps` of copy strings, then GSM8K train rows in both formats.

    Returns the loss curve with the held-out completion NLL of both formats (their
    difference is how much the model gains from the solution in its prompt).
    """
    rows = gsm8k_examples("train", n=spec.train_rows, data_dir=data_dir, privileged=True)
    lengths = [length(tokenizer, ex) for ex in rows]
    kept = [i for i, n in enumerate(lengths) if n <= spec.max_tokens]
    rows, lengths = [rows[i] for i in kept], [lengths[i] for i in kept]
    words = [word for ex in rows for word in ex.solution.split()]
    held_out = gsm8k_examples("test", n=spec.n_eval, data_dir=data_dir, privileged=True)
    held_out_privileged = [replace(ex, prompt=ex.teacher_prompt) for ex in held_out]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    stream, copy_rng = batches(rows, lengths, spec, random.Random(seed)), random.Random(seed + 1)
    history, losses, start = [], [], time.time()
    log.info("pre-training on %d of the train rows (<= %d tokens)", len(rows), spec.max_tokens)
    for step in range(1, spec.max_steps + 1):
        factor = min(1.0, step / spec.warmup_steps) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / spec.max_steps)))
        for group in optimizer.param_groups:
            group["lr"] = spec.lr * factor
        model.train()
        examples = copy_examples(words, spec, copy_rng) if step <= spec.copy_steps else next(stream)
        loss = model(**sft_batch(tokenizer, examples)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % spec.eval_every and step != spec.max_steps:
            continue
        record = {"step": step, "train_loss": sum(losses) / len(losses),
                  "held_out_nll_plain": completion_nll(model, tokenizer, held_out),
                  "held_out_nll_privileged": completion_nll(model, tokenizer, held_out_privileged),
                  "seconds": round(time.time() - start, 1)}
        history.append(record)
        losses = []
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in record.items() if k != "step"))
    return history


def build_tiny_gsm8k(out_dir: str | Path = GSM8K_DIR, seed: int = 0, spec: GSM8KSpec = SPEC,
                     data_dir: str | None = None, max_new_tokens: int = 192) -> dict:
    """Pre-train, save (bf16 safetensors + the bundled tokenizer) and report on the recipe's rows."""
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer("tiny:teacher")
    model = make_model(spec, tokenizer, seed)
    start = time.time()
    history = pretrain(model, tokenizer, spec, seed, data_dir)
    train_seconds = time.time() - start
    model.to(torch.bfloat16).save_pretrained(out_dir)  # safetensors, half the bytes of fp32
    tokenizer.save_pretrained(out_dir)
    model.float().eval()  # the bf16-rounded weights, exactly as `load_model` will see them
    rows = gsm8k_examples("train", n=RECIPE_ROWS, data_dir=data_dir, privileged=True)
    evaluate = Evaluator(model, tokenizer, tokenizer, rows, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    step0 = {k: v for k, v in evaluate(model).items() if k != "eval/samples"}
    report = {
        "seed": seed, "spec": asdict(spec), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()), "train_seconds": round(train_seconds, 1),
        "history": history,
        "recipe_rows": {"n": len(rows), "max_new_tokens": max_new_tokens,
                        "teacher_nll_on_own_greedy_trace": step0["eval/trace_teacher_nll"],
                        "teacher_accuracy": step0["eval/teacher_accuracy"],
                        "student_accuracy": step0["eval/student_accuracy"],
                        "step0_eval": step0},
    }
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
