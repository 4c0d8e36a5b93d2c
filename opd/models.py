"""Loading the teacher and student exactly as a user loads real checkpoints.

`from_pretrained` from local folders (the bundled pair resolves `tiny:teacher` /
`tiny:student` to folders inside the package); the teacher is frozen, dropout is off in
both (every dropout probability of the config, not only `nn.Dropout` modules), and the two
tokenizers are checked for compatibility before anything trains. Each model is checked at load:
finite weights, and a tiny train-mode forward, run twice, that gives finite and equal logits.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from opd.grads import accumulate_in_place
from opd.lora import apply_lora
from opd.precision import checkpoint_dtype, set_compute_dtype, torch_dtype
from opd.teacher import REMOTE_BACKENDS
from opd.teacher.hf import freeze
from opd.teacher.routed import Teachers
from opd.self_teacher import make_self_teacher
from opd.teachers import SELF, teacher_specs, uses_self
from opd.tokenization import check_tokenizers_compatible, stop_token_ids

log = logging.getLogger(__name__)

TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny"


def resolve(path: str) -> Path:
    """A model folder: `tiny:NAME` is the bundled model NAME, anything else a local path."""
    if path.startswith("tiny:"):
        return TINY_DIR / path.removeprefix("tiny:")
    return Path(path)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def is_dropout_field(name: str, value) -> bool:
    """A config attribute holding a dropout probability: a float named `*dropout*` or `*pdrop`."""
    return isinstance(value, float) and not isinstance(value, bool) and ("dropout" in name or name.endswith("pdrop"))


def without_dropout(config: PretrainedConfig) -> PretrainedConfig:
    """`config` with every dropout probability set to 0, nested sub-configs included (in place; returned).

    Llama, Qwen and others apply `attention_dropout` functionally when `model.training`, with no
    `nn.Dropout` module to switch off; a policy with dropout is not the policy that sampled.
    """
    for name, value in list(vars(config).items()):
        if is_dropout_field(name, value) and value != 0.0:
            setattr(config, name, 0.0)
        elif isinstance(value, PretrainedConfig):
            without_dropout(value)
    return config


def save_dtype(config) -> str:
    """The dtype `final/` is saved in: `save_dtype`, else the dtype the student checkpoint came in."""
    return config.save_dtype or checkpoint_dtype(AutoConfig.from_pretrained(resolve(config.student)))


def load_model(path: str, dtype: str = "float32", device: str = "cpu", compute_dtype: str | None = None,
               name: str = "model") -> torch.nn.Module:
    """A causal LM from its folder: weights in `dtype`, the backbone computing in `compute_dtype` (default: `dtype`).

    Dropout is off for real (config probabilities and modules); `check_loaded` then names `name`
    (student/teacher) if a weight or the logits of a tiny forward are not finite.
    """
    config = without_dropout(AutoConfig.from_pretrained(resolve(path)))
    model = AutoModelForCausalLM.from_pretrained(resolve(path), config=config, dtype=torch_dtype(dtype))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = model.to(pick_device(device))
    set_compute_dtype(model, compute_dtype or dtype)
    check_loaded(model, name)
    return model


@torch.no_grad()
def check_loaded(model: torch.nn.Module, name: str) -> None:
    """Raise ValueError naming `name` on a non-finite weight, non-finite logits, or a forward that is not deterministic.

    The forward is one 8-token row in train mode, run twice: any dropout left on makes the two differ
    (by up to 3.9 in the logits at attention_dropout=0.1), and a NaN/inf weight the weight scan
    missed (a buffer, an overflow in bf16) shows in the logits.
    """
    for param_name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            bad = int((~torch.isfinite(param)).sum())
            raise ValueError(f"{name}: weight {param_name!r} has {bad} non-finite values (NaN or inf) of "
                             f"{param.numel()}; the checkpoint is damaged: re-download or re-save it")
    was_training = model.training
    model.train()
    try:
        device = next(model.parameters()).device
        ids_1_S = torch.arange(8, device=device)[None] % model.get_input_embeddings().weight.shape[0]
        first, second = (model(input_ids=ids_1_S).logits.float() for _ in range(2))
    finally:
        model.train(was_training)
    if not torch.isfinite(first).all():
        raise ValueError(f"{name}: the logits of a first forward are not finite (NaN or inf) although every weight is; "
                         f"the model overflows in this dtype: load it with dtype=float32")
    if not torch.allclose(first, second, rtol=1e-4, atol=1e-4):
        raise ValueError(f"{name}: two train-mode forwards of one input differ by up to "
                         f"{(first - second).abs().max().item():.3g}: something random (dropout?) is still on in "
                         f"{type(model).__name__}; opd trains the sampling policy, which must be deterministic")


def load_tokenizer(path: str):
    """The tokenizer of a model folder; a missing pad token is fine (see `pad_id`)."""
    return AutoTokenizer.from_pretrained(resolve(path))


def load_teachers(config, tokenizer=None) -> Teachers:
    """The run's teachers by route name (opd/teachers.py), each checked against the student's `tokenizer`.

    A teacher that runs elsewhere (backend vllm|served) is its config only: no weights load here. One
    folder named by several routes with the same backend, dtype and device is loaded once. Each in-process
    teacher's generation config is given the run's whole stop set, as the student's.
    """
    specs, loaded, models, tokenizers = teacher_specs(config), {}, {}, {}
    for name, spec in specs.items():
        if spec.path == SELF:  # the student itself: `load_models` fills it in once the student is loaded
            models[name], tokenizers[name] = None, tokenizer
            continue
        label = "teacher" if len(specs) == 1 else f"teacher {name!r}"
        dtype = spec.dtype or config.dtype
        key = (str(resolve(spec.path).resolve()), spec.backend in REMOTE_BACKENDS, dtype, spec.device)
        if key not in loaded:
            teacher_tokenizer = load_tokenizer(spec.path)
            if tokenizer is not None:
                check_compatible(teacher_tokenizer, tokenizer, label if len(specs) > 1 else None)
            if spec.backend in REMOTE_BACKENDS:
                teacher = AutoConfig.from_pretrained(resolve(spec.path))
            else:
                teacher = freeze(load_model(spec.path, dtype, spec.device, compute_dtype=config.dtype, name=label))
                teacher.generation_config.eos_token_id = list(stop_token_ids(
                    teacher_tokenizer, teacher.generation_config, config.stop_token_ids))
            loaded[key] = teacher, teacher_tokenizer
        models[name], tokenizers[name] = loaded[key]
    return Teachers(specs, models, tokenizers)


def check_compatible(teacher_tokenizer, tokenizer, label: str | None) -> None:
    """`check_tokenizers_compatible`, its error naming the teacher (`label`) when the run has several."""
    try:
        check_tokenizers_compatible(teacher_tokenizer, tokenizer)
    except ValueError as e:
        if label is None:
            raise
        raise ValueError(f"{label}: {e}") from None


def load_student(config, tokenizer) -> torch.nn.Module:
    """The trainable student: fp32 weights whatever `config.dtype` (the compute precision, opd/precision.py),
    the run's stop set in its generation config, gradient checkpointing and a LoRA adapter when asked, and
    its `[V, H]` gradients added in place (`opd.grads.accumulate_in_place`)."""
    student = load_model(config.student, "float32", config.device, compute_dtype=config.dtype, name="student")
    student.generation_config.eos_token_id = list(stop_token_ids(tokenizer, student.generation_config,
                                                                 config.stop_token_ids))
    if config.gradient_checkpointing:  # non-reentrant: works with frozen inputs and under autocast
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student = apply_lora(student, config.lora_rank, config.lora_alpha, config.lora_targets)
    accumulate_in_place(student)  # its [V, H] embedding and head gradients straight into .grad (opd/grads.py)
    student.train()
    return student


def load_models(config) -> tuple[Teachers, torch.nn.Module, object]:
    """(the teachers, the trainable student, the student's tokenizer): every tokenizer checked before any weight loads.

    A `teacher=self` route gets the student's `SelfTeacher` (opd/self_teacher.py): a copy of the student
    as loaded, or the student itself (`self_teacher=live`); no second model is read from disk.
    """
    tokenizer = load_tokenizer(config.student)
    teachers = load_teachers(config, tokenizer)
    student = load_student(config, tokenizer)
    if uses_self(config):
        own = make_self_teacher(config, student)
        models = {name: own.model if spec.path == SELF else teachers.models[name] for name, spec in teachers.specs.items()}
        teachers = dataclasses.replace(teachers, models=models, own=own)
    return teachers, student, tokenizer


def load_pair(config) -> tuple[torch.nn.Module, torch.nn.Module, object, object]:
    """(frozen teacher, trainable student, student tokenizer, teacher tokenizer) of a one-teacher run."""
    teachers, student, tokenizer = load_models(config)
    teacher, teacher_tokenizer = teachers.only()
    return teacher, student, tokenizer, teacher_tokenizer
