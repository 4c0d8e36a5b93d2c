"""The one training loop of on- and off-policy distillation (docs/design.md §1).

Per step: a sampler draws G completions of P prompts (the student, or with `loss=cross_entropy` the
teacher: `opd.sampler`); the teacher's side is scored for exactly those tokens (under its own,
possibly privileged, prompt; off-policy, the teacher's own sampler logprobs); collate builds one
Batch; `updates_per_batch` optimizer steps of micro-batched forward/backward with the step's global
token count as the loss normalizer (docs/design.md §4), clip, AdamW; sync weights to the rollout
engine; log; eval; checkpoint. Objective and advantages follow Thinking Machines' "On-Policy
Distillation" (2025) and tinker-cookbook's `distillation/train_on_policy.py` and `rl/train.py`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from opd import checkpoint, distributed, noise_floor, runfolder
from opd.batch import collate
from opd.config import TrainConfig, check_offpolicy_config
from opd.data import load_data, resolve_steps
from opd.evaluate import make_evaluator
from opd.logprobs import masked_mean
from opd.losses import grpo_advantages
from opd.objectives import make_objective, teacher_scores
from opd.metrics import MetricsWriter
from opd.models import load_models, resolve, save_dtype
from opd.offpolicy import OwnScores
from opd.precision import casts_cached
from opd.sampler import Sampler, make_sampler
from opd.support import warn_untested
from opd.teacher import make_teacher_scorer
from opd.teacher.routed import RoutedScorer, ShareWatch, Teachers, teacher_metrics
from opd.teachers import manifest, route_of
from opd.tokenization import pad_id
from opd.types import Batch, Rollout
from opd.validate import validate_setup


SUMMED = {"train/loss", "opd/opsm_rejected"}  # metrics that add up over micro-batches and ranks


def train(config: TrainConfig) -> Path:
    """Distil `config.student` from `config.teacher`; returns the run folder. Under torchrun, ranks share each step."""
    d = distributed.init()
    data = load_data(config)  # every row read and validated before any model loads (#19)
    config = resolve_steps(config, len(data.train))
    run = runfolder.open_run(config, d)  # the lock, and a fresh, overwritten or resumed run: before any model loads
    torch.manual_seed(config.seed)
    warn_untested(config)
    teachers, student, tokenizer = load_models(config)
    shard_student(student, config, d)
    validate_setup_teachers(config, data, teachers, student, tokenizer)
    sampler = make_sampler(config, data, teachers, student, tokenizer)
    scorers = make_scorers(config, teachers)
    scorer = RoutedScorer(scorers) if config.loss != "cross_entropy" else OwnScores()
    optimizer, scheduler = make_optimizer(student, config)
    objective, teacher_head = make_objective(config, len(tokenizer)), getattr(scorer, "head", None)
    start_step = resume(run, student, optimizer, scheduler, sampler, teachers.own)
    sampler, preflight = noise_floor.preflight(config, sampler, scorer, start_step, d)  # the first batch, checked
    plain_student = distributed.unsharded(student, d)  # rank 0's view for eval and saving (a collective under FSDP)
    watch = ShareWatch(teachers.names if config.teachers else [])
    if d.main:  # only rank 0 evaluates, logs and saves
        evaluate = make_evaluator(config, teachers, scorers, tokenizer, data.eval, data.train)
        writer = MetricsWriter(run.path, config, start_step)
        if start_step == 0:
            writer.log(0, evaluate(plain_student) | preflight, samples=True)

    for step in range(start_step + 1, config.steps + 1):
        t0 = time.perf_counter()
        rollouts_PG = sampler.sample(step, d)
        t1 = time.perf_counter()
        batch = collate(rollouts_PG, teacher_scores(scorer, rollouts_PG, config), pad_id(tokenizer),
                        advantages_B=task_advantages(rollouts_PG, config), kl_coef_B=kl_coefs(rollouts_PG, teachers))
        t2 = time.perf_counter()
        num_tokens = int(distributed.all_sum(batch.num_tokens, d))  # the step-global normalizer
        metrics = train_step(student, optimizer, batch, config, num_tokens, d, vocab_size=len(tokenizer),
                             objective=objective, teacher_head=teacher_head)
        scheduler.step()
        if teachers.own is not None:  # teacher=self: a snapshot or EMA teacher follows the student
            teachers.own.update(step)
        sampler.sync(student)
        t3 = time.perf_counter()
        metrics = step_metrics(metrics, batch, rollouts_PG, config, num_tokens, scheduler.get_last_lr()[0],
                               (t0, t1, t2, t3), d, teachers.names if config.teachers else ())
        watch(step, metrics)
        last = step == config.steps
        evaluating = last or (config.eval_every and step % config.eval_every == 0)
        saving = last or (config.save_every and step % config.save_every == 0)
        if evaluating or saving:  # collectives under FSDP, so every rank takes part
            plain_student = distributed.unsharded(student, d)
            optimizer_state = distributed.optimizer_state(student, optimizer) if saving else None
        if not d.main:
            continue
        if evaluating:
            metrics |= evaluate(plain_student)
        writer.log(step, metrics, samples=any(k.startswith("eval/") for k in metrics))
        if saving:
            checkpoint.save(run.path, step, plain_student, tokenizer, optimizer_state, scheduler, config,
                            teachers=teacher_manifest(teachers), self_teacher=teachers.own)
    if d.main:
        writer.close()
        checkpoint.save_final(run.path, plain_student, tokenizer, dtype=save_dtype(config))
    distributed.barrier(d)
    distributed.close(d)
    run.close()
    return run.path


def train_offpolicy(config: TrainConfig) -> Path:
    """`opd train-offpolicy`: the one loop, the teacher sampling and cross-entropy as the loss (opd/offpolicy.py)."""
    check_offpolicy_config(config)
    return train(dataclasses.replace(config, loss="cross_entropy").validate())


def shard_student(student: torch.nn.Module, config: TrainConfig, d: distributed.Dist) -> None:
    """fsdp=true under torchrun: shard the student with FSDP2 (its rollouts then run in lockstep)."""
    if not (config.fsdp and d.world > 1):
        return
    if config.prompts_per_step % d.world:  # a sharded forward is a collective: equal rows on every rank
        raise ValueError(f"fsdp=true needs prompts_per_step ({config.prompts_per_step}) divisible by the "
                         f"number of processes ({d.world})")
    distributed.shard_model(student)


def validate_setup_teachers(config: TrainConfig, data, teachers: Teachers, student, tokenizer) -> None:
    """`validate_setup` for each teacher against the student, on the first training row routed to it."""
    first = {}
    for i in range(len(data.train)):
        example = data.train[i]  # a row of a big file is converted when indexed: once here, not twice
        first.setdefault(route_of(example, config), example)
        if len(first) == len(teachers.names):
            break
    for name in teachers.names:
        validate_setup(config.task, [first[name]] if name in first else [], teachers.models[name], student,
                       teachers.tokenizers[name], tokenizer)


def make_scorers(config: TrainConfig, teachers: Teachers) -> dict:
    """name -> its teacher's scorer (`opd.teacher.make_teacher_scorer`); routes sharing a model share its scorer."""
    made, scorers = {}, {}
    live = teachers.own.model if teachers.own is not None and not teachers.own.copies else None
    for name, spec in teachers.specs.items():
        model, tok = teachers.models[name], teachers.tokenizers[name]
        key = (id(model), spec.backend, spec.url, spec.model_name)
        if key not in made:  # the live self-teacher is the student: scored as it is, not frozen
            made[key] = make_teacher_scorer(spec.backend, model, url=spec.url, name=spec.model_name or spec.path,
                                            vocab_size=len(tok), tokenizer=tok, seed=config.seed, dtype=config.dtype,
                                            timeout_s=spec.timeout_s, freeze_model=model is not live)
        scorers[name] = made[key]
    return scorers


