"""The one training loop of on-policy distillation (docs/design.md §1).

Per step: the student samples G completions of P prompts; the frozen teacher scores
exactly those tokens (under its own, possibly privileged, prompt); collate builds one
Batch; micro-batched forward/backward with the step's global token count as the loss
normalizer (docs/design.md §4); clip; AdamW; sync weights to the rollout engine; log; eval;
checkpoint. Objective and advantages follow Thinking Machines' "On-Policy Distillation"
(2025) and tinker-cookbook's `distillation/train_on_policy.py`.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from opd import checkpoint, distributed, runfolder
from opd.batch import collate
from opd.config import TrainConfig
from opd.data import epoch_prompts, load_data, rendered, resolve_steps
from opd.evaluate import Evaluator
from opd.logprobs import masked_mean
from opd.losses import grpo_advantages
from opd.objectives import make_objective, teacher_scores
from opd.metrics import MetricsWriter
from opd.models import load_pair, save_dtype
from opd.rewards import Reward, final_answer, make_reward, reward_name, score
from opd.support import warn_untested
from opd.rollout import make_rollout_engine
from opd.teacher import make_teacher_scorer
from opd.tokenization import pad_id
from opd.types import Batch, Rollout
from opd.validate import validate_setup


SUMMED = {"train/loss", "opd/opsm_rejected"}  # metrics that add up over micro-batches and ranks


def train(config: TrainConfig) -> Path:
    """Distil `config.student` from `config.teacher`; returns the run folder. Under torchrun, ranks share each step."""
    d = distributed.init()
    data = load_data(config)  # every row read and validated before any model loads (#19)
    config, examples, eval_examples = resolve_steps(config, len(data.train)), data.train, data.eval
    run = runfolder.open_run(config, d)  # the lock, and a fresh, overwritten or resumed run: before any model loads
    run_dir = run.path
    torch.manual_seed(config.seed)
    warn_untested(config)
    teacher, student, tokenizer, teacher_tokenizer = load_pair(config)
    if config.fsdp and d.world > 1:
        if config.prompts_per_step % d.world:  # a sharded forward is a collective: equal rows on every rank
            raise ValueError(f"fsdp=true needs prompts_per_step ({config.prompts_per_step}) divisible by the "
                             f"number of processes ({d.world})")
        distributed.shard_model(student)
    validate_setup(config.task, examples[:1], teacher, student, teacher_tokenizer, tokenizer)  # rows: load_data
    prompts, teacher_prompts = rendered(tokenizer, examples), rendered(teacher_tokenizer, examples, teacher=True)
    engine = make_rollout_engine(config.rollout_backend, student, tokenizer, seed=config.seed)
    scorer = make_teacher_scorer(config.teacher_backend, teacher, url=config.teacher_url,
                                 name=config.teacher_model_name or config.teacher, vocab_size=len(teacher_tokenizer),
                                 tokenizer=teacher_tokenizer, seed=config.seed, dtype=config.dtype,
                                 timeout_s=config.teacher_timeout_s)
    optimizer, scheduler = make_optimizer(student, config)

    start_step = 0
    if run.checkpoint is not None:
        start_step = checkpoint.load(run.checkpoint, student, optimizer, scheduler)
        engine.load_weights(student)
    plain_student = distributed.unsharded(student, d)  # rank 0's view for eval and saving (a collective under FSDP)
    if d.main:  # only rank 0 evaluates, logs and saves
        # a teacher that lives elsewhere is only its config here: it evaluates through its scorer (#18)
        evaluator_teacher = teacher if isinstance(teacher, torch.nn.Module) else scorer
        evaluate = make_evaluator(config, evaluator_teacher, tokenizer, teacher_tokenizer, eval_examples, examples)
        writer = MetricsWriter(run_dir, config, start_step)
        if start_step == 0:
            writer.log(0, evaluate(plain_student), samples=True)

    for step in range(start_step + 1, config.steps + 1):
        t0 = time.perf_counter()
        chosen_P = distributed.shard(step_prompts(len(prompts), config.prompts_per_step, config.seed, step,
                                                  config.epochs is not None), d)
        rollouts_PG = engine.generate([prompts[i] for i in chosen_P], config.completions_per_prompt,
                                      config.sampling, seed=config.seed * 1_000_003 + step + 7919 * d.rank)
        attach(rollouts_PG, chosen_P, teacher_prompts, examples, tokenizer, data.reward)
        t1 = time.perf_counter()
        scores = teacher_scores(scorer, rollouts_PG, config)
        task_advantages_B = task_advantages(rollouts_PG, config)
        batch = collate(rollouts_PG, scores, pad_id(tokenizer), advantages_B=task_advantages_B)
        t2 = time.perf_counter()
        num_tokens = int(distributed.all_sum(batch.num_tokens, d))  # the step-global normalizer
        metrics = train_step(student, optimizer, batch, config, num_tokens, d, vocab_size=len(tokenizer),
                             teacher_head=getattr(scorer, "head", None))
        scheduler.step()
        engine.load_weights(student)
        t3 = time.perf_counter()

        completion_tokens = sum(len(r.completion_ids) for r in rollouts_PG)
        metrics = distributed.weighted_mean_metrics(metrics | batch_metrics(batch, rollouts_PG), batch.num_tokens, d)
        metrics |= {"opd/active_tokens": float(num_tokens), "train/lr": scheduler.get_last_lr()[0],
                    "perf/generate_s": t1 - t0, "perf/score_s": t2 - t1, "perf/train_s": t3 - t2,
                    "perf/step_s": t3 - t0, "perf/tokens_per_s": d.world * completion_tokens / (t3 - t0)}
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
            checkpoint.save(run_dir, step, plain_student, tokenizer, optimizer_state, scheduler, config)
    if d.main:
        writer.close()
        checkpoint.save_final(run_dir, plain_student, tokenizer, dtype=save_dtype(config))
    distributed.barrier(d)
    distributed.close(d)
    run.close()
    return run_dir


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


def make_evaluator(config: TrainConfig, teacher, tokenizer, teacher_tokenizer, eval_examples, examples):
    """The run's evaluation: held-out rows, plus the first `eval_train_size` training rows when asked."""
    reward = make_reward(reward_name(config))
    evaluate = Evaluator(teacher, tokenizer, teacher_tokenizer, list(eval_examples), config.temperature,
                         config.max_new_tokens, seed=config.seed, reward=reward)
    if config.eval_train_size:
        on_train = Evaluator(teacher, tokenizer, teacher_tokenizer, examples[: config.eval_train_size],
                             config.temperature, config.max_new_tokens, seed=config.seed, reward=reward)
        evaluate = with_training_rows(evaluate, on_train)
    return evaluate


