"""One opd training step against the sum of its parts measured alone, and how step time grows.

    python bench/bench_step.py [--quick] [--repeats 5] [--threads 1] [--dtypes float32,bfloat16] [--scale a|b]

Overhead: the real loop (`opd.train.train`, the demo's settings with a fixed completion length so
that every step does the same work) runs a few steps; its `perf/step_s` is compared with the same
step's parts, each timed alone on the same kind of data: generation (`engine.generate`), teacher
scoring (+ collate), student forward + backward over the micro-batches, and the optimizer (clip +
AdamW step). overhead = median step / sum of the parts' medians (target <= 1.10). Both are
measured in one process, alternating a loop run and a round of parts `--repeats` times, so drift
hits both; the first step of a loop run (warm-up) is left out.

Against the hardware: per part, the FLOPs it does (from parameter and token counts, below), its
time, and the achieved FLOP/s as a fraction of this machine's matmul peak in the run's compute dtype,
measured in this script (square matmuls, n = 1024 and 2048, the same thread count; the better of
the two). FLOPs: a forward is 2 FLOPs per matmul weight per token it runs on; a backward twice
that. Generation runs the backbone over each prompt once (prefill) and each generated token, the
head at one row per step; teacher scoring runs each distinct prompt once (the shared-prompt
forward) and every completion token, the head at the completion rows; the student's forward +
backward the same at 6 FLOPs per weight per token; AdamW ~12 FLOPs per parameter. Attention's own
score FLOPs (QK^T, AV) and elementwise work are not counted, so the fractions are lower bounds. Each
`--dtypes` entry is its own row: `dtype=bfloat16` is opd's mixed precision (fp32 weights, bf16
backbones, fp32 heads, docs/design.md §7). `--scale b` measures the step of bench_vs_trl.py's scale
(b) (23M student, 42M teacher, 32k vocabulary, 4 x 4 sequences, 64 tokens) instead of the demo's.

Growth (scale a, float32 only): step time over a grid of sequences per step (S) x completion length (N), fixed length,
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


SCALE_B = ["prompts_per_step=4", "completions_per_prompt=4", "max_new_tokens=64", "min_new_tokens=64",
           "micro_batch_size=4", "lr=1e-4"]


def config_for(prompts: int, completions: int, tokens: int, steps: int, out_dir: str, loss: str = "reverse_kl",
               dtype: str = "float32", scale: str = "a"):
    from opd.config import load_config
    overrides = BASE + [f"prompts_per_step={prompts}", f"completions_per_prompt={completions}",
                        f"max_new_tokens={tokens}", f"min_new_tokens={tokens}", f"steps={steps}",
                        f"micro_batch_size={prompts * completions}", f"out_dir={out_dir}", f"loss={loss}",
                        f"dtype={dtype}", "train_size=4096"]
    if scale == "b":
        from bench.bench_vs_trl import SCALE_B_DIR, build_scale_b
        build_scale_b()
        overrides += [f"teacher={SCALE_B_DIR / 'teacher'}", f"student={SCALE_B_DIR / 'student'}", *SCALE_B]
    return load_config(None, overrides)


def matmul_peak(dtype: str, sizes=(1024, 2048), seconds: float = 1.0) -> dict:
    """This machine's matmul FLOP/s in `dtype` at the current thread count: the best of square sizes `sizes`."""
    import torch
    from opd.precision import torch_dtype
    best = {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=torch_dtype(dtype)), torch.randn(n, n, dtype=torch_dtype(dtype))
        a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        best[n] = 2 * n**3 * reps / (time.perf_counter() - t0)
    return {"flops_per_s": max(best.values()), "by_size": best}


def matmul_weights(model) -> tuple[int, int]:
    """(backbone matmul weights, head weights): the parameters a token's forward multiplies by, in two parts."""
    import torch
    head = model.get_output_embeddings().weight
    backbone = getattr(model, model.base_model_prefix)
    inner = sum(m.weight.numel() for m in backbone.modules() if isinstance(m, torch.nn.Linear))
    return inner, head.numel()


def stage_flops(student, teacher, rollouts, groups: int) -> dict[str, float]:
    """FLOPs of each part of one step from parameter and token counts (the module docstring says what is counted)."""
    s_inner, s_head = matmul_weights(student)
    t_inner, t_head = matmul_weights(teacher)
    completion = sum(len(r.completion_ids) for r in rollouts)
    firsts = {r.prompt_index: r for r in rollouts}  # one row per distinct prompt
    student_prompt = sum(len(r.prompt_ids) for r in firsts.values())
    teacher_prompt = sum(len(r.teacher_prompt_ids) for r in firsts.values())
    assert len(firsts) == groups, (len(firsts), groups)
    params = sum(p.numel() for p in student.parameters() if p.requires_grad)
    prefill = sum(len(r.prompt_ids) for r in rollouts)  # generation runs every row's prompt (no sharing there)
    return {"generate_s": 2 * s_inner * (prefill + completion) + 2 * s_head * completion,
            "score_s": 2 * t_inner * (teacher_prompt + completion) + 2 * t_head * completion,
            "forward_backward_s": 6 * s_inner * (student_prompt + completion) + 6 * s_head * completion,
            "optimizer_s": 12 * params}


def loop_step_times(config) -> list[float]:
    """perf/step_s of each step of a real `opd train` run (a fresh run folder each call), the warm-up step left out."""
    import dataclasses

    from opd.metrics import read_metrics
    from opd.train import train
    global RUNS
    RUNS += 1
    run_dir = train(dataclasses.replace(config, out_dir=f"{config.out_dir}_{RUNS}"))
    return [r["perf/step_s"] for r in read_metrics(run_dir) if "perf/step_s" in r][1:]