def kl_coefs(rollouts: list[Rollout], teachers: Teachers) -> torch.Tensor | None:
    """Each row's teacher's kl_coef when the teachers' differ; None when one coefficient serves every row."""
    coefs = {name: spec.kl_coef for name, spec in teachers.specs.items()}
    if len(set(coefs.values())) < 2:
        return None
    return torch.tensor([coefs[r.teacher] for r in rollouts])


def teacher_manifest(teachers: Teachers) -> dict:
    return manifest(teachers.specs, resolve)


def resume(run: runfolder.RunFolder, student: torch.nn.Module, optimizer, scheduler, sampler: Sampler,
           self_teacher=None) -> int:
    """The step the run's checkpoint reached (0 for a fresh run), its weights loaded into student and sampler
    (and a snapshot or EMA `self_teacher`'s into it; a frozen one was copied from the student before this)."""
    if run.checkpoint is None:
        return 0
    start_step = checkpoint.load(run.checkpoint, student, optimizer, scheduler)
    if self_teacher is not None:
        self_teacher.load(run.checkpoint)
    sampler.sync(student)
    return start_step


def make_optimizer(student: torch.nn.Module, config: TrainConfig):
    """(AdamW, its lr schedule) for `student`.

    fused: one kernel instead of foreach temporaries as large as the parameters (4.7x faster on
    CPU at 23M parameters, and what TRL uses); the same AdamW update. Only trainable parameters
    (a LoRA student's adapter), so frozen weights carry no optimizer state, and over fp32 weights only:
    an in-place update of bf16 weights loses every step below bf16's resolution (opd/precision.py).
    """
    trainable = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    if low := [name for name, p in trainable if p.dtype != torch.float32]:
        raise ValueError(f"the student's trainable weights must be float32 (AdamW would lose updates below bf16's "
                         f"resolution), got {low[0]!r} in {dict(trainable)[low[0]].dtype}; load it with opd.models.load_pair")
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=config.lr, weight_decay=config.weight_decay,
                                  fused=next(student.parameters()).device.type in ("cpu", "cuda"))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then constant, cosine or linear decay to 0 at `config.steps`."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    if config.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if config.lr_schedule == "linear":
        return max(1.0 - progress, 0.0)
    return 1.0


