"""A student cut from the teacher: keep a subset of its decoder layers (depth pruning).

    opd init-student --from TEACHER (--layers 0,6,12 | --keep K [--by importance]) --out DIR

Depth pruning as in NVIDIA's Minitron ("Compact Language Models via Pruning and Knowledge
Distillation", Muralidharan et al., 2024) and ShortGPT (Men et al., 2024): the student is the
teacher with whole decoder layers removed, so it shares the tokenizer, chat template, generation
config, embeddings and head, and starts far closer to the teacher than a random model. The
student is built fresh by `from_config` with `num_hidden_layers = K` and the kept layers' weights
copied in under new indices, so every attention module's `layer_idx` runs 0..K-1 and a KV cache
indexes it as any K-layer model. Generic over Llama-style models (`model.model.layers`); per-layer
config lists (e.g. Qwen's `layer_types`) are cut with the layers.

`--by importance` scores each layer by how much the teacher's own next-token distribution moves
when that one layer is skipped (its output replaced by its input): the mean per-position
KL(P_teacher || P_teacher without layer i), in nats/token, on a few fixed chat prompts followed
by the teacher's greedy reply. It needs no labels, is 0 exactly for a layer that is an identity,
and measures what distillation has to recover; layers are kept by score, highest first. Minitron
ranks layers by the LM-loss change; ShortGPT by the cosine distance of a layer's input and output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.models import resolve
from opd.rollout import Sampling
from opd.rollout.hf import HFRolloutEngine
from opd.tokenization import render_prompt, vocab_logits

# Fixed, varied prompts for the importance score: the shipped tasks' shapes and two chat questions.
IMPORTANCE_PROMPTS = ("12+34-5", "87-29+40",
                      "Tom has 3 boxes of 12 apples and gives away 7 apples. How many apples are left?",
                      "A train travels 60 km in 45 minutes. What is its speed in km per hour?",
                      "What is the capital of France?", "Write one sentence about the sea.")
REPLY_TOKENS = 24
REPORT = "pruned_from.json"


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """`model.model.layers`, checked against `config.num_hidden_layers`; a clear error for other layouts."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    n = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or n != len(layers):
        raise ValueError(f"cannot cut {type(model).__name__}: init-student needs a Llama-style decoder "
                         f"(model.model.layers with config.num_hidden_layers entries)")
    return layers


def even_layers(n_layers: int, keep: int) -> list[int]:
    """`keep` indices spread evenly over `n_layers`, the first and last layer included."""
    if not 1 <= keep <= n_layers:
        raise ValueError(f"--keep must be in [1, {n_layers}] (the teacher has {n_layers} layers), got {keep}")
    if keep == 1:
        return [n_layers - 1]
    return sorted({int(i * (n_layers - 1) / (keep - 1) + 0.5) for i in range(keep)})


def parse_layers(text: str, n_layers: int) -> list[int]:
    """`--layers 0,6,12` as sorted unique indices in [0, n_layers); a one-line error otherwise."""
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated layer indices like 0,6,12, got {text!r}") from None
    bad = [i for i in layers if not 0 <= i < n_layers]
    if not layers or bad or len(set(layers)) != len(layers):
        why = f"{bad} out of range" if bad else "empty" if not layers else "repeated indices"
        raise ValueError(f"--layers {text!r}: {why}; give distinct indices in [0, {n_layers - 1}] "
                         f"(the teacher has {n_layers} layers)")
    return sorted(layers)


