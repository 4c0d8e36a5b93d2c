"""LoRA students (#18): a low-rank adapter on the student's linear layers, trained alone.

The adapter is injected into the `transformers` model itself (`peft.inject_adapter_in_model`),
not wrapped in a `PeftModel`, so the student stays the object every other module knows:
`student.model` is still its backbone (now with adapted layers), the HF rollout engine samples
from this very module (adapter included), and `opd.forward.model_head` sees the head as it is.
With the default targets ("all-linear": every linear layer of the decoder, never the `lm_head`)
the head is a plain `nn.Linear` (the linear head of `opd.heads`); a target list that adapts the
head turns it into a LoRA layer, which goes through the same kernels as a module head.

On disk (`save_student`): a LoRA student is saved as the merged model, `W + (alpha / r) B A`, a
plain `from_pretrained` folder that needs no peft, plus `adapter/` (`adapter_config.json` and
`adapter_model.safetensors`, as `PeftModel.save_pretrained` writes them). Resume loads only the
adapter back (`load_adapter`): the base weights are frozen, so they are the student's own.
Dropout on the adapter is 0 (docs/design.md §7: every dropout is off). peft is imported here only.
"""

from __future__ import annotations

from pathlib import Path

import torch

ADAPTER_DIR = "adapter"  # inside a saved student folder
_ADAPTER = "default"  # peft's adapter name; a student has one
_PREFIX = "base_model.model."  # PeftModel's key prefix, so `PeftModel.from_pretrained` reads our adapter


def _peft():
    try:
        import peft
    except ImportError:
        raise ValueError("lora_rank > 0 needs peft: pip install 'opd[lora]' (or set lora_rank=0)") from None
    return peft


def apply_lora(model: torch.nn.Module, rank: int, alpha: float, targets: str = "all-linear") -> torch.nn.Module:
    """`model` with a rank-`rank` adapter on `targets`, only the adapter trainable; unchanged when `rank` is 0.

    `targets`: "all-linear" or comma-separated module names (peft's `target_modules`, e.g. "q_proj,v_proj").
    The adapter's weights are fp32 whatever the base dtype (they are the trained weights).
    """
    if rank == 0:
        return model
    peft = _peft()
    names = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0, bias="none",
                             base_model_name_or_path=str(getattr(model, "name_or_path", "") or ""))
    try:
        peft.inject_adapter_in_model(config, model)
    except ValueError as error:  # e.g. a target name the model does not have
        raise ValueError(f"lora_targets={targets!r}: {str(error).splitlines()[0]}; use all-linear or names of the "
                         f"student's linear layers") from None
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert "lora_" in name, f"{name} is trainable but no adapter weight"
            parameter.data = parameter.data.float()
    return model


def is_lora(model: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft.tuners.lora") for m in model.modules())


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer updates: every parameter of a full student, the adapter of a LoRA one."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict: each adapted weight is `W + ΔW` (peft's `get_delta_weight`), names as before.

    The student is left as it is (merging in place and back would change `W` by rounding, and resume
    must be bit-exact); only the adapted matrices are new tensors. A full student: its `state_dict()`.
    """
    if not is_lora(model):
        return model.state_dict()
    from peft.tuners.lora import LoraLayer

    deltas = {f"{name}.base_layer.weight": module.get_delta_weight(_ADAPTER) for name, module in model.named_modules()
              if isinstance(module, LoraLayer)}
    merged = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        if key in deltas:
            value = (value.float() + deltas.pop(key).float()).to(value.dtype)
        merged[key.replace(".base_layer.", ".")] = value
    assert not deltas, f"adapted weights without a base weight: {sorted(deltas)[:3]}"
    return merged


def save_student(model: torch.nn.Module, folder: str | Path) -> None:
    """`model.save_pretrained(folder)`; a LoRA student as its merged model plus `folder/adapter/`."""
    folder = Path(folder)
    if not is_lora(model):
        model.save_pretrained(folder)
        return
    model.save_pretrained(folder, state_dict=merged_state_dict(model))
    save_adapter(model, folder / ADAPTER_DIR)


def save_adapter(model: torch.nn.Module, folder: str | Path) -> None:
    """The adapter as `PeftModel.save_pretrained` writes it: `adapter_config.json` + `adapter_model.safetensors`."""
    peft = _peft()
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config[_ADAPTER].save_pretrained(folder)
    state = peft.get_peft_model_state_dict(model, adapter_name=_ADAPTER)
    save_file({_PREFIX + k: v.detach().contiguous() for k, v in state.items()}, folder / "adapter_model.safetensors")


def load_adapter(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy a saved adapter (`save_adapter`) into the LoRA student `model`, every adapter weight exactly once."""
    peft = _peft()
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise ValueError(f"{path} is missing: this checkpoint holds no LoRA adapter (was it saved with lora_rank=0?)")
    state = {k.removeprefix(_PREFIX): v for k, v in load_file(path).items()}
    expected = peft.get_peft_model_state_dict(model, adapter_name=_ADAPTER)
    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        raise ValueError(f"the adapter in {folder} does not fit this student (lora_rank / lora_targets changed?): "
                         f"{len(state)} tensors saved, {len(expected)} expected")
    result = peft.set_peft_model_state_dict(model, state, adapter_name=_ADAPTER)
    assert not result.unexpected_keys, result.unexpected_keys
