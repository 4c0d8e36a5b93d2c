"""One opd training step against the sum of its parts measured alone, and how step time grows.

    python bench/bench_step.py [--quick] [--repeats 5] [--threads 1]

Overhead: the real loop (`opd.train.train`, the demo's settings with a fixed completion length so
that every step does the same work) runs a few steps; its `perf/step_s` is compared with the same
step's parts, each timed alone on the same kind of data: generation (`engine.generate`), teacher
scoring (+ collate), student forward + backward over the micro-batches, and the optimizer (clip +
AdamW step). overhead = median step / sum of the parts' medians (target <= 1.10). Both are
measured in one process, alternating a loop run and a round of parts `--repeats` times, so drift
hits both; the first step of a loop run (warm-up) is left out.

Growth: step time over a grid of sequences per step (S) x completion length (N), fixed length,
each point the median of a short loop run, and the least-squares fit
log t = a + b log S + c log N (b, c: how step time scales with each). Wall-clock times, one torch
thread (the 2 cores here are shared). Writes bench/results/bench_step.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "bench_step.json"
BASE = ["teacher=tiny:teacher", "student=tiny:student", "task=arithmetic", "eval_size=8", "temperature=1.0",
        "loss=reverse_kl", "lr=1e-3", "lr_schedule=constant", "grad_clip=1.0", "device=cpu", "eval_every=0",
        "save_every=0", "progress=false", "log_samples=0"]


def config_for(prompts: int, completions: int, tokens: int, steps: int, out_dir: str, loss: str = "reverse_kl"):
    from opd.config import load_config
    return load_config(None, BASE + [f"prompts_per_step={prompts}", f"completions_per_prompt={completions}",
                                     f"max_new_tokens={tokens}", f"min_new_tokens={tokens}", f"steps={steps}",
                                     f"micro_batch_size={prompts * completions}", f"out_dir={out_dir}", f"loss={loss}"])


def loop_step_times(config) -> list[float]:
    """perf/step_s of each step of a real `opd train` run, the warm-up step left out."""
    from opd.metrics import read_metrics
    from opd.train import train
    run_dir = train(config)
    return [r["perf/step_s"] for r in read_metrics(run_dir) if "perf/step_s" in r][1:]


class Parts:
    """The step's parts, set up as `train()` sets them up, each callable alone."""

    def __init__(self, config):
        import torch

        from opd.models import load_pair
        from opd.rollout import make_rollout_engine
        from opd.tasks import load_task
        from opd.teacher import make_teacher_scorer
        from opd.tokenization import render_prompt
        self.config = config
        self.teacher, self.student, self.tokenizer, teacher_tokenizer = load_pair(config)
        self.examples = load_task(config.task, "train", config.train_size, config.seed, config.data_dir)
        self.prompts = [render_prompt(self.tokenizer, ex.prompt) for ex in self.examples]
        self.teacher_prompts = [render_prompt(teacher_tokenizer, ex.teacher_prompt) for ex in self.examples]
        self.engine = make_rollout_engine("hf", self.student, self.tokenizer)
        self.scorer = make_teacher_scorer("hf", self.teacher)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=config.lr, fused=True)
        self.step = 0

    def measure(self) -> dict[str, float]:
        import torch

        from opd.batch import collate
        from opd.objectives import micro_loss
        from opd.sampler import completed, step_prompts
        c = self.config
        self.step += 1
        chosen = step_prompts(len(self.prompts), c.prompts_per_step, c.seed, self.step)
        t0 = time.perf_counter()
        rollouts = self.engine.generate([self.prompts[i] for i in chosen], c.completions_per_prompt, c.sampling,
                                        seed=self.step)
        t1 = time.perf_counter()
        rollouts = completed(rollouts, chosen, self.teacher_prompts, self.examples, self.tokenizer)
        t2 = time.perf_counter()
        batch = collate(rollouts, self.scorer.score(rollouts, c.temperature), self.tokenizer.pad_token_id)
        t3 = time.perf_counter()
        self.student.train()
        for start in range(0, batch.tokens_B_L.shape[0], c.micro_batch_size):
            loss, _ = micro_loss(self.student, batch.select(slice(start, start + c.micro_batch_size)), c,
                                 batch.num_tokens)
            loss.backward()
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), c.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        return {"generate_s": t1 - t0, "score_s": t3 - t2, "forward_backward_s": t4 - t3, "optimizer_s": t5 - t4}


