"""The optional vLLM section of the GPU check: a short training run with vLLM rollouts AND a vLLM teacher.

    python scripts/gpu_check_vllm.py [--steps 6] [--out /tmp/opd-gpu-vllm]

scripts/gpu-check.sh calls it when `import vllm` works; CI never runs it. Two random-initialised
Llama models (student 256 hidden x 4 layers, teacher 512 x 8, the bundled tokenizer) are saved to a
temporary folder; `opd.train` then runs `steps` steps of 16 prompts x 4 completions x 64 tokens with
rollout_backend=vllm and teacher_backend=vllm (both engines in this process, weights synced after
every step), and the script prints tokens/s, step times and peak GPU memory (torch's allocator, which
in-process engines use too). Exit codes: 0 ran, 1 failed, 3 skipped (no CUDA or no vLLM; it says which).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def skip(reason: str) -> int:
    print(f"vLLM check skipped: {reason}")
    return 3


def save_random_model(folder: Path, tokenizer, hidden: int, layers: int, seed: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        return skip("no CUDA device (vLLM needs a GPU)")
    try:
        import vllm
    except ImportError:
        return skip("vllm is not installed (pip install 'opd[vllm]' in a fresh environment; see docs/scaling.md)")

    from opd.config import load_config
    from opd.metrics import read_metrics
    from opd.models import load_tokenizer
    from opd.train import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = load_tokenizer("tiny:student")
        student = save_random_model(tmp / "student", tokenizer, hidden=256, layers=4, seed=0)
        teacher = save_random_model(tmp / "teacher", tokenizer, hidden=512, layers=8, seed=1)
        out = args.out or str(tmp / "run")
        config = load_config(None, [f"student={student}", f"teacher={teacher}", "rollout_backend=vllm",
                                    "teacher_backend=vllm", f"steps={args.steps}", "prompts_per_step=16",
                                    "completions_per_prompt=4", "max_new_tokens=64", "min_new_tokens=64",
                                    "eval_size=16", "eval_every=0", "save_every=0", "lr=1e-5", "progress=false",
                                    f"out_dir={out}"])
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            run_dir = train(config)
        except Exception as error:  # report, do not hide: this is the first run of these paths on a GPU
            print(f"vLLM check FAILED after {time.perf_counter() - start:.0f}s: {type(error).__name__}: {error}")
            raise
        wall = time.perf_counter() - start
        steps = [r for r in read_metrics(run_dir) if r["step"] > 0]
        timed = steps[1:] or steps  # the first step includes CUDA-graph capture and warm-up
        report = {
            "vllm": vllm.__version__, "torch": torch.__version__, "device": torch.cuda.get_device_name(),
            "steps": len(steps), "wall_s": round(wall, 1),
            "tokens_per_s": round(statistics.mean(r["perf/tokens_per_s"] for r in timed), 1),
            "generate_s": round(statistics.mean(r["perf/generate_s"] for r in timed), 3),
            "score_s": round(statistics.mean(r["perf/score_s"] for r in timed), 3),
            "train_s": round(statistics.mean(r["perf/train_s"] for r in timed), 3),
            "peak_gpu_gib_trainer": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "sampled_reverse_kl_first_last": [steps[0].get("opd/sampled_reverse_kl"),
                                              steps[-1].get("opd/sampled_reverse_kl")],
        }
    print("vLLM check (vLLM rollouts + vLLM teacher, 16 prompts x 4 x 64 tokens):")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
