"""The objectives of opd/objectives.py: PPO-clip when one batch takes several optimizer steps."""

import math

import pytest
import torch

from opd.batch import collate
from opd.config import load_config
from opd.objectives import make_objective, sampled_token_logprobs
from opd.teacher import TeacherScores
from opd.types import Rollout


class _Config:
    """The loaded config with `updates_per_batch` set (whether or not TrainConfig has the field yet)."""

    def __init__(self, base, **fields):
        self._base, self._fields = base, fields

    def __getattr__(self, name):
        return self._fields[name] if name in self._fields else getattr(self._base, name)


def _batch(student, tokenizer, sampler_shift, teacher_shift):
    prompt, completion = tokenizer.encode("3-1=", add_special_tokens=False), [20, 21]
    probe = collate([Rollout(prompt, completion, [0.0, 0.0], "stop", 0)], [TeacherScores(torch.zeros(2))],
                    tokenizer.pad_token_id)
    with torch.no_grad():
        lp = sampled_token_logprobs(student, probe, load_config(None, []))[probe.loss_mask_B_T > 0]
    p = lp + torch.tensor(sampler_shift)
    rollout = Rollout(prompt, completion, p.tolist(), "stop", 0)
    return collate([rollout], [TeacherScores(p + torch.tensor(teacher_shift))], tokenizer.pad_token_id)


def test_several_updates_per_batch_take_the_clipped_loss_against_the_sampler(student, tokenizer):
    # Sampler p = log π - [0, 0.5] and teacher q = p + [1, 2], c = 1: A = -(p - q) = [1, 2], r = π/p = [1, e^0.5].
    # PPO (ε = 0.2): min(r A, clip(r, 0.8, 1.2) A) = [1, min(2 e^0.5, 2.4) = 2.4]; L = -(1 + 2.4) / 2 = -1.7.
    # The importance-sampling loss is -(1 + 2 e^0.5) / 2 instead; the clipped token gets no gradient.
    micro = _batch(student, tokenizer, [0.0, -0.5], [1.0, 2.0])
    base = load_config(None, [])
    ppo = make_objective(_Config(base, updates_per_batch=2))
    loss, metrics = ppo(student, micro, micro.num_tokens)
    assert loss.item() == pytest.approx(-1.7, abs=1e-4)
    assert metrics["opd/ppo_clip_fraction"].item() == pytest.approx(0.5)
    assert metrics["opd/ppo_ratio"].item() == pytest.approx((1 + math.exp(0.5)) / 2, abs=1e-4)
    is_loss, is_metrics = make_objective(_Config(base, updates_per_batch=1))(student, micro, micro.num_tokens)
    assert is_loss.item() == pytest.approx(-(1 + 2 * math.exp(0.5)) / 2, abs=1e-4) and "opd/ppo_ratio" not in is_metrics
    # only the unclipped first token carries the gradient: it equals that of -r_1 A_1 / 2 alone
    student.zero_grad()
    loss.backward()
    clipped = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    first = _batch(student, tokenizer, [0.0, -0.5], [1.0, 2.0])
    first.loss_mask_B_T[tuple(first.loss_mask_B_T.nonzero()[-1].tolist())] = 0.0
    ppo(student, first, 2)[0].backward()
    for got, want in zip(clipped, (p.grad for p in student.parameters()), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_every_configurable_loss_has_one_objective():
    from opd.config import LOSSES
    from opd.objectives import OBJECTIVES
    assert set(OBJECTIVES) == set(LOSSES)
