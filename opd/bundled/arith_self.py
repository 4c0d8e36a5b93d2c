"""`tiny:arith_self`, the privileged arithmetic recipe's one model: its own teacher (#24).

The bundled student (`tiny:student`, ~20% held-out greedy accuracy) fine-tuned, deterministically
from a seed, on fresh arithmetic problems shown in either of the two prompt formats of
`opd.tasks.arithmetic` (`privileged=True`): the plain one (the problem alone) and the privileged one
(the problem and its worked solution, GSM8K's format). It stops at the first evaluation where it
copies the shown solution (privileged accuracy >= `privileged_at_least`) while it still cannot solve
the problem alone (plain accuracy <= `plain_at_most`): a strong teacher and a weak student in one set
of weights, so `teacher=self` has a gap to distil that only the skill can close on held-out rows.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from opd.bundled.tiny import sft_batch
from opd.evaluate import greedy_accuracy
from opd.models import TINY_DIR, load_model, load_tokenizer
from opd.tasks import arithmetic_examples

log = logging.getLogger(__name__)

ARITH_SELF_DIR = TINY_DIR / "arith_self"


@dataclass(frozen=True)
class ArithSelfSpec:
    lr: float = 1e-3  # constant after warm-up
    warmup_steps: int = 20
    max_steps: int = 1500
    batch_size: int = 64
    privileged_fraction: float = 0.5  # share of rows shown with the worked solution in the prompt
    eval_every: int = 50
    n_eval: int = 200  # held-out test problems, both formats
    privileged_at_least: float = 0.9
    plain_at_most: float = 0.5


SPEC = ArithSelfSpec()


def accuracies(model, tokenizer, held_out) -> dict[str, float]:
    plain, _ = greedy_accuracy(model, tokenizer, held_out, max_new_tokens=32)
    privileged, _ = greedy_accuracy(model, tokenizer, held_out, max_new_tokens=32, teacher_prompt=True)
    return {"plain_accuracy": plain, "privileged_accuracy": privileged}


def build_arith_self(out_dir: str | Path = ARITH_SELF_DIR, seed: int = 0, spec: ArithSelfSpec = SPEC) -> dict:
    """Fine-tune `tiny:student` on both formats until the stopping rule holds; save and report."""
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    tokenizer, model = load_tokenizer("tiny:student"), load_model("tiny:student")
    held_out = arithmetic_examples(spec.n_eval, "test", seed=seed, privileged=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng, start = random.Random(seed), time.time()
    history = [{"step": 0, **accuracies(model, tokenizer, held_out)}]
    for step in range(1, spec.max_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = spec.lr * min(1.0, step / spec.warmup_steps)
        rows = arithmetic_examples(spec.batch_size, "train", seed=rng.randrange(1 << 30), privileged=True)
        rows = [replace(ex, prompt=ex.teacher_prompt) if rng.random() < spec.privileged_fraction else ex for ex in rows]
        model.train()
        loss = model(**sft_batch(tokenizer, rows)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % spec.eval_every:
            continue
        record = {"step": step, "loss": loss.item(), **accuracies(model, tokenizer, held_out),
                  "seconds": round(time.time() - start, 1)}
        history.append(record)
        log.info("step %d: %s", step, record)
        if record["privileged_accuracy"] >= spec.privileged_at_least and record["plain_accuracy"] <= spec.plain_at_most:
            break
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report = {"seed": seed, "spec": asdict(spec), "torch": torch.__version__, "from": "tiny:student",
              "parameters": sum(p.numel() for p in model.parameters()), "train_seconds": round(time.time() - start, 1),
              "history": history, "final": history[-1]}
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