def cut(model: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """A new model of the same class with only the decoder layers `keep` (in order), weights copied."""
    n = len(decoder_layers(model))
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(keep)
    for name, value in model.config.to_dict().items():  # per-layer lists (layer_types, ...) follow the layers
        if isinstance(value, list) and len(value) == n and name != "architectures":
            setattr(config, name, [value[i] for i in keep])
    student = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("model.layers."):
            old, rest = key.removeprefix("model.layers.").split(".", 1)
            if int(old) not in new_index:
                continue
            key = f"model.layers.{new_index[int(old)]}.{rest}"
        state[key] = tensor
    student.load_state_dict(state, strict=True)
    student.generation_config = model.generation_config
    return student


def _skip_output(module, args, kwargs, output):
    """Forward hook: the layer passes its input through, as if it were not there."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@torch.no_grad()
def layer_importance(model: torch.nn.Module, tokenizer, prompts=IMPORTANCE_PROMPTS,
                     reply_tokens: int = REPLY_TOKENS) -> list[float]:
    """Per layer: mean KL(P_full || P_without_layer) in nats/token over every position of the fixed texts."""
    layers = decoder_layers(model)
    model.eval()
    rendered = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    greedy = Sampling(greedy=True, max_new_tokens=reply_tokens)
    texts = [r.prompt_ids + r.completion_ids for r in HFRolloutEngine(model, tokenizer).generate(rendered, 1, greedy, 0)]
    width = max(map(len, texts))
    tokens_B_L = torch.zeros(len(texts), width, dtype=torch.long)
    mask_B_L = torch.zeros_like(tokens_B_L)
    for row, ids in enumerate(texts):  # right padding; padded positions are left out of the mean
        tokens_B_L[row, : len(ids)], mask_B_L[row, : len(ids)] = torch.tensor(ids), 1
    device = next(model.parameters()).device
    tokens_B_L, mask_B_L = tokens_B_L.to(device), mask_B_L.to(device)

    def logprobs() -> torch.Tensor:  # (B, L, V) fp32 over the tokenizer's ids
        logits = model(input_ids=tokens_B_L, attention_mask=mask_B_L, use_cache=False).logits
        return torch.log_softmax(vocab_logits(logits, len(tokenizer)).float(), dim=-1)

    full_B_L_V = logprobs()
    active = mask_B_L.bool()
    scores = []
    for layer in layers:
        handle = layer.register_forward_hook(_skip_output, with_kwargs=True)
        try:
            skipped_B_L_V = logprobs()
        finally:
            handle.remove()
        kl_B_L = (full_B_L_V.exp() * (full_B_L_V - skipped_B_L_V)).sum(-1)
        scores.append(kl_B_L[active].mean().item())
    return scores


def by_importance(scores: list[float], keep: int) -> list[int]:
    """The `keep` highest-scoring layers in network order; ties go to the lower index (deterministic)."""
    even_layers(len(scores), keep)  # the range check
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:keep])


def init_student(teacher: str, out: str | Path, layers: str | None = None, keep: int | None = None,
                 by: str = "even") -> dict:
    """Cut `teacher` into a student folder at `out` (weights, tokenizer, chat template, generation config)."""
    out = Path(out)
    if (layers is None) == (keep is None):
        raise ValueError("give exactly one of --layers I,J,... and --keep K")
    if by not in ("even", "importance") or (by == "importance" and layers is not None):
        raise ValueError(f"--by {by!r}: use --by even or --by importance, and only with --keep K")
    if (out / "config.json").exists():
        raise ValueError(f"--out {str(out)!r} already holds a model; choose a new folder or delete it")
    folder = resolve(teacher)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--from {teacher!r} is not a model folder (no config.json there)")
    saved = json.loads((folder / "config.json").read_text())
    n, saved_dtype = saved.get("num_hidden_layers"), saved.get("dtype", "float32")
    if not isinstance(n, int):
        raise ValueError(f"--from {teacher!r}: its config.json has no num_hidden_layers; init-student cuts "
                         f"Llama-style decoders only")
    kept = parse_layers(layers, n) if layers is not None else even_layers(n, keep)  # checked before loading
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # scores in fp32
    tokenizer = AutoTokenizer.from_pretrained(folder)
    decoder_layers(model)
    scores = None
    if by == "importance":
        scores = layer_importance(model, tokenizer)
        kept = by_importance(scores, keep)
    student = cut(model, kept).to(getattr(torch, saved_dtype))
    student.save_pretrained(out)  # saved in the dtype the teacher came in
    tokenizer.save_pretrained(out)
    report = {"teacher": teacher, "teacher_layers": n, "kept_layers": kept, "by": "layers" if layers else by,
              "importance_kl_nats_per_token": scores, "parameters": sum(p.numel() for p in student.parameters()),
              "teacher_parameters": sum(p.numel() for p in model.parameters())}
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_init_student(teacher, out, layers, keep, by) -> None:
    """`opd init-student`: cut, save, and say what was kept."""
    r = init_student(teacher, out, layers, keep, by)
    print(f"{out}: {len(r['kept_layers'])} of {r['teacher_layers']} layers of {teacher} ({r['by']}): "
          f"{r['kept_layers']}; {r['parameters']:,} parameters (teacher {r['teacher_parameters']:,})")
    if r["importance_kl_nats_per_token"]:
        print("importance, KL(teacher || teacher without layer i) nats/token: "
              + ", ".join(f"{i}:{s:.3g}" for i, s in enumerate(r["importance_kl_nats_per_token"])))
