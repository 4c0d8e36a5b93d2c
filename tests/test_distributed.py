"""Two CPU processes (gloo) against one: the same global batch gives the same gradient."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from opd import distributed
from opd.config import load_config
from opd.models import load_model
from opd.train import train_step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(tokenizer):
    """A fixed batch of real student samples with real teacher scores, built once in the parent."""
    from opd.rollout import Sampling
    from opd.rollout.hf import HFRolloutEngine
    from opd.tasks import arithmetic_examples
    from opd.teacher.hf import HFTeacherScorer
    from opd.tokenization import render_prompt

    prompts = [render_prompt(tokenizer, ex.prompt) for ex in arithmetic_examples(4, "test")]
    rollouts = HFRolloutEngine(load_model("tiny:student"), tokenizer).generate(prompts, 2, Sampling(max_new_tokens=16), 5)
    scores = HFTeacherScorer(load_model("tiny:teacher")).score(rollouts, temperature=1.0)
    return rollouts, scores


def gradient(batch, config, num_tokens, d, fsdp=False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    student = load_model("tiny:student")
    if fsdp:
        distributed.shard_model(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: keep the gradient, not the update
    grads = {}

    def keep(_):  # a sharded gradient is gathered whole (a collective: both ranks run this hook)
        grads.update({n: (p.grad.full_tensor() if fsdp else p.grad).clone() for n, p in student.named_parameters()})

    optimizer.register_step_pre_hook(lambda *args: keep(None))
    train_step(student, optimizer, batch, config, num_tokens, d)
    return grads


def worker(rank: int, port: int, path: str, fsdp: bool):
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank)}
    torch.set_num_threads(1)
    from opd.batch import collate

    d = distributed.init()
    rollouts, scores, pad_id = torch.load(path + ".in", weights_only=False)
    mine = distributed.shard(list(range(len(rollouts))), d)  # rows 0,2,4,.. on rank 0; 1,3,5,.. on rank 1
    batch = collate([rollouts[i] for i in mine], [scores[i] for i in mine], pad_id)
    num_tokens = int(distributed.all_sum(batch.num_tokens, d))
    config = load_config(None, ["micro_batch_size=3", "grad_clip=0"])
    grads = gradient(batch, config, num_tokens, d, fsdp)
    if d.main:
        torch.save(grads, path + ".out")
    distributed.close(d)


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp2"])
def test_two_process_gradient_equals_the_single_process_gradient(tmp_path, tokenizer, fsdp):
    # Each rank's loss divides by the global token count, so the rank gradients SUM to the
    # single-process one: by one flat all-reduce, or by FSDP2's reduce-scatter set to SUM.
    from opd.batch import collate

    rollouts, scores = global_batch(tokenizer)
    path = str(tmp_path / "batch")
    torch.save((rollouts, scores, tokenizer.pad_token_id), path + ".in")
    mp.spawn(worker, args=(free_port(), path, fsdp), nprocs=2, join=True)
    two = torch.load(path + ".out")
    batch = collate(rollouts, scores, tokenizer.pad_token_id)
    one = gradient(batch, load_config(None, ["micro_batch_size=8", "grad_clip=0"]), batch.num_tokens, distributed.Dist())
    assert any(g.abs().sum() > 0 for g in one.values())
    for name, g in one.items():
        torch.testing.assert_close(two[name], g, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp2"])
def test_torchrun_two_processes_train_checkpoint_and_resume(tmp_path, fsdp):
    out = tmp_path / "run"
    common = [f"fsdp={str(fsdp).lower()}", "prompts_per_step=4", "completions_per_prompt=2", "max_new_tokens=16", "eval_size=4", "train_size=32",
              "progress=false", "log_samples=0", "eval_every=0", "save_every=1", f"out_dir={out}"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "opd", "train", *common, *args]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    torchrun("steps=2")
    assert (out / "checkpoints" / "step_000002" / "model" / "model.safetensors").is_file()
    torchrun("steps=3", "resume=true")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]  # rank 0 alone logged, each step once
    assert all(r["train/active_tokens"] > 0 for r in records[1:])
    assert (out / "final" / "model.safetensors").is_file()