def task_advantages(rollouts: list[Rollout], config: TrainConfig) -> torch.Tensor | None:
    """GRPO advantages of the graded rewards when the task reward is mixed in; None for pure OPD."""
    if not config.task_reward:
        return None
    rewards_B = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
    prompt_index_B = torch.tensor([r.prompt_index for r in rollouts])
    return grpo_advantages(rewards_B, prompt_index_B, scale_by_std=config.grpo_scale_std)


def train_step(student: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, config: TrainConfig,
               num_tokens: int, d: distributed.Dist = distributed.Dist(), vocab_size: int | None = None,
               objective=None, teacher_head=None) -> dict:
    """`config.updates_per_batch` optimizer steps on one batch (tinker-cookbook's `num_substeps`); their mean metrics.

    Each update runs every micro-batch, each micro-loss divided by the step-global `num_tokens`.
    `vocab_size` = len(student tokenizer): distributions are formed over those ids only (docs/design.md §5).
    `objective(student, micro, num_tokens, teacher_head) -> (loss, metrics)` defaults to the configured
    one (`opd.objectives.make_objective`); `teacher_head` is passed beside each micro-batch.
    """
    objective = objective or make_objective(config, vocab_size)
    student.train()
    updates = [update(student, optimizer, batch, config, num_tokens, d, objective, teacher_head)
               for _ in range(config.updates_per_batch)]
    return {key: sum(u[key] for u in updates) / len(updates) for key in updates[0]}


def update(student: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, config: TrainConfig,
           num_tokens: int, d: distributed.Dist, objective, teacher_head=None) -> dict:
    """One optimizer step over all micro-batches: accumulate, sum over ranks, clip, AdamW."""
    device = next(student.parameters()).device
    totals: dict[str, float] = {}
    with casts_cached(student):  # bf16: each weight cast once per update, not per micro-batch (closed before AdamW)
        for start in range(0, batch.tokens_B_L.shape[0], config.micro_batch_size):
            micro = batch.select(slice(start, start + config.micro_batch_size)).to(device)
            loss, metrics = objective(student, micro, num_tokens, teacher_head)
            loss.backward()
            weight = micro.num_tokens / max(batch.num_tokens, 1)  # token-weighted mean of per-micro-batch means
            totals["train/loss"] = totals.get("train/loss", 0.0) + loss.item()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value) * (1.0 if key in SUMMED else weight)
    for key in SUMMED.intersection(totals):  # so that the token-weighted mean over ranks is the global sum
        totals[key] *= num_tokens / max(batch.num_tokens, 1)
    distributed.sum_gradients(student, d)
    max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
    totals["train/grad_norm"] = torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def batch_metrics(batch: Batch, rollouts: list[Rollout], on_policy: bool = True) -> dict[str, float]:
    """Sample-level metrics of docs/design.md §6, whatever the sampler; `opd/*` only for the on-policy losses.

    Off-policy the sampler is the teacher, so `gen/sampler_nll` equals `gen/teacher_nll` there.
    """
    mask_B_T = batch.loss_mask_B_T
    metrics = {
        "train/active_tokens": float(batch.num_tokens),
        "gen/sampler_nll": masked_mean(-batch.sampler_logprobs_B_T, mask_B_T).item(),
        "gen/mean_length": sum(len(r.completion_ids) for r in rollouts) / len(rollouts),
        "gen/truncated_fraction": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
    }
    if rollouts[0].reward is not None:  # reward=none: no task/reward key (#19)
        metrics["task/reward"] = sum(r.reward for r in rollouts) / len(rollouts)
    if batch.teacher_logprobs_B_T is not None:
        q_B_T = batch.teacher_logprobs_B_T
        metrics["gen/teacher_nll"] = masked_mean(-q_B_T, mask_B_T).item()
        if on_policy:
            metrics["opd/sampled_reverse_kl"] = masked_mean(batch.sampler_logprobs_B_T - q_B_T, mask_B_T).item()
    return metrics


def step_metrics(metrics: dict, batch: Batch, rollouts: list[Rollout], config: TrainConfig, num_tokens: int,
                 lr: float, times: tuple[float, float, float, float], d: distributed.Dist,
                 teacher_names=()) -> dict[str, float]:
    """The step's record: train_step's and the samples' metrics (token-weighted over ranks), lr and timings;
    with several teachers each one's share and KL (`opd.teacher.routed.teacher_metrics`)."""
    t0, t1, t2, t3 = times
    metrics = distributed.weighted_mean_metrics(metrics | batch_metrics(batch, rollouts, config.loss != "cross_entropy"),
                                                batch.num_tokens, d)
    metrics |= teacher_metrics(batch, rollouts, teacher_names, lambda v: distributed.all_sum(v, d)) if teacher_names else {}
    completion_tokens = sum(len(r.completion_ids) for r in rollouts)
    return metrics | {"train/active_tokens": float(num_tokens), "train/lr": lr, "perf/generate_s": t1 - t0,
                      "perf/score_s": t2 - t1, "perf/train_s": t3 - t2, "perf/step_s": t3 - t0,
                      "perf/tokens_per_s": d.world * completion_tokens / (t3 - t0)}
