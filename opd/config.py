"""The run configuration: one flat, typed, frozen dataclass, loaded from YAML + `key=value`.

OmegaConf merges the recipe and the overrides onto the dataclass schema, so an unknown
key or a value of the wrong type fails with the key's name before anything is loaded;
`validate()` then checks the cross-field rules of DESIGN.md §5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from opd.precision import check_device
from opd.rollout import Sampling

LOSSES = ("reverse_kl", "topk_kl", "jsd")
SCHEDULES = ("constant", "cosine", "linear")
TASKS = ("arithmetic", "gsm8k", "gsm8k_privileged")
BACKENDS = ("hf", "vllm")
TEACHER_BACKENDS = ("hf", "vllm", "served", "none")
DTYPES = ("float32", "bfloat16")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
TINY_ALIASES = ("tiny:teacher", "tiny:student", "tiny:gsm8k")


@dataclass(frozen=True)
class TrainConfig:
    # models: a local Hugging Face folder, or the bundled "tiny:teacher" / "tiny:student" / "tiny:gsm8k"
    teacher: str = "tiny:teacher"  # frozen teacher checkpoint
    student: str = "tiny:student"  # student checkpoint to train
    # task
    task: str = "arithmetic"  # one of TASKS
    data_dir: str | None = None  # folder with {train,test}.jsonl for GSM8K tasks (default: ../shared/data/gsm8k)
    train_size: int = 4096  # prompts in the training pool
    eval_size: int = 200  # held-out prompts for evaluation
    eval_train_size: int = 0  # also evaluate the first N training prompts, logged as eval_train/* (0 = off)
    # sampling (one temperature rule: student and teacher both at τ = temperature)
    prompts_per_step: int = 16  # P
    completions_per_prompt: int = 4  # G
    max_new_tokens: int = 48  # completion budget; longer completions end with finish_reason "length"
    min_new_tokens: int = 0  # > 0 forbids eos before that many tokens (benchmarks: a fixed completion length)
    temperature: float = 1.0  # τ for sampling and for every logprob in a ratio or divergence
    top_k: int = 0  # sampler top-k truncation (0 = off)
    top_p: float = 1.0  # sampler nucleus truncation (1.0 = off)
    rollout_backend: str = "hf"  # "hf" or "vllm"
    teacher_backend: str = "hf"  # "hf" (in-process), "vllm" (in-process engine), "served" (`vllm serve` over HTTP), "none" (pure GRPO)
    teacher_url: str | None = None  # served teacher: base URL(s) of `vllm serve`, comma-separated for several
    # loss
    loss: str = "reverse_kl"  # sampled-token reverse KL (IS policy gradient), "topk_kl" or "jsd"
    kl_coef: float = 1.0  # c (pure OPD) or λ (OPD + task reward) on the per-token reverse-KL advantage
    discount: float = 0.0  # γ: discounted future sum of the per-token reverse-KL term (0 = per token)
    log_ratio_cap: float = 20.0  # clamp on log π_θ - p in the importance ratio
    topk: int = 20  # K for the teacher top-k forward KL
    tail_bucket: bool = False  # add the (1 - teacher top-k mass) tail term to the top-k KL
    jsd_beta: float = 0.5  # β of the generalized JSD: 0 forward KL, 1 reverse KL
    loss_temperature: float | None = None  # temperature of top-k KL / JSD (default: temperature)
    task_reward: bool = False  # add GRPO advantages from the task grader (OPD + RL mix)
    grpo_scale_std: bool = True  # divide group-relative rewards by the group std
    opsm_delta: float | None = None  # off-policy sequence masking threshold δ (None = off)
    # optimization
    steps: int = 100  # optimizer steps
    lr: float = 1e-4
    lr_schedule: str = "constant"  # one of SCHEDULES, after warm-up
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    micro_batch_size: int = 64  # sequences per forward/backward; gradients accumulate over the step
    fsdp: bool = False  # torchrun: shard the student with FSDP2 fully_shard (too big for one device)
    dtype: str = "float32"  # compute precision; bfloat16 = autocast, the student's weights and AdamW state stay fp32
    device: str = "auto"  # "auto" picks cuda when available
    # run
    seed: int = 0
    out_dir: str = "runs/default"
    eval_every: int = 20  # steps between evaluations (0 = only at start and end)
    save_every: int = 50  # steps between checkpoints (0 = only at the end)
    log_samples: int = 2  # decoded transcripts printed at each eval
    resume: bool = False  # continue from the latest complete checkpoint in out_dir
    tensorboard: bool = False  # also write TensorBoard events (needs `tensorboard`)
    wandb_project: str | None = None  # also log to this Weights & Biases project (needs `wandb`)
    progress: bool = True  # show a progress bar
    # precision, stops, memory (#18)
    teacher_dtype: str | None = None  # the frozen teacher's weight dtype (default: dtype); bfloat16 halves its memory
    save_dtype: str | None = None  # dtype of final/ (default: the dtype the student checkpoint came in)
    stop_token_ids: list[int] = field(default_factory=list)  # ids that also end a sample, besides every eos id
    gradient_checkpointing: bool = False  # recompute the student's activations in backward: less memory, more time

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                        max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens)

    @property
    def divergence_temperature(self) -> float:
        return self.temperature if self.loss_temperature is None else self.loss_temperature

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the field and the fix for any bad value or combination."""
        _one_of("task", self.task, TASKS)
        _one_of("loss", self.loss, LOSSES)
        _one_of("lr_schedule", self.lr_schedule, SCHEDULES)
        _one_of("rollout_backend", self.rollout_backend, BACKENDS)
        _one_of("teacher_backend", self.teacher_backend, TEACHER_BACKENDS)
        if (self.teacher_backend == "served") != (self.teacher_url is not None):
            raise ValueError("teacher_url is needed exactly when teacher_backend=served (e.g. teacher_url=http://host:8000)")
        _one_of("dtype", self.dtype, DTYPES)
        # precision, stops, memory (#18)
        if self.teacher_dtype is not None:
            _one_of("teacher_dtype", self.teacher_dtype, DTYPES)
        if self.save_dtype is not None:
            _one_of("save_dtype", self.save_dtype, SAVE_DTYPES)
        if any(i < 0 for i in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {list(self.stop_token_ids)}")
        check_device(self.device)
        for name in ("prompts_per_step", "completions_per_prompt", "max_new_tokens", "steps", "micro_batch_size",
                     "topk", "train_size", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kl_coef", "discount", "lr", "weight_decay", "grad_clip", "warmup_steps", "eval_every",
                     "save_every", "log_samples", "top_k", "eval_train_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0 or (self.loss_temperature is not None and self.loss_temperature <= 0):
            raise ValueError(f"temperature and loss_temperature must be > 0, got {self.temperature}, "
                             f"{self.loss_temperature}; for greedy decoding use `opd eval`")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {self.jsd_beta}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        if self.discount >= 1.0:
            raise ValueError(f"discount must be in [0, 1), got {self.discount}")
        if self.opsm_delta is not None and self.opsm_delta < 0:
            raise ValueError(f"opsm_delta must be >= 0 or null (off), got {self.opsm_delta}")
        if self.teacher_backend == "none" and not (self.task_reward and self.kl_coef == 0):
            raise ValueError(f"teacher_backend=none (pure GRPO, no teacher) trains on the task reward alone: it needs "
                             f"task_reward=true and kl_coef=0, got task_reward={self.task_reward}, kl_coef={self.kl_coef}")
        if self.task_reward and self.completions_per_prompt < 2:
            raise ValueError("task_reward=true needs completions_per_prompt >= 2 (GRPO compares completions of a prompt)")
        if self.loss != "reverse_kl" and (self.task_reward or self.opsm_delta is not None or self.discount):
            raise ValueError(f"task_reward, opsm_delta and discount act on the reverse-KL advantage; "
                             f"they need loss=reverse_kl, got loss={self.loss}")
        if self.top_k or self.top_p < 1.0:
            if self.loss != "reverse_kl":
                raise ValueError("top_k/top_p truncation is only supported with loss=reverse_kl: the divergence "
                                 "losses compare full distributions, which truncation would make undefined")
        if self.fsdp and self.rollout_backend != "hf":
            raise ValueError("fsdp=true needs rollout_backend=hf: syncing a sharded student's weights into vLLM "
                             "is not implemented; use fsdp=false with vLLM")
        for name in ("teacher", "student"):
            path = getattr(self, name)
            if path not in TINY_ALIASES and not (Path(path) / "config.json").is_file():
                raise ValueError(f"{name}={path!r} is not a model folder (no config.json there); give a local Hugging "
                                 f"Face folder or one of {TINY_ALIASES}")
        if self.task.startswith("gsm8k") and self.data_dir is not None:
            for split in ("train", "test"):
                if not (Path(self.data_dir) / f"{split}.jsonl").is_file():
                    raise ValueError(f"data_dir={self.data_dir!r} has no {split}.jsonl")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _one_of(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; choose one of {', '.join(accepted)}")


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Recipe YAML (optional) + `key=value` overrides onto the schema, then validated."""
    from omegaconf import OmegaConf  # here: TrainConfig itself needs only the standard library (scripts/gpu-check.sh)
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(TrainConfig)
    layers = []
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ValueError(f"recipe {str(path)!r} not found")
        layers.append(OmegaConf.load(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must be key=value, got {bad}; keys: {', '.join(f.name for f in fields(TrainConfig))}")
    layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        merged = OmegaConf.merge(schema, *layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        message = str(e).splitlines()[0]
        raise ValueError(f"bad config: {message}. Accepted keys: {', '.join(f.name for f in fields(TrainConfig))}") from None
    return config.validate()
