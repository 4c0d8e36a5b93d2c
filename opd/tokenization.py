"""Chat rendering and teacher/student tokenizer compatibility (docs/design.md §5)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

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
    The pad token is not compared: opd never reads it (masks come from lengths, docs/design.md §3), so
    both lacking one, or one tokenizer padding with its eos, is fine.
    """
    for name in ("bos_token", "eos_token", "unk_token"):
        t, s = getattr(teacher, f"{name}_id"), getattr(student, f"{name}_id")
        if t != s:
            t_str, s_str = getattr(teacher, name), getattr(student, name)
            fix = (f"set the student's {name} to the teacher's ({t_str!r}) in its tokenizer_config.json"
                   if t is not None and t_str in student.get_vocab() else
                   f"set the teacher's {name} to the student's ({s_str!r}) in its tokenizer_config.json"
                   if s is not None and s_str in teacher.get_vocab() else "use one tokenizer family for both")
            raise ValueError(f"tokenizers disagree on {name}_id: teacher {t} ({t_str!r}), student {s} ({s_str!r}); "
                             f"{fix}")
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
    every softmax; docs/design.md §5 forms each distribution over the tokenizer range only, so a
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


_SAID_PAD: set[int] = set()


def pad_id(tokenizer) -> int:
    """The id opd fills padding with: the tokenizer's pad, else its eos, else 0.

    Any id will do: masks come from prompt and completion lengths, never from ids (docs/design.md §3),
    so a tokenizer needs no pad token. Said once per id when the tokenizer has none.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    fill = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if fill not in _SAID_PAD:
        _SAID_PAD.add(fill)
        log.info("the tokenizer has no pad token; opd pads with id %d internally (masks come from lengths)", fill)
    return fill


def stop_token_ids(tokenizer, generation_config=None, extra: Iterable[int] = ()) -> tuple[int, ...]:
    """Every id that ends a sample: the tokenizer's eos, each `generation_config.eos_token_id` (int or list), `extra`.

    Llama-3 ends a turn with `<|eot_id|>`, Qwen with `<|im_end|>` or `<|endoftext|>`: only the
    generation config lists them all, and vLLM stops on it, so both engines must.
    """
    ids = set(int(i) for i in extra)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    listed = getattr(generation_config, "eos_token_id", None)
    if listed is not None:
        ids.update(int(i) for i in ([listed] if isinstance(listed, int) else listed))
    if not ids:
        raise ValueError("no stop token: the tokenizer has no eos token and the generation config lists none; "
                         "set stop_token_ids=[ID] (the id that ends an assistant turn)")
    size = len(tokenizer)
    if out := sorted(i for i in ids if not 0 <= i < size):
        raise ValueError(f"stop token ids {out} are outside the tokenizer's range [0, {size}); fix stop_token_ids")
    return tuple(sorted(ids))
