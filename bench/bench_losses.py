"""Benchmark the policy losses and the vocab-parallel log-prob op (CPU or GPU; not a test).

    python bench/bench_losses.py                       # defaults below, a few minutes on 2 CPU cores
    python bench/bench_losses.py --tokens 4194304 --lp-tokens 8192 --device cuda
    OMP_NUM_THREADS=2 python bench/bench_losses.py --only fused   # suite 3 alone, about 10 minutes on 2 CPU cores

1. Forward + backward of ``policy_loss`` for dapo, nsr and nsr-decay on ``--tokens`` tokens
   (rows of ``--seq-len``; log-ratios ~ N(0, 0.1^2), about 1% of tokens clipped, 90% of tokens unmasked).
   Target: nsr <= 1.10 x dapo in time and memory.
2. Forward + backward of per-token log-probs from logits [--lp-tokens, --vocab]: our op
   (:func:`vocab_parallel_logprobs_entropy`, one process, full vocabulary) against the naive
   ``log_softmax(logits.float() / T).gather(target)``; both also with the entropy as a second output.
   Target: ours <= 0.5 x naive peak memory, and no slower.
3. (only with ``--only fused``) Forward + backward of log-probs and entropy from the last hidden states
   [--fused-tokens, --hidden] and an output weight [--vocab, --hidden] in ``--fused-dtype``: ``old`` = the logits
   GEMM ``hidden @ weight.T`` (in the model's dtype, as megatron's output layer) then
   :func:`vocab_parallel_logprobs_entropy` and its backward through the GEMM; ``fused`` =
   :func:`fused_logprobs_entropy` (no logits tensor; the backward recomputes each tile's logits), returning the
   weight's gradient; ``fused-main-grad`` = the same op adding the weight's gradient straight into an fp32
   ``main_grad`` [V, H] (megatron DDP's accumulator, as the trainer runs it). ``old`` and ``fused`` then add their
   returned weight gradient to that ``main_grad`` (DDP's hook), so all three end in the same state. Objective
   ``sum(logprob) + sum(entropy)``, gradients to the hidden states and the weight. The peak is also given without
   the returned gradients (the weight's is [V, H]: 594 MiB in bf16 at Qwen3-30B-A3B's 151,936 x 2048), i.e. what
   the logits cost. Target: fused <= 0.1 x old peak memory and <= 1.3 x old time.

Times: all variants of a suite run interleaved in one subprocess (one warm-up each, then
``--loss-repeats`` or ``--lp-repeats`` rounds, the order rotating every round), so drifting machine load
hits them alike; the ratios are of medians. Both wall time and process CPU time (``time.process_time``:
all threads, but not the time spent waiting for a core on a shared machine) are reported.
Memory: every variant in a fresh subprocess; on CPU it is the growth of the process's peak resident set
size (VmHWM, reset through /proc/self/clear_refs once the inputs exist) over a warm-up and one run, with
glibc told to mmap every block >= 64 KiB (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the RSS
at once and heap fragmentation does not count: what the operation needs on top of its inputs,
temporaries and the returned gradient included. On CUDA it is
the growth of torch.cuda.max_memory_allocated().
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsr_megatron.losses import (  # noqa: E402
    PolicyLossConfig,
    fused_logprobs_entropy,
    policy_loss,
    vocab_parallel_logprobs_entropy,
)

LOSS_VARIANTS = ("dapo", "nsr", "nsr-decay")
LP_VARIANTS = ("naive", "ours", "naive+entropy", "ours+entropy")
FUSED_VARIANTS = ("old", "fused", "fused-main-grad")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory growth (MiB) of what runs between ``start()`` and ``stop()``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = _rss_kib("VmRSS") * 1024

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (_rss_kib("VmHWM") * 1024 - self.base) / 2**20


def loss_setup(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """One fwd+bwd closure per loss variant, on shared inputs."""
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    rows, cols = args.tokens // args.seq_len, args.seq_len
    old = (-torch.rand(rows, cols, generator=g) * 3.0).to(device)  # [B, T]
    lp = (old.cpu() + torch.randn(rows, cols, generator=g) * 0.1).to(device).requires_grad_()  # [B, T]
    adv = torch.randn(rows, generator=g).to(device)  # [B]
    lengths = torch.randint(int(0.8 * cols), cols + 1, (rows, 1), generator=g)
    mask = (torch.arange(cols)[None, :] < lengths).float().to(device)  # [B, T]
    ids = torch.arange(rows, device=device)

    def make(variant: str) -> Callable[[], None]:
        cfg = PolicyLossConfig(name=variant)

        def step() -> None:
            lp.grad = None
            loss, sums = policy_loss(cfg, lp, old, adv, mask, sample_ids=ids, step=3)
            loss.backward()
            clip = float(sums["clip/upper_sum"] + sums["clip/lower_sum"]) / float(sums["tokens"])
            INFO["clip_frac"] = clip

        return step

    return {v: make(v) for v in LOSS_VARIANTS}


def lp_setup(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """One fwd+bwd closure per log-prob variant, on shared logits [N, V]."""
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.lp_dtype]
    g = torch.Generator().manual_seed(0)
    logits = torch.empty(args.lp_tokens, args.vocab, dtype=dtype, device=device)  # [N, V]
    for a in range(0, args.lp_tokens, 256):  # fill in slices: no full-size fp32 temporary
        logits[a : a + 256] = (torch.randn(min(256, args.lp_tokens - a), args.vocab, generator=g) * 2).to(
            dtype
        )
    logits.requires_grad_()
    targets = torch.randint(0, args.vocab, (args.lp_tokens,), generator=g).to(device)  # [N]
    temperature = args.temperature

    def make(variant: str) -> Callable[[], None]:
        entropy = variant.endswith("+entropy")

        def step() -> None:
            logits.grad = None
            if variant.startswith("ours"):
                lp, ent = vocab_parallel_logprobs_entropy(
                    logits, targets, temperature=temperature, chunk_size=args.lp_chunk
                )
            else:
                logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [N, V]
                lp = logp.gather(1, targets[:, None]).squeeze(1)
                ent = -(logp.exp() * logp).sum(-1) if entropy else lp
            out = lp.sum() + ent.sum() if entropy else lp.sum()
            out.backward()
            logits.grad = None

        return step

    return {v: make(v) for v in LP_VARIANTS}


def fused_setup(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """One fwd+bwd closure per head variant, on shared hidden states [N, H] and output weight [V, H]."""
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.fused_dtype]
    g = torch.Generator().manual_seed(0)

    def randn(rows: int, cols: int, scale: float) -> torch.Tensor:  # filled in slices: no full fp32 temporary
        out = torch.empty(rows, cols, dtype=dtype, device=device)
        for a in range(0, rows, 1024):
            out[a : a + 1024] = (torch.randn(min(1024, rows - a), cols, generator=g) * scale).to(dtype)
        return out.requires_grad_()

    hidden = randn(args.fused_tokens, args.hidden, 1.0)  # [N, H] after the final norm: unit scale
    weight = randn(args.vocab, args.hidden, 2.0 / args.hidden**0.5)  # [V, H] logits of std ~2
    targets = torch.randint(0, args.vocab, (args.fused_tokens,), generator=g).to(device)  # [N]
    # megatron DDP's fp32 gradient accumulator of the weight: exists before the step, as in the trainer
    main_grad = torch.zeros(args.vocab, args.hidden, dtype=torch.float32, device=device)  # [V, H]
    returned = {"old": hidden.numel() + weight.numel(), "fused": hidden.numel() + weight.numel(),
                "fused-main-grad": hidden.numel()}  # elements of the gradients each variant returns
    INFO["grad_mib"] = {v: n * hidden.element_size() / 2**20 for v, n in returned.items()}

    def make(variant: str) -> Callable[[], None]:
        def step() -> None:
            if variant.startswith("fused"):
                lp, ent = fused_logprobs_entropy(hidden, weight, targets, temperature=args.temperature,
                                                 chunk_size=args.fused_chunk, vocab_chunk_size=args.fused_vocab_chunk,
                                                 main_grad=main_grad if variant == "fused-main-grad" else None)
            else:
                logits = hidden @ weight.t()  # [N, V] in the model's dtype
                lp, ent = vocab_parallel_logprobs_entropy(logits, targets, temperature=args.temperature)
                del logits  # held by autograd until the backward, as in the trainer
            (lp.sum() + ent.sum()).backward()
            if weight.grad is not None:  # megatron DDP's hook: param.main_grad.add_(param.grad); param.grad = None
                main_grad.add_(weight.grad)
            hidden.grad = weight.grad = None

        return step

    return {v: make(v) for v in args.fused_variants.split(",")}


INFO: dict[str, Any] = {}
SETUPS = {"loss": loss_setup, "logprob": lp_setup, "fused": fused_setup}
REPEATS = {"loss": "loss_repeats", "logprob": "lp_repeats", "fused": "fused_repeats"}


def worker(mode: str, kind: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """``time``: all variants of ``kind`` interleaved in this process, one warm-up each, then the repeats;
    ``memory``: one variant, peak growth over a warm-up and one run."""
    device = torch.device(args.device)
    steps = SETUPS[kind](args)
    if mode == "memory":
        meter = PeakMemory(device)
        meter.start()
        for _ in range(2):
            steps[variant]()
        return {"peak_mib": meter.stop(), **INFO}
    times: dict[str, list[float]] = {v: [] for v in steps}
    cpu: dict[str, list[float]] = {v: [] for v in steps}
    for step in steps.values():
        step()  # warm-up
    names = list(steps)
    for r in range(getattr(args, REPEATS[kind])):
        for v in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order: no position bias
            step = steps[v]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    return {"times": times, "cpu": cpu, **INFO}


def run_worker(mode: str, kind: str, variant: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", f"{mode}:{kind}:{variant}"]
    env = dict(os.environ)
    if mode == "memory":  # glibc: serve every block >= 64 KiB by mmap, so freed tensors leave the RSS at once
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4 * 2**20, help="tokens of the loss benchmark (4M)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument(
        "--lp-tokens", type=int, default=1024, help="tokens of the log-prob benchmark (8192: ~20 GB)"
    )
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary (Qwen2.5 / Qwen3)")
    p.add_argument("--lp-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument(
        "--lp-chunk", type=int, default=None, help="tokens per chunk of our op (default: automatic)"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--loss-repeats", type=int, default=15, help="timed loss runs per variant, interleaved")
    p.add_argument("--lp-repeats", type=int, default=3, help="timed log-prob runs per variant, interleaved")
    p.add_argument("--fused-tokens", type=int, default=8192, help="tokens of the fused-head benchmark")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size of the fused-head benchmark (Qwen3-30B-A3B)")
    p.add_argument("--fused-dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--fused-chunk", type=int, default=None, help="tokens per tile of the fused op (automatic)")
    p.add_argument("--fused-vocab-chunk", type=int, default=None, help="vocabulary rows per tile (automatic)")
    p.add_argument("--fused-variants", default=",".join(FUSED_VARIANTS),
                   help="comma-separated variants of the fused-head suite, old among them (default: %(default)s)")
    p.add_argument("--fused-repeats", type=int, default=2, help="timed fused-head runs per variant, interleaved")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", choices=("loss", "logprob", "fused"), default=None,
                   help="one suite; without it: loss and logprob (fused runs only when named)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        mode, kind, variant = args.worker.split(":")
        print(json.dumps(worker(mode, kind, variant, args)))
        return
    argv = [a for a in sys.argv[1:] if a]
    fused = tuple(args.fused_variants.split(","))
    unknown = sorted(set(fused) - set(FUSED_VARIANTS))
    if unknown or "old" not in fused:
        p.error(f"--fused-variants {args.fused_variants}: needs old and names from {list(FUSED_VARIANTS)}")
    suites = {"loss": (LOSS_VARIANTS, "dapo"), "logprob": (LP_VARIANTS, "naive"), "fused": (fused, "old")}
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} threads; time: median of "
          f"{args.loss_repeats} (loss) / {args.lp_repeats} (log-prob) / {args.fused_repeats} (fused head) "
          "interleaved runs in one process; memory: peak growth in a fresh process per variant")  # fmt: skip
    for kind in [args.only] if args.only else ["loss", "logprob"]:
        variants, base = suites[kind]
        timing = run_worker("time", kind, "all", argv)
        med = {v: statistics.median(ts) for v, ts in timing["times"].items()}
        cpu = {v: statistics.median(ts) for v, ts in timing["cpu"].items()}
        mem_runs = {v: run_worker("memory", kind, v, argv) for v in variants}
        mem = {v: r["peak_mib"] for v, r in mem_runs.items()}
        if kind == "loss":
            print(f"\npolicy_loss forward+backward, {args.tokens} tokens ({args.tokens // args.seq_len} x "
                  f"{args.seq_len}), clip fraction {timing['clip_frac']:.2%}")  # fmt: skip
        elif kind == "fused":
            print(f"\nlog-prob + entropy forward+backward from hidden [{args.fused_tokens} x {args.hidden}] and "
                  f"weight [{args.vocab} x {args.hidden}] {args.fused_dtype}, T={args.temperature}")  # fmt: skip
        else:
            print(f"\nlog-prob forward+backward, logits [{args.lp_tokens} x {args.vocab}] {args.lp_dtype}")
        for v in variants:
            ref = "naive+entropy" if v == "ours+entropy" else base
            print(f"  {v:14s} wall {med[v] * 1e3:8.1f} ms (x{med[v] / med[ref]:.3f})  "
                  f"cpu {cpu[v] * 1e3:8.1f} ms (x{cpu[v] / cpu[ref]:.3f})  "
                  f"peak +{mem[v]:7.1f} MiB (x{mem[v] / mem[ref]:.3f})   ratios vs {ref}")  # fmt: skip
        if kind == "fused":  # what the logits cost: the peak less the returned gradients (the same in both)
            grads = mem_runs[base]["grad_mib"]
            for v in variants:
                print(f"  {v:16s} peak without the returned gradients ({grads[v]:.1f} MiB): +{mem[v] - grads[v]:7.1f} "
                      f"MiB (x{(mem[v] - grads[v]) / (mem[base] - grads[base]):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
