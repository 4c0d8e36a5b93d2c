"""The run configuration: one flat, typed, frozen dataclass, loaded from YAML + `key=value`.

OmegaConf merges the recipe and the overrides onto the dataclass schema, so an unknown
key or a value of the wrong type fails with the key's name before anything is loaded;
`validate()` then checks the cross-field rules of docs/design.md §5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from opd.precision import check_device
from opd.rollout import Sampling
from opd.teachers import SELF, check_self_teacher, check_student_topk_rkl, check_teachers
from opd.vllm_setup import check_temperature

LOSSES = ("reverse_kl", "topk_kl", "jsd", "cross_entropy", "student_topk_rkl")  # cross_entropy: off-policy
SCHEDULES = ("constant", "cosine", "linear")
TASKS = ("arithmetic", "arithmetic_privileged", "automaton", "automaton_privileged", "gsm8k", "gsm8k_privileged")
BACKENDS = ("hf", "vllm")
TEACHER_BACKENDS = ("hf", "vllm", "served", "none")
DTYPES = ("float32", "bfloat16")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
TINY_ALIASES = ("tiny:teacher", "tiny:student", "tiny:gsm8k", "tiny:arith_self", "tiny:automaton_teacher",
                "tiny:automaton_student")
# Fields that only act when the student samples (on-policy), and their defaults: an off-policy run
# (loss=cross_entropy, `opd train-offpolicy`) would ignore them, so it refuses them (check_offpolicy_config).
ON_POLICY_ONLY = {"loss": "reverse_kl", "kl_coef": 1.0, "discount": 0.0, "task_reward": False, "opsm_delta": None,
                  "teacher_backend": "hf", "fsdp": False}


@dataclass(frozen=True)
class TrainConfig:
    # models: a local Hugging Face folder, or the bundled "tiny:teacher" / "tiny:student" / "tiny:gsm8k"
    teacher: str = "tiny:teacher"  # frozen teacher checkpoint, or "self": the student under the teacher prompt (#24)
    student: str = "tiny:student"  # student checkpoint to train
    # task
    task: str = "arithmetic"  # one of TASKS (a built-in prompt source; `data` replaces it)
    data_dir: str | None = None  # folder with {train,test}.jsonl for GSM8K tasks (default: the copy in opd/assets/data)
    train_size: int = 4096  # prompts in the training pool
    eval_size: int = 200  # held-out prompts for evaluation
    eval_train_size: int = 0  # also evaluate the first N training prompts, logged as eval_train/* (0 = off)
    # your own prompts (#19): `data` replaces `task` (opd/data.py; rows read as docs/design.md §7 "Data rows")
    data: str | None = None  # .jsonl/.json/.parquet/.csv, a save_to_disk folder or hf:NAME[:SPLIT]; every row trains
    eval_data: str | None = None  # held-out rows (at most eval_size); default: eval_fraction of `data`
    eval_fraction: float = 0.1  # rows of `data` held out by a hash of the row (0 = evaluate on training rows)
    prompt_key: str | None = None  # column of the student prompt (default: prompt > messages > question > input > problem)
    teacher_prompt_key: str | None = None  # column of the teacher prompt (default: teacher_messages > privileged_messages > ...)
    answer_key: str | None = None  # column of the answer, `a.b` for nested (default: expected_answer > answer > ...)
    system_prompt: str | None = None  # system message added to rows that have none
    reward: str | None = None  # final_answer, boxed, exact, none or module:function (default: final_answer for tasks, none for data)
    epochs: int | None = None  # walk the rows without replacement, reshuffled each epoch (None = sample with replacement)
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
    # a teacher that lives elsewhere (#18, #25): with teacher_backend=vllm|served only its tokenizer + config load
    teacher_model_name: str | None = None  # served teacher: the name `vllm serve` serves it under (default: `teacher`)
    teacher_timeout_s: float = 300.0  # served teacher: seconds per request attempt (3 retries on timeouts and 5xx)
    # several teachers (#22, opd/teachers.py): route name -> {path, backend, url, dtype, device, kl_coef, ...}
    teachers: dict[str, Any] | None = None  # replaces `teacher`; rows pick one by their teacher/teacher_id/data_source
    default_teacher: str | None = None  # the teacher of rows that name none
    teacher_mix: dict[str, float] | None = None  # prompts per step by teacher, as weights (default: as drawn)
    # the student as its own teacher (#24, opd/self_teacher.py): teacher=self, scored under the teacher prompt
    self_teacher: str = "frozen"  # frozen (a step-0 copy) | snapshot (re-copied every self_teacher_every steps) | ema | live
    self_teacher_every: int = 10  # snapshot: optimizer steps between copies
    self_teacher_ema: float = 0.99  # ema: the decay d of θ_T ← d·θ_T + (1 - d)·θ_S after every optimizer step
    # loss
    loss: str = "reverse_kl"  # sampled-token reverse KL (IS policy gradient), "topk_kl", "jsd", "student_topk_rkl"; "cross_entropy" = off-policy
    kl_coef: float = 1.0  # c (pure OPD) or λ (OPD + task reward) on the per-token reverse-KL advantage
    discount: float = 0.0  # γ: discounted future sum of the per-token reverse-KL term (0 = per token)
    log_ratio_cap: float = 20.0  # clamp on log π_θ - p in the importance ratio
    topk: int = 20  # K for the teacher top-k forward KL
    tail_bucket: bool = False  # add the (1 - teacher top-k mass) tail term to the top-k KL
    student_topk: int = 20  # K for student_topk_rkl: the reverse KL over the student's own top-K ids + a tail bucket
    jsd_beta: float = 0.5  # β of the generalized JSD: 0 forward KL, 1 reverse KL
    loss_temperature: float | None = None  # temperature of top-k KL / JSD (None: set to `temperature` on construction)
    task_reward: bool = False  # add GRPO advantages from the task grader (OPD + RL mix)
    grpo_scale_std: bool = True  # divide group-relative rewards by the group std
    opsm_delta: float | None = None  # off-policy sequence masking threshold δ (None = off)
    # optimization
    steps: int | None = None  # optimizer steps (default 100; with only `epochs`, ceil(rows · epochs / prompts_per_step))
    lr: float = 1e-4
    lr_schedule: str = "constant"  # one of SCHEDULES, after warm-up
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    micro_batch_size: int = 64  # sequences per forward/backward; gradients accumulate over the step
    updates_per_batch: int = 1  # optimizer steps on each sampled batch; > 1 uses the PPO-clipped loss (tinker's num_substeps)
    fsdp: bool = False  # torchrun: shard the student with FSDP2 fully_shard (too big for one device)
    dtype: str = "float32"  # compute precision; bfloat16 = autocast, the student's weights and AdamW state stay fp32
    device: str = "auto"  # "auto" picks cuda when available
    # LoRA (#18)
    lora_rank: int = 0  # rank of a LoRA adapter on the student, trained alone (0 = off: full fine-tuning); needs opd[lora]
    lora_alpha: float = 32.0  # the adapter's update is (lora_alpha / lora_rank) * B A
    lora_targets: str = "all-linear"  # adapted modules: every linear layer of the decoder (not lm_head), or names "q_proj,v_proj"
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
    preflight_noise: bool = True  # warn before step 1 if teacher logprobs move with the batch layout (opd/noise_floor.py)
    # precision, stops, memory (#18)
    teacher_dtype: str | None = None  # the frozen teacher's weight dtype (default: dtype); bfloat16 halves its memory
    save_dtype: str | None = None  # dtype of final/ (default: the dtype the student checkpoint came in)
    stop_token_ids: list[int] = field(default_factory=list)  # ids that also end a sample, besides every eos id
    gradient_checkpointing: bool = False  # recompute the student's activations in backward: less memory, more time

    # run folder (#17); on resume every field is training-relevant unless in opd.runfolder.NOT_TRAINING
    keep_last: int = 3  # checkpoints kept in out_dir (0 = all); older ones are deleted once a newer one is complete
    overwrite: bool = False  # a fresh run into a used out_dir moves its old contents to <out_dir>.old-<time>/
    resume_allow_changed: str = ""  # comma-separated training-relevant fields resume=true may find changed: "lr,seed"

    def __post_init__(self):
        if self.steps is None and self.epochs is None:  # frozen: the default of 100 needs object.__setattr__
            object.__setattr__(self, "steps", 100)
        if self.loss_temperature is None:  # one name for the divergence temperature: τ unless given
            object.__setattr__(self, "loss_temperature", self.temperature)

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                        max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                        record_topk=self.student_topk if self.loss == "student_topk_rkl" else 0)

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
        for name in ("prompts_per_step", "completions_per_prompt", "max_new_tokens", "micro_batch_size",
                     "topk", "student_topk", "train_size", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if type(self.updates_per_batch) is not int or self.updates_per_batch < 1:
            raise ValueError(f"updates_per_batch must be an integer >= 1 (optimizer steps per sampled batch), "
                             f"got {self.updates_per_batch!r}")
        for name in ("kl_coef", "discount", "lr", "weight_decay", "grad_clip", "warmup_steps", "eval_every",
                     "save_every", "log_samples", "top_k", "eval_train_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0 or self.loss_temperature <= 0:
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
        if self.loss == "cross_entropy":
            check_offpolicy_config(self)
        if self.top_k or self.top_p < 1.0:
            if self.loss in ("topk_kl", "jsd", "student_topk_rkl"):
                raise ValueError("top_k/top_p truncation is only supported with loss=reverse_kl: the divergence "
                                 "losses compare full distributions, which truncation would make undefined")
        # vLLM backends (#25): what vLLM would refuse at the first step, refused before any model loads
        if self.rollout_backend == "vllm":
            check_temperature(self.temperature, "temperature (rollout_backend=vllm)")
        if self.loss == "student_topk_rkl":
            check_student_topk_rkl(self)
        scored_at = {self.temperature} | ({self.loss_temperature} if self.loss == "topk_kl" else set())
        if self.teacher_backend == "served" and scored_at != {1.0}:
            raise ValueError(f"teacher_backend=served scores at temperature 1 only (vLLM's prompt logprobs are of the "
                             f"raw logits), got temperature={self.temperature}, loss_temperature="
                             f"{self.loss_temperature}; set both to 1.0, or use teacher_backend=hf")
        if self.teacher_timeout_s <= 0:
            raise ValueError(f"teacher_timeout_s must be > 0, got {self.teacher_timeout_s}")
        if self.fsdp and self.rollout_backend != "hf":
            raise ValueError("fsdp=true needs rollout_backend=hf: syncing a sharded student's weights into vLLM "
                             "is not implemented; use fsdp=false with vLLM")
        if self.lora_rank < 0 or self.lora_alpha <= 0 or not self.lora_targets.strip():
            raise ValueError(f"lora_rank must be >= 0 (0 = off), lora_alpha > 0 and lora_targets non-empty, got "
                             f"{self.lora_rank}, {self.lora_alpha}, {self.lora_targets!r}")
        if self.lora_rank and self.fsdp:
            raise ValueError("lora_rank > 0 with fsdp=true is not implemented; an adapter is small: use fsdp=false")
        check_teachers(self)
        check_self_teacher(self)
        for name in ("student",) if self.teachers or self.teacher == SELF else ("teacher", "student"):
            path = getattr(self, name)
            if path not in TINY_ALIASES and not (Path(path) / "config.json").is_file():
                raise ValueError(f"{name}={path!r} is not a model folder (no config.json there); give a local Hugging "
                                 f"Face folder or one of {TINY_ALIASES}")
        self.validate_data()
        if self.task.startswith("gsm8k") and self.data_dir is not None:
            for split in ("train", "test"):
                if not (Path(self.data_dir) / f"{split}.jsonl").is_file():
                    raise ValueError(f"data_dir={self.data_dir!r} has no {split}.jsonl")
        # run folder (#17)
        if self.keep_last < 0:
            raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {self.keep_last}")
        if self.resume and self.overwrite:
            raise ValueError("resume=true continues the run in out_dir and overwrite=true moves it aside: choose one")
        names = {f.name for f in fields(TrainConfig)}
        unknown = [n.strip() for n in self.resume_allow_changed.split(",") if n.strip() and n.strip() not in names]
        if unknown:
            raise ValueError(f"resume_allow_changed names unknown fields {unknown}; give comma-separated TrainConfig "
                             f"fields, e.g. resume_allow_changed=lr,seed")
        return self

    def validate_data(self) -> None:
        """Your own prompts (#19): `data` replaces `task`; keys and eval files only act with `data`."""
        from opd.rewards import make_reward, reward_name

        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or null (sample with replacement), got {self.epochs}")
        if self.data is not None:
            if self.task != "arithmetic":
                raise ValueError(f"task={self.task!r} and data={self.data!r} both name the prompts; keep one "
                                 f"(task for a built-in source, data for your file)")
            if self.data_dir is not None:
                raise ValueError("data_dir is the GSM8K tasks' folder; with data=PATH give the file itself")
        else:
            given = [k for k in ("eval_data", "prompt_key", "teacher_prompt_key", "answer_key", "system_prompt")
                     if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only act on your own prompts: set data=PATH (or remove them)")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        name = reward_name(self)
        make_reward(name)  # an unknown name or a callable that does not import fails here, before any model
        if name == "none" and (self.task_reward or self.teacher_backend == "none"):
            raise ValueError("task_reward=true (and teacher_backend=none) trains on the reward: set reward= to "
                             "final_answer, boxed, exact or module:function")

    def to_dict(self) -> dict:
        return asdict(self)


def check_offpolicy_config(config: TrainConfig) -> None:
    """Refuse what an off-policy run would silently ignore: the on-policy losses and their settings, its scorer, FSDP."""
    changed = {name: getattr(config, name) for name, default in ON_POLICY_ONLY.items()
               if getattr(config, name) != default and not (name == "loss" and config.loss == "cross_entropy")}
    if changed:
        raise ValueError(f"off-policy distillation trains by cross-entropy on teacher samples; {changed} only act in "
                         f"the on-policy loop (`opd train`): leave them at their defaults "
                         f"({ {k: ON_POLICY_ONLY[k] for k in changed} })")


def _one_of(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; choose one of {', '.join(accepted)}")


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Recipe YAML (optional) + `key=value` overrides onto the schema, then validated.

    Errors name where the bad value came from: the recipe's file:line:column for YAML syntax, the
    key for a value of the wrong type (`steps=abc`), and the recipe or the overrides it was in.
    """
    import yaml  # omegaconf's own dependency
    from omegaconf import OmegaConf  # here: TrainConfig itself needs only the standard library (gpu-check.sh)
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    keys = ", ".join(f.name for f in fields(TrainConfig))
    layers = []
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ValueError(f"recipe {str(path)!r} not found")
        try:
            layers.append((f"recipe {path}", OmegaConf.load(path)))
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ValueError(f"{where}: malformed YAML: {e.problem or e.context}; fix the recipe there") from None
        except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
            raise ValueError(f"recipe {path}: not a YAML mapping of config keys ({str(e).splitlines()[0]})") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must be key=value, got {bad}; keys: {keys}")
    try:
        layers.append(("overrides", OmegaConf.from_dotlist(list(overrides))))
    except yaml.YAMLError as e:  # a value YAML cannot read, e.g. an unquoted `a:b` inside {...}
        raise ValueError(f"bad override among {list(overrides)}: not a YAML value ({str(e).splitlines()[0]}); quote "
                         f"it, or set nested keys one by one: teachers.math.path=tiny:teacher") from None
    merged = OmegaConf.structured(TrainConfig)
    try:
        for source, layer in layers:
            merged = OmegaConf.merge(merged, layer)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        message, key = str(e).splitlines()[0], getattr(e, "full_key", None) or getattr(e, "key", None)
        what = f"{source}: {key}: " if key else f"{source}: "
        known = f". Accepted keys: {keys}" if isinstance(e, ConfigKeyError) else ""  # the list helps a misspelt key only
        raise ValueError(f"bad config: {what}{message}{known}") from None
    return config.validate()
