"""`teacher=self` (#24): the student is its own teacher, under the teacher (privileged) prompt.

No second model is read from disk. What the teacher's weights are, by `self_teacher`:

- `frozen`: a copy of the student taken when it is loaded (the step-0 weights; a resumed run takes the
  copy before the checkpoint loads, so it is still the step-0 weights). Memory: one copy.
- `snapshot`: the same copy, overwritten with the student's weights after every `self_teacher_every`-th
  optimizer step, so steps s+1 .. s+every are scored by the student as it was after step s. One copy.
- `ema`: the copy follows the student after every optimizer step, θ_T ← d·θ_T + (1 − d)·θ_S with
  d = `self_teacher_ema` (Polyak averaging, as BYOL's and DINO's target networks). One copy, fp32:
  a bf16 average would lose every update below bf16's resolution (opd/precision.py).
- `live`: the student itself, under no gradient (the teacher side is a stop-gradient target, as in every
  OPD loss). Memory: nothing more. Sound as an objective — its gradient moves the student's plain-prompt
  distribution toward its privileged-prompt one — but the target moves with every update, and an update
  that leaks into the privileged prompt's behaviour moves the teacher too; `frozen` has no such drift.

Only the student's trainable parameters are followed (a LoRA student's adapter): the frozen ones never
change, so they need no copy traffic. A snapshot or EMA teacher is saved beside each checkpoint
(`SELF_TEACHER_FILE`) and restored on resume, so a resumed run scores with the weights it would have had.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from opd.precision import set_compute_dtype, torch_dtype
from opd.teachers import SELF_TEACHER_MODES as MODES

SELF_TEACHER_FILE = "self_teacher.safetensors"


class SelfTeacher:
    """The teacher's module (`model`) for `teacher=self` and how it follows the student (`update`)."""

    def __init__(self, student: torch.nn.Module, mode: str = "frozen", every: int = 1, decay: float = 0.99,
                 dtype: str | None = None, compute_dtype: str = "float32"):
        if mode not in MODES:
            raise ValueError(f"self_teacher={mode!r} is not accepted; choose one of {', '.join(MODES)}")
        self.mode, self.every, self.decay = mode, every, decay
        if mode == "live":
            self.model = student
        else:
            self.model = copy.deepcopy(student)
            self.model.eval()
            self.model.requires_grad_(False)
            if dtype is not None:  # a frozen or snapshot copy in bf16: half the memory (as teacher_dtype)
                self.model.to(torch_dtype(dtype))
                set_compute_dtype(self.model, compute_dtype)  # its head's dtype changed with it
        # (name, teacher tensor, student tensor) of each trainable student parameter: what changes
        self.followed = [(name, t, s) for (name, s), t in zip(student.named_parameters(), self.model.parameters(),
                                                              strict=True) if s.requires_grad]

    @property
    def copies(self) -> bool:
        """Whether the teacher holds weights of its own (every mode but `live`)."""
        return self.mode != "live"

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Follow the student after optimizer step `step`; True when the teacher's weights changed."""
        if self.mode == "snapshot" and step % self.every == 0:
            torch._foreach_copy_([t for _, t, _ in self.followed], [s.detach() for _, _, s in self.followed])
            return True
        if self.mode == "ema":
            torch._foreach_lerp_([t for _, t, _ in self.followed], [s.detach() for _, _, s in self.followed],
                                 1.0 - self.decay)
            return True
        return False

    @property
    def moves(self) -> bool:
        """Whether the teacher's weights change during the run (snapshot, ema): then a checkpoint keeps them."""
        return self.mode in ("snapshot", "ema")

    def save(self, folder: Path) -> None:
        """The followed weights of a snapshot or EMA teacher, for resume (nothing for frozen and live)."""
        if self.moves:
            save_file({name: t.detach().contiguous().cpu() for name, t, _ in self.followed}, str(folder / SELF_TEACHER_FILE))

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        """Restore what `save` wrote (frozen and live: nothing to restore); a snapshot or EMA run resuming a
        checkpoint without the file (written by another mode) is refused, naming the file."""
        if not self.moves:
            return
        file = Path(folder) / SELF_TEACHER_FILE
        if not file.is_file():
            raise ValueError(f"checkpoint {folder} has no {SELF_TEACHER_FILE}: it was not written by a "
                             f"self_teacher={self.mode} run; resume it with the self_teacher it was trained with")
        saved = load_file(str(file))
        for name, t, _ in self.followed:
            t.copy_(saved[name])


def make_self_teacher(config, student: torch.nn.Module) -> SelfTeacher:
    """The `SelfTeacher` a `teacher=self` run's config asks for, built from the loaded student."""
    return SelfTeacher(student, config.self_teacher, config.self_teacher_every, config.self_teacher_ema,
                       dtype=config.teacher_dtype, compute_dtype=config.dtype)