def with_training_rows(held_out: Evaluator, training_rows: Evaluator):
    """One evaluation: held-out metrics as `eval/*`, the training rows' as `eval_train/*` (no transcripts).

    The privileged recipe judges distillation by the teacher-trace gap on the very rows it
    trains on (as the reference run does); the held-out set shows what carries over.
    """
    def evaluate(student) -> dict:
        on_train = training_rows(student)
        on_train.pop("eval/samples", None)
        return held_out(student) | {key.replace("eval/", "eval_train/", 1): v for key, v in on_train.items()}
    return evaluate


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


def step_prompts(n_prompts: int, k: int, seed: int, step: int, epochs: bool = False) -> list[int]:
    """The step's prompt indices: a pure function of (seed, step), so a resumed run sees the same data.

    With `epochs`, the rows are walked without replacement (`opd.data.epoch_prompts`); else each step
    draws k distinct rows afresh.
    """
    if epochs:
        return epoch_prompts(n_prompts, k, seed, step)
    return random.Random(f"{seed}:{step}").sample(range(n_prompts), min(k, n_prompts))


def attach(rollouts: list[Rollout], chosen_P: list[int], teacher_prompts: list[list[int]], examples, tokenizer,
           reward: Reward | None = final_answer) -> None:
    """Give each rollout its teacher prompt, expected answer and reward (None when the reward is `none`)."""
    for r in rollouts:
        index = chosen_P[r.prompt_index]
        example = examples[index]
        r.teacher_prompt_ids = teacher_prompts[index]
        r.expected_answer = example.answer or None
        if reward is not None:
            r.reward = score(reward, tokenizer.decode(r.completion_ids, skip_special_tokens=True), example)


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
    """One optimizer step over all micro-batches; every micro-loss divides by the step-global `num_tokens`.

    `vocab_size` = len(student tokenizer): distributions are formed over those ids only (docs/design.md §5).
    `objective(student, micro, num_tokens, teacher_head) -> (loss, metrics)` defaults to the configured
    one (`opd.objectives.make_objective`); `teacher_head` is passed beside each micro-batch.
    """
    objective = objective or make_objective(config, vocab_size)
    student.train()
    device = next(student.parameters()).device
    totals: dict[str, float] = {}
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


def batch_metrics(batch: Batch, rollouts: list[Rollout]) -> dict[str, float]:
    """Sample-level metrics of docs/design.md §6, whatever the loss; the teacher's only when a teacher scored."""
    mask_B_T = batch.loss_mask_B_T
    metrics = {
        "opd/active_tokens": float(batch.num_tokens),
        "opd/sampler_nll": masked_mean(-batch.sampler_logprobs_B_T, mask_B_T).item(),
        "gen/mean_length": sum(len(r.completion_ids) for r in rollouts) / len(rollouts),
        "gen/truncated_fraction": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
    }
    if rollouts[0].reward is not None:  # reward=none: no task/reward key (#19)
        metrics["task/reward"] = sum(r.reward for r in rollouts) / len(rollouts)
    if batch.teacher_logprobs_B_T is not None:
        q_B_T = batch.teacher_logprobs_B_T
        metrics |= {"opd/sampled_reverse_kl": masked_mean(batch.sampler_logprobs_B_T - q_B_T, mask_B_T).item(),
                    "opd/teacher_nll": masked_mean(-q_B_T, mask_B_T).item()}
    return metrics
