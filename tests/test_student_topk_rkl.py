"""loss=student_topk_rkl: the exact reverse KL over the student's top-K ids plus one tail bucket (issue #23)."""

import math

import pytest
import torch

from opd.rollout import Sampling
from opd.rollout.hf import HFRolloutEngine
from opd.tasks import arithmetic_examples
from opd.tokenization import render_prompt


def prompts(tokenizer, n=3):
    return [render_prompt(tokenizer, ex.prompt) for ex in arithmetic_examples(n, "test")]


@torch.no_grad()
def test_recorded_ids_are_the_topk_of_the_students_recomputed_logprobs(student, tokenizer):
    # The ids come from the distribution each token was drawn from (z / τ): the trainer's recomputation on the
    # sampled sequence ranks the same ids first, in order (τ > 0 never changes a ranking).
    student.eval()
    sampling = Sampling(temperature=0.7, max_new_tokens=10, record_topk=5)
    rollouts = HFRolloutEngine(student, tokenizer).generate(prompts(tokenizer), 2, sampling, seed=1)
    for r in rollouts:
        assert len(r.sampler_topk_ids) == len(r.completion_ids) and all(len(ids) == 5 for ids in r.sampler_topk_ids)
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        logprobs_R_V = torch.log_softmax(student(input_ids=ids).logits[0, len(r.prompt_ids) - 1 : -1].float() / 0.7, -1)
        assert torch.equal(torch.tensor(r.sampler_topk_ids), logprobs_R_V.topk(5, dim=-1).indices)
    plain = HFRolloutEngine(student, tokenizer).generate(prompts(tokenizer), 2, Sampling(temperature=0.7,
                                                                                        max_new_tokens=10), seed=1)
    assert [r.completion_ids for r in plain] == [r.completion_ids for r in rollouts]  # recording draws nothing
    assert all(r.sampler_topk_ids is None for r in plain)
    with pytest.raises(ValueError, match="exceeds the student's vocabulary"):
        HFRolloutEngine(student, tokenizer).generate(prompts(tokenizer, 1), 1,
                                                     Sampling(max_new_tokens=2, record_topk=len(tokenizer) + 1), seed=0)
