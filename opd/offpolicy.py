"""Off-policy distillation, the baseline OPD is measured against: cross-entropy on teacher samples.

Sequence-level knowledge distillation (Kim & Rush 2016), the "SFT on teacher samples" baseline
of Thinking Machines' "On-Policy Distillation" (2025) and of the Qwen3 report. Per step the
frozen teacher samples G completions of each of the step's P prompts (from its own, possibly
privileged, prompt, at the same temperature and truncation the student samples with in
`opd.train`), and the student maximizes their likelihood after its own prompt. The student
never sees its own states, which is the difference OPD is about: its errors at test time
lead it to prefixes it was never trained on.

Everything but the sampler and the loss is shared with `opd.train.train`: the step's prompts,
`attach`, the data contract (the teacher's samples are `Rollout`s whose sampler logprobs are the
teacher's own, collated into a `Batch` whose mask covers the completion only), `train_step`
(micro-batches, the step-global token normalizer, clipping, ranks), the lr schedule, the
Evaluator, metrics and checkpoints. No teacher scoring pass is needed: the teacher's logprobs
of its own samples come with the samples. Run it with `opd train-offpolicy RECIPE key=value ...`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from opd import checkpoint, distributed, runfolder
from opd.batch import collate
from opd.config import TrainConfig
from opd.data import load_data, rendered, resolve_steps
from opd.logprobs import masked_mean
from opd.metrics import MetricsWriter
from opd.models import load_pair, save_dtype
from opd.rollout import make_rollout_engine
from opd.teacher import TeacherScores
from opd.tokenization import pad_id
from opd.objectives import make_objective
from opd.train import attach, make_evaluator, make_optimizer, step_prompts, train_step
from opd.types import Batch, Rollout
from opd.validate import validate_setup

ON_POLICY_ONLY = {"loss": "reverse_kl", "kl_coef": 1.0, "discount": 0.0, "task_reward": False, "opsm_delta": None,
                  "teacher_backend": "hf", "fsdp": False}  # fields only the on-policy loop uses, and their defaults


def check_offpolicy_config(config: TrainConfig) -> None:
    """Refuse settings this loop would silently ignore: the on-policy loss, its scorer, FSDP sharding."""
    changed = {name: getattr(config, name) for name, default in ON_POLICY_ONLY.items()
               if getattr(config, name) != default}
    if changed:
        raise ValueError(f"off-policy distillation trains by cross-entropy on teacher samples; {changed} only act in "
                         f"the on-policy loop (`opd train`): leave them at their defaults "
                         f"({ {k: ON_POLICY_ONLY[k] for k in changed} })")


def train_offpolicy(config: TrainConfig) -> Path:
    """Train `config.student` by cross-entropy on `config.teacher`'s samples; returns the run folder."""
    check_offpolicy_config(config)
    d = distributed.init()
    data = load_data(config)  # every row read and validated before any model loads (#19)
    config, examples, eval_examples = resolve_steps(config, len(data.train)), data.train, data.eval
    run = runfolder.open_run(config, d)  # the lock, and a fresh, overwritten or resumed run: before any model loads
    run_dir = run.path
    torch.manual_seed(config.seed)
    teacher, student, tokenizer, teacher_tokenizer = load_pair(config)
    validate_setup(config.task, examples[:1], teacher, student, teacher_tokenizer, tokenizer)  # rows: load_data
    prompts, teacher_prompts = rendered(tokenizer, examples), rendered(teacher_tokenizer, examples, teacher=True)
    teacher_engine = make_rollout_engine(config.rollout_backend, teacher, teacher_tokenizer)
    optimizer, scheduler = make_optimizer(student, config)

    start_step = 0
    if run.checkpoint is not None:
        start_step = checkpoint.load(run.checkpoint, student, optimizer, scheduler)
    if d.main:
        evaluate = make_evaluator(config, teacher, tokenizer, teacher_tokenizer, eval_examples, examples)
        writer = MetricsWriter(run_dir, config, start_step)
        if start_step == 0:
            writer.log(0, evaluate(student), samples=True)

    for step in range(start_step + 1, config.steps + 1):
        t0 = time.perf_counter()
        chosen_P = distributed.shard(step_prompts(len(prompts), config.prompts_per_step, config.seed, step,
                                                  config.epochs is not None), d)
        samples_PG = teacher_engine.generate([teacher_prompts[i] for i in chosen_P], config.completions_per_prompt,
                                             config.sampling, seed=config.seed * 1_000_003 + step + 7919 * d.rank)
        rollouts_PG = on_student_prompts(samples_PG, chosen_P, prompts)
        attach(rollouts_PG, chosen_P, teacher_prompts, examples, tokenizer, data.reward)
        batch = collate(rollouts_PG, own_scores(samples_PG), pad_id(tokenizer))
        t1 = time.perf_counter()
        num_tokens = int(distributed.all_sum(batch.num_tokens, d))
        metrics = train_step(student, optimizer, batch, config, num_tokens, d, vocab_size=len(tokenizer),
                             objective=make_objective(dataclasses.replace(config, loss="cross_entropy"), len(tokenizer)))
        scheduler.step()
        t2 = time.perf_counter()

        metrics = distributed.weighted_mean_metrics(metrics | sample_metrics(batch, rollouts_PG), batch.num_tokens, d)
        completion_tokens = sum(len(r.completion_ids) for r in rollouts_PG)
        metrics |= {"train/active_tokens": float(num_tokens), "train/lr": scheduler.get_last_lr()[0],
                    "perf/generate_s": t1 - t0, "perf/train_s": t2 - t1, "perf/step_s": t2 - t0,
                    "perf/tokens_per_s": d.world * completion_tokens / (t2 - t0)}
        last = step == config.steps
        if not d.main:
            continue
        if last or (config.eval_every and step % config.eval_every == 0):
            metrics |= evaluate(student)
        writer.log(step, metrics, samples=any(k.startswith("eval/") for k in metrics))
        if last or (config.save_every and step % config.save_every == 0):
            checkpoint.save(run_dir, step, student, tokenizer, distributed.optimizer_state(student, optimizer),
                            scheduler, config)
    if d.main:
        writer.close()
        checkpoint.save_final(run_dir, student, tokenizer, dtype=save_dtype(config))
    distributed.barrier(d)
    distributed.close(d)
    run.close()
    return run_dir