def overhead(repeats: int, steps: int, tmp: str) -> dict:
    config = config_for(32, 4, 40, steps, f"{tmp}/overhead")
    parts, loop = Parts(config), []
    parts.measure()  # warm-up
    rounds = []
    for _ in range(repeats):
        loop += loop_step_times(config)
        rounds += [parts.measure() for _ in range(steps - 1)]
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    step = statistics.median(loop)
    return {"step_s": step, "parts_s": medians, "sum_of_parts_s": sum(medians.values()),
            "overhead_ratio": step / sum(medians.values()), "loop_steps": loop, "part_rounds": rounds}


def growth(sizes: list[int], lengths: list[int], steps: int, tmp: str) -> dict:
    points = []
    for S in sizes:
        for N in lengths:
            times = loop_step_times(config_for(S // 4, 4, N, steps, f"{tmp}/grid_{S}_{N}"))
            points.append({"sequences": S, "tokens": N, "step_s": statistics.median(times)})
            print(f"  S={S:4d} N={N:3d}: {points[-1]['step_s']:.3f} s/step", flush=True)
    # least squares for log t = a + b log S + c log N
    import torch
    X = torch.tensor([[1.0, math.log(p["sequences"]), math.log(p["tokens"])] for p in points], dtype=torch.float64)
    y = torch.tensor([math.log(p["step_s"]) for p in points], dtype=torch.float64)
    a, b, c = torch.linalg.lstsq(X, y[:, None]).solution[:, 0].tolist()
    return {"points": points, "fit": {"a": a, "slope_sequences": b, "slope_tokens": c}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and a smaller grid (smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="loop runs / rounds of parts, alternated")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(args.threads)
    steps = 3 if args.quick else 6
    sizes, lengths = ([32, 64], [20, 40]) if args.quick else ([32, 64, 128], [20, 40, 80])
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        print("overhead: the demo's step (32 prompts x 4, exactly 40 tokens), loop vs parts alone", flush=True)
        over = overhead(1 if args.quick else args.repeats, steps, tmp)
        print("growth grid:", flush=True)
        grow = growth(sizes, lengths, steps, tmp)
    p = over["parts_s"]
    lines = ["| step (loop) s | generate s | teacher score s | student fwd+bwd s | optimizer s | sum of parts s | overhead |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| {over['step_s']:.3f} | {p['generate_s']:.3f} | {p['score_s']:.3f} | {p['forward_backward_s']:.3f} | "
             f"{p['optimizer_s']:.3f} | {over['sum_of_parts_s']:.3f} | **{over['overhead_ratio']:.3f}** |", "",
             "| sequences/step \\ tokens | " + " | ".join(str(n) for n in lengths) + " |",
             "| --- |" + " --- |" * len(lengths)]
    for S in sizes:
        row = [f"{q['step_s']:.3f}" for q in grow["points"] if q["sequences"] == S]
        lines.append(f"| {S} | " + " | ".join(row) + " |")
    fit = grow["fit"]
    lines.append(f"\nfit: step_s ~ S^{fit['slope_sequences']:.2f} * N^{fit['slope_tokens']:.2f} "
                 f"(log-log least squares over {len(grow['points'])} points)")
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"overhead": over, "growth": grow, "table": text, "threads": args.threads,
                                   "loadavg_end": os.getloadavg(), "quick": args.quick}, indent=1))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
