"""The bf16 training runs of scripts/gpu-check.sh: a Qwen3-0.6B-shaped student against a Qwen3-1.7B-shaped teacher.

Both are random-initialised from configs written here (no model hub, no internet) and saved as ordinary
`from_pretrained` folders in bf16, as Qwen3 checkpoints come. The tokenizer is the bundled one, grown to
Qwen3's 151,669 tokens with placeholder tokens, so every softmax spans Qwen's vocabulary, and the
embedding has Qwen's 151,936 rows (a padded vocabulary). One `opd.train.train` run per path CI cannot
check on a GPU (`RUNS`: the default sampled-token loss, the fused JSD kernel, a LoRA adapter), each at
dtype=bfloat16 (fp32 student weights, a bf16 teacher), 32 prompts × 4 completions × 256 tokens
(min_new_tokens fixes the length: a random student never stops); prints one JSON line per run with
tokens/s, the step's phases, the step-1 importance ratio and peak GPU memory; a run that raises is
reported with its error and the others still run. `--profile-decode` (which gpu-check.sh passes) first
profiles the student's decode loop: wall time against GPU-busy time and kernels launched per token.
Needs only torch and transformers. `--cpu-smoke` runs the same code at tiny sizes on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from opd.config import TrainConfig
from opd.metrics import read_metrics
from opd.models import load_tokenizer
from opd.train import train

QWEN3 = {  # shapes of Qwen3-0.6B and Qwen3-1.7B (their config.json), tied embeddings
    "student": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128),
    "teacher": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128),
}
SMOKE = {
    "student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16),
    "teacher": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=24),
}


def grown_tokenizer(size: int):
    """The bundled tokenizer with placeholder tokens up to `size` (its own ids, template and specials unchanged)."""
    tokenizer = load_tokenizer("tiny:student")
    tokenizer.add_tokens([f"<|q{i}|>" for i in range(size - len(tokenizer))])
    return tokenizer


def build(folder: Path, shape: dict, rows: int, tokenizer, device: str, seed: int) -> tuple[Path, int]:
    """A random model saved to `folder`, and its matmul weights per token (every Linear, the tied head too)."""
    config = Qwen3Config(vocab_size=rows, tie_word_embeddings=True, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    del model
    return folder, weights


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks this script)")
    parser.add_argument("--steps", type=int, default=2, help="steps of each run (step 1's rollouts come from the "
                        "preflight check, so step 2 is the first whole step)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--json", help="also write the reports to this file")
    parser.add_argument("--profile-decode", action="store_true",
                        help="then profile the student's bf16 decode loop: wall vs device time per token, launches")
    args = parser.parse_args()
    smoke, names = args.cpu_smoke, args.runs.split(",")
    if unknown := [n for n in names if n not in RUNS]:
        parser.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); use --cpu-smoke", file=sys.stderr)
        return 3
    device = "cpu" if smoke else "cuda"
    shapes, tokens, rows = (SMOKE, 4096, 4224) if smoke else (QWEN3, 151_669, 151_936)
    P, G, N = (4, 2, 16) if smoke else (32, 4, 256)
    t0 = time.perf_counter()
    reports, ok = [], True
    with tempfile.TemporaryDirectory(prefix="opd-gpu-check-") as tmp:
        tokenizer = grown_tokenizer(tokens)
        student, student_w = build(Path(tmp) / "student", shapes["student"], rows, tokenizer, device, seed=0)
        teacher, teacher_w = build(Path(tmp) / "teacher", shapes["teacher"], rows, tokenizer, device, seed=1)
        built = time.perf_counter() - t0
        print(f"gpu_check: built both models in {built:.1f} s", flush=True)
        if args.profile_decode:  # first: short, and it says where a decode token goes
            try:
                report = profile_decode(student, tokenizer, device, rows=P * G, tokens=min(N, 32))
            except Exception as error:  # a finding, reported like a failing run
                report, ok = failed("profile_decode", error), False
            print(json.dumps(report), flush=True)
            reports.append(report)
        for name in names:
            base = dict(student=str(student), teacher=str(teacher), dtype="bfloat16", teacher_dtype="bfloat16",
                        device=device, steps=args.steps, prompts_per_step=P, completions_per_prompt=G,
                        max_new_tokens=N, min_new_tokens=N, micro_batch_size=16, lr=1e-6, train_size=P,
                        eval_size=2, eval_every=0, save_every=0, log_samples=0, progress=False,
                        out_dir=str(Path(tmp) / f"run-{name}"))
            report, passed = run_one(name, base | RUNS[name], smoke, (P * G * N, student_w, teacher_w))
            report["build_s"] = round(built, 1)
            print(json.dumps(report), flush=True)
            reports.append(report)
            ok = ok and passed
            if args.json:  # after each run, so that a run cut off by the timeout leaves the others' numbers
                Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")
    return 0 if ok else 1


# One run per path that CI cannot check on a GPU: the default loss, the fused JSD kernel, a LoRA adapter.
RUNS = {
    "reverse_kl": {},
    "jsd": dict(loss="jsd", jsd_beta=1.0),
    "lora": dict(lora_rank=16, lr=1e-4),
}


def achieved(records: list[dict], tokens: int, student_w: int, teacher_w: int) -> dict:
    """Median TFLOP/s per phase from matmul FLOPs alone (2 per weight per token forward, 6 forward+backward;
    completion tokens only, no prompt, no attention scores: lower bounds). An H200's bf16 peak is ~790.
    Step 1 is left out where there are more: its rollouts were drawn by the preflight check before the
    loop (generate_s ~ 0), and it holds the warm-up."""
    records = records[1:] or records
    flops = {"generate": 2 * student_w * tokens, "score": 2 * teacher_w * tokens, "train": 6 * student_w * tokens}
    seconds = {phase: statistics.median(r[f"perf/{phase}_s"] for r in records) for phase in flops} if records else {}
    return {f"{phase}_TFLOPs": round(flops[phase] / t / 1e12, 1) for phase, t in seconds.items() if t > 1e-3}


def profile_decode(student: Path, tokenizer, device: str, rows: int, tokens: int) -> dict:
    """The HF engine's decode loop (bf16 autocast, as in training) under torch.profiler, after a warm-up:
    wall time per token against the GPU's busy time per token and the kernels launched per token. Busy
    time far below wall time means the loop waits on Python and launches, not on the GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from opd.models import load_model
    from opd.rollout import Sampling
    from opd.rollout.hf import HFRolloutEngine
    from opd.tokenization import render_prompt

    model = load_model(str(student), dtype="float32", device=device, compute_dtype="bfloat16", name="student")
    engine = HFRolloutEngine(model, tokenizer, batch_size=rows)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": f"Count to {i}."}]) for i in range(rows)]
    sampling = Sampling(max_new_tokens=tokens, min_new_tokens=tokens)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    engine.generate(prompts, 1, sampling, seed=0)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        engine.generate(prompts, 1, sampling, seed=1)
        sync()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    on_gpu = [e for e in events if e.device_type == DeviceType.CUDA]  # kernels and copies, not the CPU ops
    device_us = sum(e.self_device_time_total for e in on_gpu)
    kernels = sum(e.count for e in on_gpu)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    del model, engine
    return {"run": "profile_decode", "rows": rows, "tokens": tokens, "wall_ms_per_token": round(wall / tokens * 1e3, 2),
            "gpu_busy_ms_per_token": round(device_us / tokens / 1e3, 2) if device == "cuda" else None,
            "kernels_per_token": round(kernels / tokens) if device == "cuda" else None,
            "top_self_cpu_ms": {e.key: round(e.self_cpu_time_total / 1e3, 1) for e in top}}


