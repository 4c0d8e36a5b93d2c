"""opd against TRL's on-policy distillation trainer on the same work, at two model scales.

    python bench/bench_vs_trl.py [--quick] [--repeats 3] [--quality-repeats 5] [--scales a,b,quality] [--threads 1]
                                 [--dtypes float32,bfloat16]

Same teacher and student, same prompts in the same order (opd's `step_prompts`; TRL gets each
prompt repeated G times with shuffling off, since it makes one completion per prompt), same
sequences per step, temperature 1, fp32, AdamW at a constant lr with grad clip 1.0, no vLLM, no
gradient checkpointing, the same number of steps. TRL runs `trl.DistillationTrainer` with
`beta=1.0` (reverse KL over the full vocabulary, computed chunk-wise from hidden states); opd runs
`loss=jsd jsd_beta=1` (the same objective) and its default sampled-token reverse KL.

Scales: (a) the bundled tiny pair (0.69M student, 3.9M teacher, 2,048-token vocabulary); (b) a pair
built here from `transformers` Llama configs with a 32,000-token vocabulary (23M-parameter student,
42M teacher, random weights); (c), only with `--scales c`, a real pretrained pair: SmolLM2-135M-Instruct
(`scripts/get-smollm2.sh`) and the 20-of-30-layer cut of recipes/smollm2_distill.yaml (`opd init-student
--keep 20 --by importance`). The speed runs force a fixed completion length
(`min_new_tokens = max_new_tokens`) so both trainers generate, score and train on the same number of
tokens. At scale (b) opd trains each step in micro-batches of 4 sequences (`micro`): the same
gradient, since every micro-loss divides by the step's token count (docs/design.md §4), with a quarter of
the activation memory; generation still runs all 16 at once. TRL ties its generation batch to its
training batch (`gradient_accumulation_steps=4` would make it generate 4 sequences at a time), so
it runs one batch of 16. The quality runs (scale a, natural stopping) train each trainer and then score every final
student with the same held-out evaluation: opd's sampled reverse KL (`opd.evaluate.Evaluator`) on
200 test prompts.

Before any timing, one identical batch of student samples goes through both objectives (TRL's
`_chunked_divergence_loss` on TRL-shaped inputs, opd's `micro_loss` with the JSD at β = 1): their
values and parameter gradients must agree, so that the final-KL comparison is between random
streams, not objectives.

Precision (`--dtypes`): each trainer runs once per dtype in every repetition. bfloat16 is each side's
own mixed precision: opd's `dtype=bfloat16` (fp32 weights and AdamW, backbones under bf16 autocast,
fp32 heads and losses, docs/design.md §7 "Precision") and TRL's `bf16=True` (the Trainer's
accelerate autocast around the student's forward; TRL generates with the unwrapped model and runs
its teacher as loaded, so both stay fp32 there, which is what TRL's trainer does with the flag). Each
opd row is compared with TRL's best row of that repetition (the faster of its dtypes), so a
ratio is against TRL at its best setting.

Every run is a fresh subprocess (so peak RSS, from getrusage, is one trainer's), runs alternate
trainer by trainer within each repetition (rotating the order) so machine noise hits all of them,
and the table reports medians over repetitions of per-run medians over steps (the first step of a
run, a warm-up, is left out). Times are wall-clock. TRL's generation and teacher-forward times come
from timers wrapped around its `_generate` and the teacher's `_get_last_hidden_state`; TRL projects
the teacher's hidden states to logits inside its loss, so that part counts as training for TRL.
Writes bench/results/bench_vs_trl.json.
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
RESULTS = ROOT / "bench" / "results"
SCALE_B_DIR = RESULTS / "models" / "scale_b"
SCALE_C_TEACHER = ROOT / "models" / "smollm2-135m-instruct"  # ./scripts/get-smollm2.sh
SCALE_C_STUDENT = ROOT / "models" / "smollm2-cut20-imp"  # the recipe's 20-of-30 importance cut, made on first use
TRAINERS = ("trl", "opd_jsd", "opd")
DTYPE_SUFFIX = {"float32": "", "bfloat16": "_bf16"}  # row name = trainer + suffix: opd_jsd_bf16


def kind_of(row: str) -> str:
    """The trainer behind a row name: opd_jsd_bf16 -> opd_jsd."""
    return row.removesuffix("_bf16")


def dtype_of(row: str) -> str:
    return "bfloat16" if row.endswith("_bf16") else "float32"
SEED = 0

# P prompts x G completions per step, N completion tokens, measured steps (+1 warm-up step).
SCALES = {
    "a": dict(teacher="tiny:teacher", student="tiny:student", P=32, G=4, N=40, steps=6, lr=1e-3, fixed=True),
    "b": dict(teacher=str(SCALE_B_DIR / "teacher"), student=str(SCALE_B_DIR / "student"), P=4, G=4, N=64, steps=4,
              lr=1e-4, fixed=True, micro=4),
    # (c), #21: a real pretrained pair, SmolLM2-135M-Instruct -> its 20-layer importance cut (99.1M), 49,152 tokens
    "c": dict(teacher=str(SCALE_C_TEACHER), student=str(SCALE_C_STUDENT), P=4, G=4, N=64, steps=4, lr=1e-4,
              fixed=True, micro=4),
    "quality": dict(teacher="tiny:teacher", student="tiny:student", P=16, G=4, N=40, steps=40, lr=1e-3, fixed=False),
}
QUICK = {"a": dict(steps=3), "b": dict(steps=2, N=32), "c": dict(steps=1, N=16), "quality": dict(steps=8)}
SCALE_B_CONFIGS = {  # Llama configs; tied embeddings as in most small open models
    "student": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                    intermediate_size=1024),
    "teacher": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                    intermediate_size=1376),
}
SCALE_B_VOCAB = 32_000


def build_scale_b() -> None:
    """Random-weight teacher and student with a 32,000-token vocabulary, saved as Hugging Face folders.

    The tokenizer is the bundled tiny one plus added placeholder tokens up to 32,000 ids, so prompts
    tokenize as at scale (a) while sampling, scoring and the losses run over a real-sized vocabulary.
    """
    if all((SCALE_B_DIR / name / "model.safetensors").is_file() for name in SCALE_B_CONFIGS):
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from opd.models import load_tokenizer

    tokenizer = load_tokenizer("tiny:student")
    tokenizer.add_tokens([f"<|x{i}|>" for i in range(SCALE_B_VOCAB - len(tokenizer))])
    assert len(tokenizer) == SCALE_B_VOCAB, len(tokenizer)
    for seed, (name, shape) in enumerate(SCALE_B_CONFIGS.items()):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=SCALE_B_VOCAB, max_position_embeddings=512, tie_word_embeddings=True,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, **shape)
        model = LlamaForCausalLM(config)
        model.save_pretrained(SCALE_B_DIR / name)
        tokenizer.save_pretrained(SCALE_B_DIR / name)
        print(f"built scale-b {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)


def build_scale_c() -> None:
    """Scale (c)'s student: recipes/smollm2_distill.yaml's (`opd init-student --keep 20 --by importance`)."""
    if (SCALE_C_STUDENT / "model.safetensors").is_file():
        return
    if not (SCALE_C_TEACHER / "model.safetensors").is_file():
        raise SystemExit(f"scale c needs {SCALE_C_TEACHER}: run ./scripts/get-smollm2.sh first")
    from opd.prune import init_student

    report = init_student(str(SCALE_C_TEACHER), SCALE_C_STUDENT, keep=20, by="importance")
    print(f"built scale-c student: layers {report['kept_layers']}, {report['parameters'] / 1e6:.1f}M parameters", flush=True)


# ---------------------------------------------------------------- workers (one per subprocess)

def _examples(spec: dict):
    from opd.tasks import load_task
    return load_task("arithmetic", "train", spec["train_size"], spec["seed"], None)


def worker_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from opd.models import load_model, load_tokenizer
    from opd.tokenization import render_prompt
    from opd.sampler import step_prompts

    P, G, N, steps = spec["P"], spec["G"], spec["N"], spec["steps"]
    tokenizer = load_tokenizer(spec["student"])
    tokenizer.padding_side = "left"
    student, teacher = load_model(spec["student"], device="cpu"), load_model(spec["teacher"], device="cpu")
    examples = _examples(spec)
    chosen = [i for step in range(1, steps + 1) for i in step_prompts(len(examples), P, spec["seed"], step)]
    dataset = Dataset.from_list([{"prompt": examples[i].prompt} for i in chosen for _ in range(G)])
    args = DistillationConfig(
        output_dir=spec["out_dir"], per_device_train_batch_size=P * G, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=spec["dtype"] == "bfloat16", fp16=False, use_cpu=True, gradient_checkpointing=False, beta=1.0, temperature=1.0, top_k=0,
        top_p=1.0, max_completion_length=N, generation_kwargs={"min_new_tokens": N} if spec["fixed"] else None,
        shuffle_dataset=False, disable_dropout=True, logging_steps=1, save_strategy="no", report_to="none",
        seed=spec["seed"], disable_tqdm=True, dataloader_num_workers=0)
    records, current = [], {"generate_s": 0.0, "score_s": 0.0, "tokens": 0}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            current.update(generate_s=0.0, score_s=0.0, tokens=0, t0=time.perf_counter())

        def on_step_end(self, *a, **k):
            step_s = time.perf_counter() - current.pop("t0")
            records.append({"step_s": step_s, "train_s": step_s - current["generate_s"] - current["score_s"], **current})

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[StepTimer()])
    # Same prompt ids as opd's render_prompt, or the comparison is off.
    assert trainer._tokenize_prompts([examples[chosen[0]].prompt])[0][0] == render_prompt(tokenizer, examples[chosen[0]].prompt)
    generate, hidden = trainer._generate, trainer._get_last_hidden_state

    def timed_generate(prompts):
        t = time.perf_counter()
        out = generate(prompts)
        current["generate_s"] += time.perf_counter() - t
        current["tokens"] += sum(len(ids) for ids in out[1])
        return out

    def timed_hidden(model, *a, **k):
        if torch.is_grad_enabled():  # the student's forward, part of training
            return hidden(model, *a, **k)
        t = time.perf_counter()
        out = hidden(model, *a, **k)
        current["score_s"] += time.perf_counter() - t
        return out

    trainer._generate, trainer._get_last_hidden_state = timed_generate, timed_hidden
    trainer.train()
    if spec.get("save"):
        trainer.save_model(spec["final_dir"])
    return {"steps": records}


def worker_opd(spec: dict) -> dict:
    from opd.config import load_config
    from opd.metrics import read_metrics
    from opd.train import train

    loss = ["loss=jsd", "jsd_beta=1.0"] if kind_of(spec["trainer"]) == "opd_jsd" else ["loss=reverse_kl"]
    overrides = [f"teacher={spec['teacher']}", f"student={spec['student']}", "task=arithmetic",
                 f"train_size={spec['train_size']}", "eval_size=8", f"prompts_per_step={spec['P']}",
                 f"completions_per_prompt={spec['G']}", f"max_new_tokens={spec['N']}",
                 f"min_new_tokens={spec['N'] if spec['fixed'] else 0}", "temperature=1.0", *loss,
                 f"steps={spec['steps']}", f"lr={spec['lr']}", "lr_schedule=constant", "warmup_steps=0",
                 "weight_decay=0.0", "grad_clip=1.0", f"micro_batch_size={spec.get('micro', spec['P'] * spec['G'])}", "device=cpu",
                 f"seed={spec['seed']}", f"dtype={spec['dtype']}", f"out_dir={spec['out_dir']}", "eval_every=0", "save_every=0",
                 "progress=false", "log_samples=0"]
    run_dir = train(load_config(None, overrides))
    records = [{"step_s": r["perf/step_s"], "generate_s": r["perf/generate_s"], "score_s": r["perf/score_s"],
                "train_s": r["perf/train_s"], "tokens": round(r["perf/tokens_per_s"] * r["perf/step_s"])}
               for r in read_metrics(run_dir) if "perf/step_s" in r]
    if spec.get("save"):
        os.replace(Path(run_dir) / "final", spec["final_dir"])
    return {"steps": records}


def worker_eval(spec: dict) -> dict:
    """opd's held-out sampled reverse KL of a final student, the same evaluation for every trainer."""
    from opd.evaluate import Evaluator
    from opd.models import load_model, load_tokenizer
    from opd.tasks import load_task

    tokenizer = load_tokenizer(spec["student"])
    teacher, student = load_model(spec["teacher"], device="cpu").eval(), load_model(spec["final_dir"], device="cpu").eval()
    examples = load_task("arithmetic", "test", 200, 0, None)
    evaluator = Evaluator(teacher, tokenizer, load_tokenizer(spec["teacher"]), examples, temperature=1.0,
                          max_new_tokens=spec["N"], seed=0)
    return evaluator.sampled_metrics(student)


