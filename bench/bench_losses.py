"""Chunked vs naive full-vocabulary losses: time and peak extra memory of forward + backward, CPU fp32.

Four losses: the top-k forward KL and the JSD on `[B*T, V]` logits (`opd.losses`), and the training
kernels from hidden states and heads (`opd.kernels`), whose naive counterparts first form the logits
with the heads: `jsd_linear` (H = 384 student / 512 teacher as at bench_vs_trl's scale b) and
`topk_linear`, the top-k forward KL's student side (H = 384 at V = 32,768; at V = 151,936 H = 1,024 with
the head frozen, as under LoRA, so the `[V, H]` weight gradient, the same in both, is not counted).

    python bench/bench_losses.py [--quick] [--repeats R]

Each measurement runs in a fresh subprocess: it allocates the inputs, runs a tiny warm-up (kernel and
allocator initialisation), resets the kernel's peak-RSS counter (/proc/self/clear_refs), then times
one forward + backward. "peak extra" = peak RSS minus RSS after the inputs exist; it includes the
`[B*T, V]` gradient of the student logits, which both versions must produce, so the last column
also compares the memory beyond that gradient. Cases alternate chunked / naive, the table reports
medians. Workers use one thread (see `worker`). Writes bench/results/bench_losses.json
(bench_losses_<losses>.json with --only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "bench_losses.json"
SIZES_FULL = [(1024, 8192), (4096, 32768)]  # (B*T, V)
SIZES_TOPK_LINEAR = [(4096, 32768), (1024, 151936)]
SIZES_QUICK = [(256, 4096), (1024, 8192)]
K, BETA, TEMPERATURE, B = 20, 0.5, 0.7, 8


def _rss_kib() -> tuple[int, int]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


def naive_jsd(student_B_T_V, teacher_B_T_V, mask_B_T, num_tokens, beta, temperature):
    """TRL-style GKD JSD on whole tensors (what the chunked path replaces)."""
    import torch
    import torch.nn.functional as F
    log_s = F.log_softmax(student_B_T_V.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_B_T_V.float() / temperature, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)
    kl_t = F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1)
    return torch.where(mask_B_T != 0, beta * kl_t + (1 - beta) * kl_s, 0.0).sum() / num_tokens


def naive_topk_kl(student_B_T_V, ids_B_T_K, nu_B_T_K, mask_B_T, num_tokens, temperature):
    """open-instruct-style top-k forward KL through a full fp32 log-softmax."""
    import torch
    import torch.nn.functional as F
    ell = F.log_softmax(student_B_T_V.float() / temperature, dim=-1).gather(-1, ids_B_T_K)
    per_token = (nu_B_T_K.exp() * (nu_B_T_K - ell)).sum(-1)
    return torch.where(mask_B_T != 0, per_token, 0.0).sum() / num_tokens


LINEAR_H, LINEAR_TEACHER_H = 384, 512


def _make_inputs(loss: str, bt: int, V: int, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    if loss == "topk_linear":
        H = 1024 if V > 65536 else LINEAR_H
        hidden = torch.randn(bt, H, generator=g).requires_grad_(True)
        head = (torch.randn(V, H, generator=g) * 2 / H**0.5).requires_grad_(V <= 65536)
        teacher_logp = torch.log_softmax(torch.randn(bt, 4 * K, generator=g) * 3, dim=-1)
        nu, _ = teacher_logp.topk(K, dim=-1)
        return hidden, head, torch.randint(0, V, (bt, K), generator=g), nu, torch.ones(bt)
    if loss == "jsd_linear":  # logits of std ~2, as below
        hidden = torch.randn(bt, LINEAR_H, generator=g).requires_grad_(True)
        head = (torch.randn(V, LINEAR_H, generator=g) * 2 / LINEAR_H**0.5).requires_grad_(True)
        teacher_hidden = torch.randn(bt, LINEAR_TEACHER_H, generator=g)
        return hidden, head, teacher_hidden, torch.randn(V, LINEAR_TEACHER_H, generator=g) * 2 / LINEAR_TEACHER_H**0.5, \
            torch.ones(bt)
    T = bt // B
    student = (torch.randn(B, T, V, generator=g) * 2).requires_grad_(True)
    mask = torch.ones(B, T)
    if loss == "jsd":
        return student, torch.randn(B, T, V, generator=g) * 2, mask
    teacher_logp = torch.log_softmax(torch.randn(B, T, 4 * K, generator=g) * 3, dim=-1)
    nu, _ = teacher_logp.topk(K, dim=-1)  # a plausible top-k logprob profile
    return student, torch.randint(0, V, (B, T, K), generator=g), nu, mask


def _run(loss: str, impl: str, inputs, chunk_size: int):
    from opd.heads import linear_head
    from opd.kernels import gathered_logprobs
    from opd.kernels_jsd import jsd_loss
    from opd.losses import generalized_jsd_loss, topk_forward_kl_loss, topk_forward_kl_terms
    if loss == "topk_linear":
        hidden, head, ids, nu, mask = inputs
        n = mask.sum()
        if impl == "chunked":
            ell = gathered_logprobs(hidden, linear_head(head), ids, TEMPERATURE, chunk_size=chunk_size or None)
            return topk_forward_kl_terms(ell, ids, nu, mask, n)[0]
        return naive_topk_kl(hidden @ head.T, ids, nu, mask, n, TEMPERATURE)
    if loss == "jsd_linear":
        hidden, head, teacher_hidden, teacher_head, mask = inputs
        n = mask.sum()
        if impl == "chunked":
            return jsd_loss(hidden, linear_head(head), teacher_hidden, mask, n, BETA, TEMPERATURE,
                            teacher_head=linear_head(teacher_head), chunk_size=chunk_size)[0]
        return naive_jsd(hidden @ head.T, teacher_hidden @ teacher_head.T, mask, n, BETA, TEMPERATURE)
    if loss == "jsd":
        student, teacher, mask = inputs
        n = mask.sum()
        if impl == "chunked":
            return generalized_jsd_loss(student, teacher, mask, n, BETA, TEMPERATURE, chunk_size)[0]
        return naive_jsd(student, teacher, mask, n, BETA, TEMPERATURE)
    student, ids, nu, mask = inputs
    n = mask.sum()
    if impl == "chunked":
        return topk_forward_kl_loss(student, ids, nu, mask, n, TEMPERATURE, chunk_size=chunk_size)[0]
    return naive_topk_kl(student, ids, nu, mask, n, TEMPERATURE)


def worker(loss: str, impl: str, bt: int, V: int, chunk_size: int) -> None:
    import torch
    # One thread: the 2 cores here are shared, and a fork-join with a busy core costs ~8 ms per op.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    _run(loss, impl, _make_inputs(loss, 2 * B, 64), chunk_size).backward()  # warm-up, tiny
    inputs = _make_inputs(loss, bt, V)
    rss_before, _ = _rss_kib()
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    _run(loss, impl, inputs, chunk_size).backward()
    seconds = time.perf_counter() - start
    _, peak = _rss_kib()
    grad_mib = sum(x.grad.numel() * x.grad.element_size() for x in inputs
                   if isinstance(x, torch.Tensor) and x.grad is not None) / 2**20
    print(json.dumps({"seconds": seconds, "peak_extra_mib": (peak - rss_before) / 1024, "grad_mib": grad_mib}))


def _measure(loss: str, impl: str, bt: int, V: int, chunk_size: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", loss, impl, str(bt), str(V), str(chunk_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jsd-chunk", type=int, default=None, help="default: the library default")
    parser.add_argument("--topk-chunk", type=int, default=None, help="default: the library default")
    parser.add_argument("--linear-chunk", type=int, default=None, help="default: the library default")
    parser.add_argument("--only", default=None, help="comma-separated losses to run (default: all)")
    parser.add_argument("--worker", nargs=5, metavar=("LOSS", "IMPL", "BT", "V", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        loss, impl, bt, V, chunk = args.worker
        worker(loss, impl, int(bt), int(V), int(chunk))
        return

    import inspect
    sys.path.insert(0, str(ROOT))
    from opd.kernels_jsd import jsd_loss
    from opd.losses import generalized_jsd_loss, topk_forward_kl_loss
    default = lambda fn: inspect.signature(fn).parameters["chunk_size"].default  # noqa: E731
    chunks = {"jsd": args.jsd_chunk or default(generalized_jsd_loss),
              "topk": args.topk_chunk or default(topk_forward_kl_loss),
              "jsd_linear": args.linear_chunk or default(jsd_loss),
              "topk_linear": args.linear_chunk or 0}  # 0: the kernel's own choice, chunk_rows(V)
    rows = []
    losses = args.only.split(",") if args.only else ["topk", "jsd", "jsd_linear", "topk_linear"]
    for loss in losses:
        sizes = SIZES_QUICK if args.quick else SIZES_TOPK_LINEAR if loss == "topk_linear" else SIZES_FULL
        for bt, V in sizes:
            runs = {"chunked": [], "naive": []}
            for _ in range(args.repeats):
                for impl in ("chunked", "naive"):  # alternate so drift hits both equally
                    runs[impl].append(_measure(loss, impl, bt, V, chunks[loss]))
            med = {impl: {key: statistics.median(r[key] for r in rs) for key in ("seconds", "peak_extra_mib")}
                   for impl, rs in runs.items()}
            rows.append({"loss": loss, "BT": bt, "V": V, "K": K if loss == "topk" else None,
                         "chunk_size": chunks[loss], "grad_mib": runs["chunked"][0]["grad_mib"],
                         "chunked": med["chunked"], "naive": med["naive"], "raw": runs,
                         "time_ratio": med["chunked"]["seconds"] / med["naive"]["seconds"],
                         "mem_ratio": med["chunked"]["peak_extra_mib"] / med["naive"]["peak_extra_mib"]})
            r = rows[-1]
            print(f"{loss:10s} BT={bt:5d} V={V:6d} chunk={chunks[loss]:4d} | chunked {med['chunked']['seconds']:7.3f} s "
                  f"{med['chunked']['peak_extra_mib']:8.1f} MiB | naive {med['naive']['seconds']:7.3f} s "
                  f"{med['naive']['peak_extra_mib']:8.1f} MiB | time x{r['time_ratio']:.2f} mem x{r['mem_ratio']:.2f}",
                  flush=True)
    print()
    header = ("| loss | B*T | V | chunk | chunked s | naive s | time ratio | chunked peak extra MiB | "
              "naive peak extra MiB | mem ratio | grad MiB | mem ratio beyond grad |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        beyond = ((r["chunked"]["peak_extra_mib"] - r["grad_mib"]) / (r["naive"]["peak_extra_mib"] - r["grad_mib"]))
        r["mem_ratio_beyond_grad"] = beyond
        print(f"| {r['loss']} | {r['BT']} | {r['V']} | {r['chunk_size']} | {r['chunked']['seconds']:.3f} | "
              f"{r['naive']['seconds']:.3f} | {r['time_ratio']:.2f} | {r['chunked']['peak_extra_mib']:.0f} | "
              f"{r['naive']['peak_extra_mib']:.0f} | {r['mem_ratio']:.2f} | {r['grad_mib']:.0f} | {beyond:.2f} |")
    results = RESULTS if not args.only else RESULTS.with_name(f"bench_losses_{args.only.replace(',', '_')}.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"repeats": args.repeats, "temperature": TEMPERATURE, "beta": BETA,
                                   "dtype": "float32", "device": "cpu", "rows": rows}, indent=1))
    print(f"\nwrote {results.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