RUNS = 0  # loop runs so far: each gets its own out_dir (opd refuses to write over a finished run)


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
        from opd.precision import casts_cached
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
        with casts_cached(self.student):  # as `train.update`: each bf16 weight cast once over the micro-batches
            for start in range(0, batch.tokens_B_L.shape[0], c.micro_batch_size):
                loss, _ = micro_loss(self.student, batch.select(slice(start, start + c.micro_batch_size)), c,
                                     batch.num_tokens)
                loss.backward()
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), c.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        self.flops = stage_flops(self.student, self.teacher, rollouts, len(chosen))
        return {"generate_s": t1 - t0, "score_s": t3 - t2, "forward_backward_s": t4 - t3, "optimizer_s": t5 - t4}


def overhead(repeats: int, steps: int, tmp: str, dtype: str = "float32", scale: str = "a") -> dict:
    config = config_for(32, 4, 40, steps, f"{tmp}/overhead_{dtype}", dtype=dtype, scale=scale)
    parts, loop = Parts(config), []
    parts.measure()  # warm-up
    rounds = []
    for _ in range(repeats):
        loop += loop_step_times(config)
        rounds += [parts.measure() for _ in range(steps - 1)]
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    step = statistics.median(loop)
    return {"step_s": step, "parts_s": medians, "sum_of_parts_s": sum(medians.values()),
            "overhead_ratio": step / sum(medians.values()), "loop_steps": loop, "part_rounds": rounds,
            "flops": parts.flops}


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


STAGES = {"generate_s": "generation", "score_s": "teacher scoring", "forward_backward_s": "student forward+backward",
          "optimizer_s": "optimizer (AdamW)"}


def hardware_table(by_dtype: dict, peaks: dict) -> list[str]:
    lines = ["| dtype | part | GFLOP | s | GFLOP/s | % of matmul peak |", "| --- | --- | --- | --- | --- | --- |"]
    for dtype, over in by_dtype.items():
        for key, name in STAGES.items():
            flops, seconds = over["flops"][key], over["parts_s"][key]
            rate = flops / seconds
            lines.append(f"| {dtype} | {name} | {flops / 1e9:.2f} | {seconds:.3f} | {rate / 1e9:.1f} | "
                         f"{100 * rate / peaks[dtype]['flops_per_s']:.0f}% |")
    lines.append("\nmatmul peak (this machine, this thread count): " + ", ".join(
        f"{dtype} {peak['flops_per_s'] / 1e9:.0f} GFLOP/s" for dtype, peak in peaks.items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and a smaller grid (smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="loop runs / rounds of parts, alternated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="compute precisions, a row each")
    parser.add_argument("--scale", default="a", choices=("a", "b"),
                        help="a: the demo's step (tiny pair, 32 x 4 x 40 tokens) and the growth grid; "
                             "b: bench_vs_trl.py's scale b (4 x 4 x 64 tokens, 32k vocabulary), no grid")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from opd.precision import bf16_units
    torch.set_num_threads(args.threads)
    steps = 3 if args.quick else 6
    dtypes = args.dtypes.split(",")
    sizes, lengths = ([32, 64], [20, 40]) if args.quick else ([32, 64, 128], [20, 40, 80])
    peaks = {dtype: matmul_peak(dtype) for dtype in dtypes}
    by_dtype = {}
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        for dtype in dtypes:
            print(f"overhead ({dtype}): the step of scale {args.scale}, loop vs parts alone", flush=True)
            by_dtype[dtype] = overhead(1 if args.quick else args.repeats, steps, tmp, dtype, args.scale)
        grow = None
        if args.scale == "a":
            print("growth grid (float32):", flush=True)
            grow = growth(sizes, lengths, steps, tmp)
    lines = ["| dtype | step (loop) s | generate s | teacher score s | student fwd+bwd s | optimizer s | sum of parts s "
             "| overhead |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for dtype, over in by_dtype.items():
        p = over["parts_s"]
        lines.append(f"| {dtype} | {over['step_s']:.3f} | {p['generate_s']:.3f} | {p['score_s']:.3f} | "
                     f"{p['forward_backward_s']:.3f} | {p['optimizer_s']:.3f} | {over['sum_of_parts_s']:.3f} | "
                     f"**{over['overhead_ratio']:.3f}** |")
    lines += [""] + hardware_table(by_dtype, peaks) + [f"bf16 units: {bf16_units('cpu') or 'none (bf16 is emulated)'}"]
    if grow is not None:
        lines += ["", "| sequences/step \\ tokens | " + " | ".join(str(n) for n in lengths) + " |",
                  "| --- |" + " --- |" * len(lengths)]
        for S in sizes:
            row = [f"{q['step_s']:.3f}" for q in grow["points"] if q["sequences"] == S]
            lines.append(f"| {S} | " + " | ".join(row) + " |")
        fit = grow["fit"]
        lines.append(f"\nfit: step_s ~ S^{fit['slope_sequences']:.2f} * N^{fit['slope_tokens']:.2f} "
                     f"(log-log least squares over {len(grow['points'])} points)")
    text = "\n".join(lines)
    print(text)
    out = RESULTS if args.scale == "a" else RESULTS.with_name("bench_step_b.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"by_dtype": by_dtype, "overhead": by_dtype[dtypes[0]], "peaks": peaks,
                               "growth": grow, "table": text, "threads": args.threads, "scale": args.scale,
                               "bf16_units": bf16_units("cpu"), "loadavg_end": os.getloadavg(),
                               "quick": args.quick}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