def worker_parity(spec: dict) -> dict:
    """TRL's loss (its `_chunked_divergence_loss` on TRL-shaped inputs) and opd's `micro_loss` (JSD, β = 1) on one
    identical batch of real student samples: the value and every parameter gradient should agree, so that a
    difference in final KL between the two comes from their random streams, not their objectives."""
    import torch
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from opd.batch import collate, right_pad
    from opd.config import load_config
    from opd.models import load_model, load_tokenizer
    from opd.rollout import Sampling
    from opd.rollout.hf import HFRolloutEngine
    from opd.teacher.hf import HFTeacherScorer
    from opd.tokenization import render_prompt
    from opd.objectives import micro_loss

    tokenizer = load_tokenizer(spec["student"])
    student, teacher = load_model(spec["student"]), load_model(spec["teacher"]).eval()
    prompts = [render_prompt(tokenizer, ex.prompt) for ex in _examples(spec)[:8]]
    rollouts = HFRolloutEngine(student, tokenizer).generate(prompts, 2, Sampling(max_new_tokens=spec["N"]), seed=0)
    for r in rollouts:
        r.teacher_prompt_ids = r.prompt_ids
    scorer = HFTeacherScorer(teacher)
    batch = collate(rollouts, scorer.score(rollouts, 1.0, full_logits=True), tokenizer.pad_token_id)
    student.train()
    config = load_config(None, ["loss=jsd", "jsd_beta=1.0", "temperature=1.0"])
    opd_loss, _ = micro_loss(student, batch, config, batch.num_tokens, len(tokenizer), teacher_head=scorer.head)
    opd_loss.backward()
    opd_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    # TRL's shapes: left-padded prompts, right-padded completions, hidden states cut as its _get_last_hidden_state
    width = max(len(r.prompt_ids) for r in rollouts)
    prompt_ids, prompt_mask = right_pad([r.prompt_ids[::-1] for r in rollouts], tokenizer.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids[:, :width].flip(1), prompt_mask[:, :width].flip(1)
    completion_ids, completion_mask = right_pad([r.completion_ids for r in rollouts], tokenizer.pad_token_id, min_width=1)
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    C = completion_ids.shape[1]
    student_hidden = student.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][:, -C:]
    with torch.no_grad():
        teacher_hidden = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][:, -C:]
    trl_loss, _, _ = _chunked_divergence_loss(student_hidden, teacher_hidden, student.lm_head.weight,
                                              teacher.lm_head.weight, completion_mask, 1.0,
                                              num_items_in_batch=completion_mask.sum())
    trl_loss.backward()
    relative = max(((mine - p.grad).norm() / p.grad.norm()).item() for mine, p in zip(opd_grads, student.parameters()))
    return {"opd_loss": opd_loss.item(), "trl_loss": trl_loss.item(), "max_relative_grad_diff": relative,
            "tokens": batch.num_tokens}