def failed(name: str, error: Exception) -> dict:
    """The report of a part that raised: its name and the error's first line."""
    first = (str(error).splitlines() or [""])[0]  # an error may have no message
    return {"run": name, "error": f"{type(error).__name__}: {first[:300]}"}


def run_one(name: str, fields: dict, smoke: bool, sizes: tuple[int, int, int]) -> tuple[dict, bool]:
    """One `opd.train.train` run; its per-step phases, tokens/s and peak GPU memory (never raises)."""
    if not smoke:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    try:
        run_dir = train(TrainConfig(**fields).validate())
    except Exception as error:  # a failing path is a finding of the check, not the end of it
        return failed(name, error), False
    trained, steps = time.perf_counter() - t1, fields["steps"]
    records = [r for r in read_metrics(run_dir) if r["step"] > 0]
    final_ok = (run_dir / "final" / "config.json").is_file()
    report = {
        "run": name, "device": torch.cuda.get_device_name() if not smoke else "cpu (smoke)",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "shape": "smoke" if smoke else "qwen3 0.6B/1.7B",
        "prompts x completions x tokens": f"{fields['prompts_per_step']} x {fields['completions_per_prompt']} x "
                                          f"{fields['max_new_tokens']}", "steps": steps,
        "tokens_per_s_each_step": [round(r["perf/tokens_per_s"]) for r in records],
        "generate_s": [round(r["perf/generate_s"], 3) for r in records],
        "score_s": [round(r["perf/score_s"], 3) for r in records],
        "train_s": [round(r["perf/train_s"], 3) for r in records],
        "loss_each_step": [round(r["train/loss"], 4) for r in records if "train/loss" in r],
        "is_ratio_step_1": records[0].get("opd/is_ratio") if records else None,
        "peak_gpu_memory_GiB": None if smoke else round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "train_total_s": round(trained, 1), "final_saved": final_ok,
    } | achieved(records, *sizes)
    finite = all(all(v == v for v in r.values() if isinstance(v, float)) for r in records)
    return report, final_ok and finite and len(records) == steps


if __name__ == "__main__":
    sys.exit(main())
