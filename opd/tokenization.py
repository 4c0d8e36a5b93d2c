"""Chat rendering and teacher/student tokenizer compatibility (DESIGN.md §5)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """Token ids of a chat prompt in the tokenizer's own template, ready for the assistant turn."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_completion(tokenizer: PreTrainedTokenizerBase, text: str, add_eos: bool = True) -> list[int]:
    """Ids of an assistant completion (no special tokens added), ending in eos if asked."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids + [tokenizer.eos_token_id] if add_eos else ids


def check_tokenizers_compatible(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> None:
    """Raise ValueError naming the first mismatch unless the teacher's ids mean the same to the student.

    Every teacher token must exist in the student vocab with the same id, every student
    id below the teacher's size must map to the same string, and the special-token ids
    must agree. Extra student ids above the teacher's range are allowed (padded rows).
    """
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        t, s = getattr(teacher, name), getattr(student, name)
        if t != s:
            raise ValueError(f"tokenizers disagree on {name}: teacher {t}, student {s}; use the same tokenizer family")
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    student_by_id = {i: tok for tok, i in student_vocab.items()}
    for token, i in sorted(teacher_vocab.items(), key=lambda kv: kv[1]):
        if student_vocab.get(token) != i:
            where = "missing from" if token not in student_vocab else f"id {student_vocab[token]} in"
            raise ValueError(
                f"teacher token {token!r} (id {i}) is {where} the student vocab, where id {i} is "
                f"{student_by_id.get(i)!r}; teacher and student must share one tokenizer (the student may only add "
                f"tokens above id {max(teacher_vocab.values())})"
            )
    teacher_size = max(teacher_vocab.values()) + 1
    for i, token in sorted(student_by_id.items()):
        if i < teacher_size and teacher_vocab.get(token) != i:
            raise ValueError(f"student id {i} ({token!r}) has no same-id teacher token; tokenizers differ")

def vocab_logits(logits_lead_V: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """The logits of the tokenizer's ids `[0, vocab_size)` only (a view, no copy); all of them if None.

    Checkpoints often pad the embedding past the tokenizer (Qwen2.5: 151,936 rows for 151,665
    tokens) for matmul efficiency. Those rows are never a token, yet their logits would enter
    every softmax; DESIGN.md §5 forms each distribution over the tokenizer range only, so a
    padded model scores and trains exactly as the unpadded one.
    """
    if vocab_size is None or logits_lead_V.shape[-1] == vocab_size:
        return logits_lead_V  # no slice at all: a slice's backward allocates a zero-filled gradient as large as the logits
    if logits_lead_V.shape[-1] < vocab_size:
        raise ValueError(f"the model has {logits_lead_V.shape[-1]} output rows for a tokenizer of {vocab_size} "
                         "tokens; resize its embedding (model.resize_token_embeddings(len(tokenizer)))")
    return logits_lead_V[..., :vocab_size]


def check_embedding_covers_tokenizer(model, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Raise unless the model has an output row for every token id (more rows, a padded vocabulary, are fine).

    `model`: a loaded model, or only its config (a teacher served elsewhere): then `vocab_size` counts the rows.
    """
    if isinstance(model, torch.nn.Module):
        rows = model.get_output_embeddings().weight.shape[0]
    else:
        rows = model.get_text_config().vocab_size
    if rows < len(tokenizer):
        raise ValueError(f"{name}: the model has {rows} output rows but its tokenizer has {len(tokenizer)} tokens; "
                         f"resize the embedding (model.resize_token_embeddings(len(tokenizer))) and save it")
