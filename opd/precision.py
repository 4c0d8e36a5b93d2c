"""Compute precision (docs/design.md §7 "Precision"): fp32 weights and optimizer state, bf16 compute where asked.

`dtype=bfloat16` is a compute precision, not a storage one: the student's trainable weights and
AdamW's state stay fp32, because OPD learning rates (1e-6 to 1e-5) sit far below bf16's resolution
(a weight of 0.02 moves in steps of 1.2e-4 in bf16, so an in-place bf16 update of 1e-6 is lost).
The backbone of each model runs under `torch.autocast(bf16)` (CPU and CUDA); its output is cast to
the head's dtype, so the output projection, every log-softmax, logsumexp, divergence, advantage and
the optimizer run in fp32 for an fp32 model. An fp32 head is what MiniMax-M1 (2025, §3.2) found
necessary to keep the sampler's and the trainer's token probabilities equal; here it also means
the sampler (`model(...)`), the fused trainer (`backbone(...)` then `hidden @ W.T`) and the teacher
compute the same logits whichever path they take, so the on-policy ratio starts at 1.

The autocast lives on the backbone module itself (its `forward` is rebound, as accelerate's
mixed-precision wrapper does), so every caller, including gradient-checkpointing recomputation and
the shared-prompt forward of `opd/forward.py`, gets it without a flag passed down.
"""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not accepted; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(device: str) -> None:
    """Raise ValueError unless `device` exists here (called by config validation, before anything loads)."""
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"device={device!r} but CUDA is not available here (torch {torch.__version__}, {build}); "
                             f"use device=cpu or device=auto")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type != "cpu":
        raise ValueError(f"device={device!r} is not supported; use auto, cpu, cuda or cuda:N")


def bf16_units(device: str = "cpu") -> str | None:
    """The bf16 matrix units this machine has for `device`, in words, or None where bf16 would be emulated.

    CPU: Intel AMX (`amx_bf16`, a tile unit: ~4x fp32 matmul throughput measured here) or AVX-512-BF16
    (`avx512_bf16`, a dot-product instruction: less), from /proc/cpuinfo's flags (Linux; None elsewhere).
    CUDA: compute capability 8.0 (Ampere) and up.
    """
    if device.startswith("cuda"):
        return "tensor cores" if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8 else None
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return None
    units = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return " + ".join(units) or None


def _autocast_forward(self, *args, **kwargs):
    """The backbone's own forward under autocast, its last hidden state handed on in the head's dtype."""
    device_type = next(self.parameters()).device.type
    with torch.autocast(device_type, dtype=self._opd_compute_dtype):
        out = type(self).forward(self, *args, **kwargs)
    if getattr(out, "last_hidden_state", None) is not None and out.last_hidden_state.dtype != self._opd_head_dtype:
        out.last_hidden_state = out.last_hidden_state.to(self._opd_head_dtype)
    return out


def _head_forward(self, *args, **kwargs):
    """The output layer in its own weights' dtype, whatever autocast is on around it: the fp32 head stays fp32."""
    with torch.autocast(self.weight.device.type, enabled=False):
        return type(self).forward(self, *args, **kwargs)


def set_compute_dtype(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """Run `model`'s backbone under bf16 autocast when `dtype` is bfloat16 (a no-op for float32); returns `model`.

    The output layer is kept out of any autocast, the backbone's or one a caller opens around the
    whole model (`casts_cached`). Methods bound to the modules (not closures): `copy.deepcopy` rebinds
    them to the copy.
    """
    compute = torch_dtype(dtype)
    backbone = getattr(model, model.base_model_prefix, None)
    if backbone is None or backbone is model:
        raise ValueError(f"{type(model).__name__} has no backbone at `{model.base_model_prefix}`; "
                         "use dtype=float32 for this model")
    head = model.get_output_embeddings()
    if compute == torch.float32:
        backbone.__dict__.pop("forward", None)
        backbone.__dict__.pop("_opd_compute_dtype", None)
        if head is not None:
            head.__dict__.pop("forward", None)
        return model
    backbone._opd_compute_dtype = compute
    backbone._opd_head_dtype = head.weight.dtype
    backbone.forward = types.MethodType(_autocast_forward, backbone)
    head.forward = types.MethodType(_head_forward, head)
    return model


def casts_cached(model: torch.nn.Module):
    """A context over many forwards of `model` (a decode loop, an update's micro-batches) in which autocast
    casts each trainable weight once; the weights must not change inside it (close it before the optimizer).

    torch's autocast keeps the bf16 copy of a weight that requires grad until the outermost autocast
    context exits, enabled or not; the backbone opens one per forward, so a decode loop of N steps would
    cast the whole student N times (measured: 30% of a bf16 decode at scale (b), more than its matmuls
    saved). This context is an autocast that is *off*: the backbone's own is nested inside it, so the
    casts live until it closes and the values are the same bits, while everything outside the backbone
    (the heads, the kernels and their backward matmuls) runs as it would without it. A no-op for an fp32 model.
    """
    backbone = getattr(model, model.base_model_prefix, model)
    compute = getattr(backbone, "_opd_compute_dtype", None)
    if compute is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=compute, enabled=False)


def compute_dtype_of(model: torch.nn.Module) -> torch.dtype:
    """The precision `model`'s backbone computes in: the autocast dtype if set, else its weights' dtype."""
    backbone = getattr(model, model.base_model_prefix, model)
    return getattr(backbone, "_opd_compute_dtype", next(model.parameters()).dtype)


def checkpoint_dtype(config) -> str:
    """The dtype a checkpoint's weights came in, from its config (`dtype`, formerly `torch_dtype`); float32 if unsaid."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(value).removeprefix("torch.") if value is not None else "float32"
    return name if name in DTYPES else "float32"


def save_pretrained_as(model: torch.nn.Module, folder: Path, dtype: str) -> None:
    """`model.save_pretrained(folder)` with every floating tensor in `dtype`; the live model is not touched.

    Tied tensors stay tied (one cast per storage), and config.json says the dtype the weights are in,
    so `from_pretrained(folder, dtype="auto")` loads them as saved.
    """
    target = torch_dtype(dtype)
    casts: dict[tuple, torch.Tensor] = {}

    def cast(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or t.dtype == target:
            return t
        key = (t.data_ptr(), t.shape, t.stride())
        if key not in casts:
            casts[key] = t.detach().to(target)
        return casts[key]

    state_dict = {name: cast(t) for name, t in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state_dict)
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = dtype
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
