"""The student's [V, H] gradients added in place (opd/grads.py) against autograd's own, on the tiny pair."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opd.config import TrainConfig
from opd.forward import model_head
from opd.grads import accumulate_in_place, in_place_weight, plain_gradients
from opd.lora import apply_lora
from opd.models import load_model
from opd.train import make_optimizer, train_step
from test_precision import fixed_batch, step_gradients


@pytest.mark.parametrize("loss,dtype", [("reverse_kl", "float32"), ("topk_kl", "float32"), ("jsd", "float32"),
                                        ("reverse_kl", "bfloat16")])
def test_in_place_gradients_equal_autograds_over_micro_batches(tokenizer, teacher, loss, dtype):
    # The same batch through two copies of the tiny student (tied 2048 x 128 embedding, padding_idx 0), one with
    # the embedding lookup and the head adding into .grad, one through autograd; 16 rows in 4 micro-batches, so
    # the buffer made by the first writer is added to 7 more times (a lookup per micro-batch, each micro-batch's
    # head). JSD takes its head's gradient through autograd (made in its forward) while its lookup adds in place:
    # the two ways meet in one .grad. Only the order of the additions differs: fp32 rounding, measured at most
    # 3e-8 of the largest entry (the tolerance is 1e-6 of it; a lost row or micro-batch would be of its order).
    config = TrainConfig(loss=loss, micro_batch_size=4, lr=0.0, grad_clip=0.0, dtype=dtype, topk=8)
    plain = load_model("tiny:student", compute_dtype=dtype)
    fused = accumulate_in_place(load_model("tiny:student", compute_dtype=dtype))
    batch = fixed_batch(tokenizer, teacher, plain, **{"topk_kl": dict(topk=8), "jsd": dict(full_logits=True)}.get(loss, {}))
    head = model_head(teacher, len(tokenizer)) if loss == "jsd" else None
    want, got = (step_gradients(m, batch, config, tokenizer, head) for m in (plain, fused))
    assert batch.tokens_B_L.shape[0] == 16 and got.keys() == want.keys()
    embedding = "model.embed_tokens.weight"
    assert want[embedding].abs().max() > 0 and (batch.tokens_B_L == 0).any()  # padding id 0 occurs: its row gets none
    assert torch.equal(got[embedding][0], want[embedding][0])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6 * want[name].abs().max().item())


class DenseVH(TorchDispatchMode):
    """Counts ops whose output is a fresh tensor shaped like the [V, H] weight, and calls of the lookup's backward."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.fresh, self.lookup_backward = tuple(shape), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten.embedding_dense_backward.default:
            self.lookup_backward += 1
        inputs = {t.untyped_storage().data_ptr() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
        if (isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape
                and out.untyped_storage().data_ptr() not in inputs):  # new memory: not a view, not written in place
            self.fresh += 1
        return out


def test_in_place_makes_one_vh_buffer_a_step_where_autograd_makes_several_a_micro_batch(tokenizer, teacher):
    # What the change is for: with 4 micro-batches autograd makes, per micro-batch, the lookup's zero-filled
    # gradient (embedding_dense_backward) once per pass of the shared-prompt forward (prompts, then completions),
    # the head's product and their sums: >= 3 x 4 fresh [V, H] tensors (20 measured).
    # In place: one, the zeros the first writer makes, and the lookup's backward never runs (counted on a
    # second step: the first also makes AdamW's two [V, H] moments).
    config = TrainConfig(micro_batch_size=4, lr=0.0, grad_clip=0.0)
    counts = {}
    for name, model in (("plain", load_model("tiny:student")), ("fused", accumulate_in_place(load_model("tiny:student")))):
        batch = fixed_batch(tokenizer, teacher, model)
        optimizer, _ = make_optimizer(model, config)
        train_step(model, optimizer, batch, config, batch.num_tokens, vocab_size=len(tokenizer))  # AdamW's state made
        with DenseVH(model.get_input_embeddings().weight.shape) as seen:
            train_step(model, optimizer, batch, config, batch.num_tokens, vocab_size=len(tokenizer))
        counts[name] = (seen.fresh, seen.lookup_backward)
    assert counts["fused"] == (1, 0)
    assert counts["plain"][0] >= 12 and counts["plain"][1] == 2 * 4


def test_a_padded_vocabulary_gets_no_gradient_past_the_tokenizer_in_place(tokenizer, teacher):
    # 64 embedding rows past the tokenizer's 2048 ids (as Qwen pads to 151,936): the head kernel sees W[:2048] and
    # adds into .grad[:2048]; rows 2048.. get nothing, as autograd's slice backward gives them zeros.
    config = TrainConfig(micro_batch_size=8, lr=0.0, grad_clip=0.0)
    plain, fused = load_model("tiny:student"), load_model("tiny:student")
    for model in (plain, fused):
        model.resize_token_embeddings(len(tokenizer) + 64, mean_resizing=False)
    accumulate_in_place(fused)
    batch = fixed_batch(tokenizer, teacher, plain)
    want, got = (step_gradients(m, batch, config, tokenizer) for m in (plain, fused))
    name = "model.embed_tokens.weight"
    assert got[name].shape[0] == len(tokenizer) + 64 and not got[name][len(tokenizer):].any()
    torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6 * want[name].abs().max().item())


def test_what_keeps_autograds_path(tokenizer):
    # a frozen weight (a LoRA student's), plain_gradients (before FSDP) and a frozen deep copy (self_teacher=frozen)
    lora = accumulate_in_place(apply_lora(load_model("tiny:student"), 4, 8.0))
    assert in_place_weight(lora) is None and model_head(lora, len(tokenizer)).grad_into is None
    student = accumulate_in_place(load_model("tiny:student"))
    assert model_head(student, len(tokenizer)).grad_into is student.get_output_embeddings().weight
    frozen = copy.deepcopy(student).requires_grad_(False)
    assert frozen.get_input_embeddings().forward.__self__ is frozen.get_input_embeddings()
    assert in_place_weight(frozen) is None
    plain_gradients(student)
    assert "forward" not in vars(student.get_input_embeddings()) and in_place_weight(student) is None
