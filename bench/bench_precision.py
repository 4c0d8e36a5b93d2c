"""The on-policy ratio at step 0 and the weight updates kept, per compute precision (issue #18 item 1).

For each precision the student samples P prompts × G completions, then the trainer recomputes
log π_θ of every sampled token exactly as `train_step` does (the fused path, and the plain
full-logits path); at step 0 both must equal the sampler's p, so |log π_θ - p| measures the
train/sample mismatch. Rows: fp32; bf16 compute with fp32 weights (this library); and bf16
weights computing in bf16 (what `dtype=bfloat16` did before, for contrast). Then one AdamW
step at lr 1e-6 on one fixed batch: the fraction of the student's elements that moved.

    PYTHONPATH=. python bench/bench_precision.py [--student tiny:student] [--teacher tiny:teacher] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from opd.batch import collate
from opd.config import TrainConfig
from opd.forward import masked_token_logprobs
from opd.kernels import token_logprobs
from opd.models import load_pair
from opd.precision import set_compute_dtype
from opd.rollout.hf import HFRolloutEngine
from opd.tasks import load_task
from opd.teacher.hf import score_tokens
from opd.tokenization import pad_id, render_prompt
from opd.train import make_optimizer, train_step


def measure(student, teacher, tokenizer, prompts, config) -> dict:
    engine = HFRolloutEngine(student, tokenizer)
    rollouts = engine.generate(prompts, config.completions_per_prompt, config.sampling, seed=1)
    for r in rollouts:
        r.teacher_prompt_ids = r.prompt_ids
    scores = score_tokens(teacher, [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], 1.0,
                          vocab_size=len(tokenizer))
    batch = collate(rollouts, scores, pad_id(tokenizer))
    device = next(student.parameters()).device
    micro = batch.to(device)
    mask_B_T = micro.loss_mask_B_T != 0
    with torch.no_grad():
        fused_B_T = masked_token_logprobs(student, micro.tokens_B_L, micro.attention_mask_B_L, micro.loss_mask_B_T,
                                          vocab_size=len(tokenizer))
        logits = student(input_ids=micro.tokens_B_L, attention_mask=micro.attention_mask_B_L).logits
        plain_B_T = token_logprobs(logits[:, :-1, : len(tokenizer)], micro.tokens_B_L[:, 1:])
    out = {}
    for name, lp_B_T in (("fused", fused_B_T), ("plain", plain_B_T)):
        d_N = (lp_B_T.float() - micro.sampler_logprobs_B_T)[mask_B_T].abs()
        out[f"{name}_mean_abs_log_ratio"] = d_N.mean().item()
        out[f"{name}_max_abs_log_ratio"] = d_N.max().item()
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    optimizer, _ = make_optimizer(student, config) if next(student.parameters()).dtype == torch.float32 else (
        torch.optim.AdamW(student.parameters(), lr=config.lr), None)
    train_step(student, optimizer, batch, config, batch.num_tokens, vocab_size=len(tokenizer))
    moved = sum(int((p.detach() != before[k]).sum()) for k, p in student.named_parameters())
    out["elements_moved_by_one_step_at_lr_1e-6"] = moved / sum(p.numel() for p in before.values())
    out["tokens"] = int(mask_B_T.sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", default="tiny:student")
    parser.add_argument("--teacher", default="tiny:teacher")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--out", default="bench/results/precision.json")
    args = parser.parse_args()
    rows = {}
    for label, dtype, weights in (("fp32", "float32", "float32"), ("bf16 compute, fp32 weights", "bfloat16", "float32"),
                                  ("bf16 weights (before #18)", "bfloat16", "bfloat16")):
        config = TrainConfig(student=args.student, teacher=args.teacher, dtype=dtype, device=args.device, lr=1e-6,
                             grad_clip=0.0, completions_per_prompt=4, max_new_tokens=32, micro_batch_size=64)
        teacher, student, tokenizer, _ = load_pair(config)
        if weights == "bfloat16":
            set_compute_dtype(student.to(torch.bfloat16), "bfloat16")
        examples = load_task("arithmetic", "train", args.prompts, 0)
        prompts = [render_prompt(tokenizer, ex.prompt) for ex in examples]
        t0 = time.perf_counter()
        rows[label] = measure(student, teacher, tokenizer, prompts, config) | {"seconds": time.perf_counter() - t0}
    print(f"{'precision':<30}{'mean|log r| fused':>18}{'max|log r| fused':>18}{'mean|log r| plain':>18}"
          f"{'max|log r| plain':>18}{'moved @1e-6':>13}")
    for label, r in rows.items():
        print(f"{label:<30}{r['fused_mean_abs_log_ratio']:>18.2e}{r['fused_max_abs_log_ratio']:>18.2e}"
              f"{r['plain_mean_abs_log_ratio']:>18.2e}{r['plain_max_abs_log_ratio']:>18.2e}"
              f"{r['elements_moved_by_one_step_at_lr_1e-6']:>13.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"student": args.student, "teacher": args.teacher, "device": args.device,
                                          "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
