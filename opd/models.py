"""Loading the teacher and student exactly as a user loads real checkpoints.

`from_pretrained` from local folders (the bundled pair resolves `tiny:teacher` /
`tiny:student` to folders inside the package); the teacher is frozen, dropout is off in
both, and the two tokenizers are checked for compatibility before anything trains.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from opd.lora import apply_lora
from opd.teacher import REMOTE_BACKENDS
from opd.teacher.hf import freeze
from opd.tokenization import check_tokenizers_compatible

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


def load_model(path: str, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(resolve(path), dtype=getattr(torch, dtype))
    for module in model.modules():  # dropout off: the student is trained on its own, deterministic policy
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.to(pick_device(device))


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(resolve(path))
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer of {path!r} has no pad token; set one (e.g. tokenizer.pad_token = '<pad>') and save it")
    return tokenizer


def load_pair(config) -> tuple[torch.nn.Module, torch.nn.Module, object, object]:
    """(frozen teacher, trainable student, student tokenizer, teacher tokenizer).

    A teacher that runs elsewhere (teacher_backend=vllm|served, #18) is its config only: no weights load here.
    """
    tokenizer, teacher_tokenizer = load_tokenizer(config.student), load_tokenizer(config.teacher)
    check_tokenizers_compatible(teacher_tokenizer, tokenizer)
    if config.teacher_backend in REMOTE_BACKENDS:
        teacher = AutoConfig.from_pretrained(resolve(config.teacher))
    else:
        teacher = freeze(load_model(config.teacher, config.dtype, config.device))
    student = load_model(config.student, config.dtype, config.device)
    student = apply_lora(student, config.lora_rank, config.lora_alpha, config.lora_targets)
    student.train()
    return teacher, student, tokenizer, teacher_tokenizer