def worker(spec: dict) -> None:
    import torch
    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    kind = "eval" if spec.get("eval") else kind_of(spec["trainer"])
    result = {"eval": worker_eval, "parity": worker_parity, "trl": worker_trl, "opd": worker_opd,
              "opd_jsd": worker_opd}[kind](spec)
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------- driver

def run_subprocess(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(spec["threads"]),
           "MKL_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['trainer']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(spec["result"]).read_text())


def summarize_run(run: dict, warmup: int = 1) -> dict:
    steps = run["steps"][warmup:] or run["steps"]
    med = {key: statistics.median(s[key] for s in steps) for key in ("step_s", "generate_s", "score_s", "train_s")}
    med["tokens_per_s"] = sum(s["tokens"] for s in steps) / sum(s["step_s"] for s in steps)
    med["tokens_per_step"] = statistics.median(s["tokens"] for s in steps)
    return med | {"peak_rss_mib": run["peak_rss_mib"]}


def median_over_reps(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def best_trl(by_row: dict) -> list[dict]:
    """TRL at its best, repetition by repetition: the faster of its dtype rows in each repetition."""
    trl_rows = [row for row in by_row if kind_of(row) == "trl"]
    if not trl_rows:
        return []
    return [max(runs, key=lambda r: r["tokens_per_s"]) for runs in zip(*(by_row[row]["runs"] for row in trl_rows))]


def ratio(x: float, y: float) -> str:
    """`x / y` as 1.23x, or - where there is no TRL row to divide by."""
    return "-" if y != y else f"{x / y:.2f}x"


def table(results: dict) -> str:
    lines = []
    for scale, by_row in results.items():
        s = SCALES_USED[scale]
        pair = {"b": "scale-b teacher (42M) -> student (23M), 32k vocab",
                "c": "SmolLM2-135M-Instruct -> its 20-layer importance cut (99.1M), 49k vocab"}.get(scale, "tiny:teacher -> tiny:student")
        lines.append(f"\nscale {'a, quality' if scale == 'quality' else scale}: {pair}, {s['P']} prompts x {s['G']} = "
                     f"{s['P'] * s['G']} sequences/step, {'exactly' if s['fixed'] else 'up to'} {s['N']} tokens, "
                     f"{s['steps']} steps (medians of {len(next(iter(by_row.values()))['runs'])} runs)"
                     + (f", opd trains in micro-batches of {s['micro']}" if "micro" in s else ""))
        header = ("| trainer | dtype | step s | tokens/s | vs best TRL | generate s | teacher s | train s | peak RSS MiB "
                  "| vs TRL fp32 |")
        if scale == "quality":
            header += " final sampled reverse KL |"
        lines += [header, "|" + " --- |" * (header.count("|") - 1)]
        nan = {"tokens_per_s": float("nan"), "peak_rss_mib": float("nan")}
        best = median_over_reps(best_trl(by_row)) if "trl" in by_row else nan
        trl = by_row["trl"]["median"] if "trl" in by_row else nan
        for row, r in by_row.items():
            m = r["median"]
            line = (f"| {kind_of(row)} | {dtype_of(row)} | {m['step_s']:.2f} | {m['tokens_per_s']:.0f} | "
                    f"{ratio(m['tokens_per_s'], best['tokens_per_s'])} | {m['generate_s']:.2f} | {m['score_s']:.2f} | "
                    f"{m['train_s']:.2f} | {m['peak_rss_mib']:.0f} | {ratio(m['peak_rss_mib'], trl['peak_rss_mib'])} |")
            if scale == "quality":
                kls = ", ".join(f"{run['final_sampled_reverse_kl']:.3f}" for run in r["runs"])
                line += f" {m['final_sampled_reverse_kl']:.3f} ({kls}) |"
            lines.append(line)
        lines += paired_lines(by_row, scale)
    return "\n".join(lines)


def parity_line(parity: dict) -> str:
    return (f"same objective: on one batch of 16 student samples ({parity['tokens']} tokens) opd's JSD at beta=1 gives "
            f"loss {parity['opd_loss']:.6f}, TRL's {parity['trl_loss']:.6f}; parameter gradients agree to "
            f"{parity['max_relative_grad_diff']:.1e} (largest relative difference)")


def kl_difference(label: str, runs: list[dict], others: list[dict]) -> str:
    """The final KL of `runs` minus that of `others`, seed by seed: mean ± standard error of the pairs."""
    diffs = [r["final_sampled_reverse_kl"] - o["final_sampled_reverse_kl"] for r, o in zip(runs, others)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return (f"- {label}, same seed: mean {statistics.mean(diffs):+.3f} ± {se:.3f} "
            f"(standard error of {len(diffs)} pairs)")


def paired_lines(by_row: dict, scale: str) -> list[str]:
    """Each opd row against TRL run by run: repetition r of every row ran back to back (same seed).

    Speed: against TRL's best row of that repetition. Quality: against TRL in the same dtype, and each
    bf16 row against the same trainer in fp32."""
    lines, best = [], best_trl(by_row)
    if scale == "quality":
        lines += [kl_difference(f"{row} final KL minus {kind_of(row)}'s (fp32)", by_row[row]["runs"],
                                by_row[kind_of(row)]["runs"])
                  for row in by_row if dtype_of(row) == "bfloat16" and kind_of(row) in by_row]
    for row in by_row:
        if kind_of(row) == "trl" or "trl" not in by_row:
            continue
        runs = by_row[row]["runs"]
        if scale == "quality":
            lines.append(kl_difference(f"{row} final KL minus TRL's ({dtype_of(row)})", runs,
                                       by_row["trl" + DTYPE_SUFFIX[dtype_of(row)]]["runs"]))
        else:
            ratios = [r["tokens_per_s"] / t["tokens_per_s"] for r, t in zip(runs, best)]
            lines.append(f"- {row} tokens/s over TRL's best, repetition by repetition: "
                         + ", ".join(f"{x:.2f}" for x in ratios) + f" (median {statistics.median(ratios):.2f}x)")
    return lines


SCALES_USED: dict = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke test, not a measurement)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the speed scales (a, b, c)")
    parser.add_argument("--quality-repeats", type=int, default=5,
                        help="repetitions of the quality runs (their final KL varies more from seed to seed)")
    parser.add_argument("--scales", default="a,b,quality", help="comma-separated subset of a, b, c, quality "
                        "(c, the real SmolLM2 pair, only when asked)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: the 2 cores here are shared)")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated compute precisions, each a row per trainer: float32, bfloat16")
    parser.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated subset of " + ", ".join(TRAINERS)
                        + " (without trl: no ratios, e.g. opd's fp32 against bf16 on many quality seeds)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        worker(json.loads(args.worker))
        return
    scales = args.scales.split(",")
    for name in scales:
        SCALES_USED[name] = SCALES[name] | (QUICK[name] if args.quick else {})
        SCALES_USED[name]["steps"] += 1  # + the warm-up step left out of the medians
    if "b" in scales:
        build_scale_b()
    if "c" in scales:
        build_scale_c()
    RESULTS.mkdir(parents=True, exist_ok=True)
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= set(DTYPE_SUFFIX) or "float32" not in dtypes:
        raise SystemExit(f"--dtypes {args.dtypes}: choose from {', '.join(DTYPE_SUFFIX)}, float32 included")
    trainers = args.trainers.split(",")
    if not set(trainers) <= set(TRAINERS):
        raise SystemExit(f"--trainers {args.trainers}: choose from {', '.join(TRAINERS)}")
    rows = [t + DTYPE_SUFFIX[d] for t in TRAINERS if t in trainers for d in dtypes]
    raw = {name: {row: [] for row in rows} for name in scales}
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        parity = run_subprocess(SCALES["a"] | {"trainer": "parity", "seed": SEED, "threads": args.threads,
                                               "train_size": 4096, "result": str(Path(tmp) / "parity.json")})
        print(parity_line(parity), flush=True)
        for rep in range(max(args.repeats, args.quality_repeats)):
            for name in scales:
                if rep >= (args.quality_repeats if name == "quality" else args.repeats):
                    continue
                order = rows[rep % len(rows):] + rows[: rep % len(rows)]  # rotate: no row always runs first
                for trainer in order:
                    run_dir = Path(tmp) / f"{name}_{trainer}_{rep}"
                    spec = SCALES_USED[name] | {"trainer": trainer, "dtype": dtype_of(trainer), "seed": SEED + rep, "threads": args.threads,
                                                "train_size": 4096, "out_dir": str(run_dir),
                                                "result": str(run_dir) + ".json", "save": name == "quality",
                                                "final_dir": str(run_dir) + "_final"}
                    run = run_subprocess(spec)
                    if name == "quality":
                        run["eval"] = run_subprocess(spec | {"eval": True, "result": str(run_dir) + "_eval.json"})
                    raw[name][trainer].append(run)
                    s = summarize_run(run)
                    print(f"rep {rep} scale {name} {trainer:13s} step {s['step_s']:.2f}s  {s['tokens_per_s']:.0f} tok/s  "
                          f"gen {s['generate_s']:.2f} score {s['score_s']:.2f} train {s['train_s']:.2f}  "
                          f"RSS {s['peak_rss_mib']:.0f} MiB"
                          + (f"  KL {run['eval']['eval/sampled_reverse_kl']:.3f}" if name == "quality" else ""), flush=True)
    results = {}
    for name in scales:
        results[name] = {}
        for trainer in rows:
            runs = []
            for run in raw[name][trainer]:
                s = summarize_run(run)
                if name == "quality":
                    s["final_sampled_reverse_kl"] = run["eval"]["eval/sampled_reverse_kl"]
                runs.append(s)
            results[name][trainer] = {"median": median_over_reps(runs), "runs": runs}
    text = parity_line(parity) + "\n" + table(results)
    print(text)
    import torch
    import transformers
    import trl

    from opd.precision import bf16_units
    meta = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                         "python": platform.python_version()},
            "cpus": os.cpu_count(), "threads": args.threads, "loadavg_end": os.getloadavg(), "quick": args.quick,
            "repeats": args.repeats, "quality_repeats": args.quality_repeats, "scales": SCALES_USED,
            "dtypes": dtypes, "bf16_units": bf16_units("cpu")}
    # the default scales write bench_vs_trl.json; another subset its own file, so `--scales c` keeps a and b's
    name = "_".join(scales) + ("" if trainers == list(TRAINERS) else "_" + "_".join(trainers))
    out = RESULTS / ("bench_vs_trl.json" if name == "a_b_quality" else f"bench_vs_trl_{name}.json")
    out.write_text(json.dumps({"meta": meta, "parity": parity, "results": results, "raw": raw, "table": text}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
