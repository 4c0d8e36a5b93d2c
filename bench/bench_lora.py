"""A LoRA student against full fine-tuning at scale (b) of bench/bench_vs_trl.py: trainable parameters, peak RSS, step time.

    python bench/bench_lora.py [--quick] [--repeats 2] [--ranks 16] [--losses reverse_kl,jsd] [--threads 1]

The same pair as bench_vs_trl's scale (b) (a 23M-parameter student, a 42M teacher, 32,000-token
vocabulary, random weights; built there), the same work: 4 prompts x 4 completions of exactly 64
tokens per step, micro-batches of 4, AdamW at lr 1e-4, fp32 on CPU, 4 measured steps after a
warm-up step. Only `lora_rank` differs (0 = full fine-tuning; the adapter on every linear layer of
the decoder, lm_head and embeddings frozen). Every run is a fresh subprocess (peak RSS from
getrusage is one run's), runs alternate within each repetition, and the table shows medians over
repetitions of per-run medians over steps. Writes bench/results/bench_lora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_vs_trl import SCALES, build_scale_b, summarize_run  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def worker(spec: dict) -> None:
    import torch

    from opd.config import load_config
    from opd.lora import apply_lora
    from opd.metrics import read_metrics
    from opd.models import load_model
    from opd.train import train

    torch.set_num_threads(spec["threads"])
    s = spec["scale"]
    overrides = [f"teacher={s['teacher']}", f"student={s['student']}", "task=arithmetic", "train_size=4096",
                 "eval_size=8", f"prompts_per_step={s['P']}", f"completions_per_prompt={s['G']}",
                 f"max_new_tokens={s['N']}", f"min_new_tokens={s['N']}", f"loss={spec['loss']}", "jsd_beta=1.0",
                 f"steps={s['steps']}", f"lr={s['lr']}", f"micro_batch_size={s['micro']}", "device=cpu", "seed=0",
                 f"out_dir={spec['out_dir']}", "eval_every=0", "save_every=0", "progress=false", "log_samples=0",
                 f"lora_rank={spec['rank']}"]
    start = time.perf_counter()
    run_dir = train(load_config(None, overrides))
    wall = time.perf_counter() - start
    records = [{"step_s": r["perf/step_s"], "generate_s": r["perf/generate_s"], "score_s": r["perf/score_s"],
                "train_s": r["perf/train_s"], "tokens": round(r["perf/tokens_per_s"] * r["perf/step_s"])}
               for r in read_metrics(run_dir) if "perf/step_s" in r]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    student = apply_lora(load_model(s["student"]), spec["rank"], 32.0)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    total = sum(p.numel() for p in student.parameters() if not p.requires_grad or spec["rank"] == 0)
    Path(spec["result"]).write_text(json.dumps({"steps": records, "peak_rss_mib": peak, "wall_s": wall,
                                                "trainable": trainable, "base_parameters": total}))


def run_subprocess(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1",
           "MKL_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker rank={spec['rank']} loss={spec['loss']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(spec["result"]).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 measured steps of 32 tokens (a smoke test)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ranks", default="16", help="comma-separated LoRA ranks to compare with full fine-tuning")
    parser.add_argument("--losses", default="reverse_kl,jsd", help="comma-separated opd losses")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (the cores here are shared)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    scale = SCALES["b"] | ({"steps": 2, "N": 32} if args.quick else {})
    scale["steps"] += 1  # + the warm-up step left out of the medians
    build_scale_b()
    ranks, losses = [0, *map(int, args.ranks.split(","))], args.losses.split(",")
    raw = {(loss, rank): [] for loss in losses for rank in ranks}
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        for rep in range(args.repeats):
            for loss in losses:
                order = ranks[rep % len(ranks):] + ranks[: rep % len(ranks)]
                for rank in order:
                    out = Path(tmp) / f"{loss}_{rank}_{rep}"
                    run = run_subprocess({"scale": scale, "loss": loss, "rank": rank, "threads": args.threads,
                                          "out_dir": str(out), "result": str(out) + ".json"})
                    raw[(loss, rank)].append(run)
                    s = summarize_run(run)
                    print(f"rep {rep} {loss:10s} rank {rank:3d}: step {s['step_s']:.2f}s train {s['train_s']:.2f}s "
                          f"RSS {s['peak_rss_mib']:.0f} MiB, {run['trainable']:,} trainable", flush=True)
    lines = [f"scale b: 42M teacher -> 23M student, 32k vocab, {scale['P']}x{scale['G']} sequences of exactly "
             f"{scale['N']} tokens, micro-batches of {scale['micro']}, {scale['steps'] - 1} measured steps, medians "
             f"of {args.repeats} runs, {args.threads} thread(s) on a shared {os.cpu_count()}-core CPU",
             "| loss | student | trainable params | step s | train s | generate s | peak RSS MiB | vs full |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    results = {}
    for loss in losses:
        full = None
        for rank in ranks:
            runs = [summarize_run(r) for r in raw[(loss, rank)]]
            m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            m["trainable"] = raw[(loss, rank)][0]["trainable"]
            full = full or m
            results[f"{loss}/rank{rank}"] = {"median": m, "runs": runs}
            lines.append(f"| {loss} | {'full' if rank == 0 else f'LoRA r={rank}'} | {m['trainable']:,} | "
                         f"{m['step_s']:.2f} | {m['train_s']:.2f} | {m['generate_s']:.2f} | {m['peak_rss_mib']:.0f} | "
                         f"train {m['train_s'] / full['train_s']:.2f}x, RSS {m['peak_rss_mib'] / full['peak_rss_mib']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    import peft
    import torch
    import transformers
    meta = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                         "python": platform.python_version()}, "cpus": os.cpu_count(), "threads": args.threads,
            "loadavg_end": os.getloadavg(), "quick": args.quick, "repeats": args.repeats, "scale": scale}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_lora.json"
    out.write_text(json.dumps({"meta": meta, "results": results, "table": text}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