def on_student_prompts(samples: list[Rollout], chosen_P: list[int], prompts: list[list[int]]) -> list[Rollout]:
    """The teacher's samples re-based on the student's prompts: same completion tokens and logprobs.

    The teacher sampled after its own prompt (kept as `teacher_prompt_ids`); the student is trained
    on the same completion after its prompt. The tokenizers share ids (checked by `load_pair`).
    """
    return [dataclasses.replace(r, prompt_ids=prompts[chosen_P[r.prompt_index]], teacher_prompt_ids=r.prompt_ids)
            for r in samples]


def own_scores(samples: list[Rollout]) -> list[TeacherScores]:
    """The teacher's logprob of each token it sampled: its sampler logprobs, no second forward pass."""
    return [TeacherScores(logprobs_R=torch.tensor(r.sampler_logprobs, dtype=torch.float32)) for r in samples]


def sample_metrics(batch: Batch, rollouts: list[Rollout]) -> dict[str, float]:
    """What the teacher's samples were like: its NLL of them, their length, truncation and task reward."""
    metrics = {
        "offpolicy/teacher_nll": masked_mean(-batch.teacher_logprobs_B_T, batch.loss_mask_B_T).item(),
        "gen/mean_length": sum(len(r.completion_ids) for r in rollouts) / len(rollouts),
        "gen/truncated_fraction": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
    }
    if rollouts[0].reward is not None:  # reward=none: no reward key (#19)
        metrics["offpolicy/teacher_reward"] = sum(r.reward for r in rollouts) / len(rollouts)
    return metrics
