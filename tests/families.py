"""Tiny random-initialised checkpoints of real model families, saved as users' folders are (tests/test_families.py).

Each family gets the bundled tokenizer with its own special tokens and a chat template in that
family's style (Llama-3 headers, ChatML, [INST], Gemma turns, Phi-3 roles), pad == eos, a padded
embedding (more rows than tokens) and two eos ids in `generation_config`, as the real checkpoints
ship them (Llama-3: <|eot_id|> + <|end_of_text|>; Qwen: <|im_end|> + <|endoftext|>; Gemma: <eos> +
<end_of_turn>). Teacher and student share the family's architecture at different widths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

from opd.models import load_tokenizer

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
         "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PHI3 = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # a transformers config class
    template: str
    tokens: tuple[str, ...]  # special tokens the family's template needs
    eos: str  # the tokenizer's eos (and pad)
    second_eos: str  # the other id of generation_config.eos_token_id
    bos: str = "<|bos|>"
    fused: bool = True  # what supports_fused must answer
    extra: dict = field(default_factory=dict)  # config fields of the family


FAMILIES = {f.name: f for f in [
    Family("llama", "LlamaConfig", LLAMA3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<|end_of_text|>"), "<|eot_id|>", "<|end_of_text|>", bos="<|begin_of_text|>"),
    Family("llama_untied", "LlamaConfig", LLAMA3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<|end_of_text|>"), "<|eot_id|>", "<|end_of_text|>", bos="<|begin_of_text|>",
           extra={"tie_word_embeddings": False}),
    Family("qwen2", "Qwen2Config", CHATML, ("<|im_start|>", "<|im_end|>", "<|endoftext|>"), "<|im_end|>",
           "<|endoftext|>"),
    Family("qwen3", "Qwen3Config", CHATML, ("<|im_start|>", "<|im_end|>", "<|endoftext|>"), "<|im_end|>",
           "<|endoftext|>", extra={"head_dim": 16}),
    Family("mistral", "MistralConfig", MISTRAL, ("<s>", "</s>", "[INST]", "[/INST]"), "</s>", "<|eos|>", bos="<s>",
           extra={"sliding_window": None}),
    Family("gemma2", "Gemma2Config", GEMMA, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<end_of_turn>",
           "<eos>", bos="<bos>", fused=False,  # final_logit_softcapping: logits = 30 tanh(z / 30)
           extra={"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64, "final_logit_softcapping": 30.0,
                  "attn_implementation": "eager"}),
    Family("phi3", "Phi3Config", PHI3, ("<|end|>", "<|endoftext|>"), "<|end|>", "<|endoftext|>",
           extra={"original_max_position_embeddings": 256}),
]}


def build(family: Family, folder: Path) -> dict[str, Path]:
    """{"teacher": folder, "student": folder}: random weights, the family's tokenizer, two eos ids."""
    tokenizer = load_tokenizer("tiny:teacher")
    tokenizer.add_special_tokens({"additional_special_tokens": list(family.tokens)})
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = family.bos, family.eos, family.eos
    tokenizer.chat_template = family.template
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in (family.eos, family.second_eos)]
    assert len(set(eos_ids)) == 2 and all(i < len(tokenizer) for i in eos_ids), eos_ids
    vocab_size = (len(tokenizer) // 64 + 2) * 64  # a padded embedding: 64 to 127 rows that are no token
    paths = {}
    for seed, (name, hidden) in enumerate((("teacher", 64), ("student", 32))):
        torch.manual_seed(seed)
        config = getattr(transformers, family.config_class)(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, attention_dropout=0.0,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
            **({"tie_word_embeddings": True} | family.extra))
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids,
                                                   pad_token_id=tokenizer.pad_token_id)
        paths[name] = folder / f"{family.name}_{name}"
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths
