"""Cost of the CPU platform layer and forward+backward throughput of the tiny MoE on CPU.

megatron-core cannot run on CPU without the platform layer, so "with vs without" is measured per op:
1. the same small torch op in a loop with and without the layer's TorchFunctionMode (same process,
   interleaved repeats, median) -> added microseconds per torch call;
2. the number of torch calls the mode intercepts in one training step of the tiny MoE, times that
   per-call cost, over the measured step time -> estimated share of the step spent in the layer;
3. forward+backward tokens/s of the tiny MoE (smoke config), and forward+backward+optimizer tokens/s.

Usage: python bench/bench_platform.py [--steps 6] [--seq 128] [--mbs 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
import warnings

import torch
from torch.overrides import TorchFunctionMode

warnings.filterwarnings("ignore")


def per_op_overhead_us(repeats: int = 7, n: int = 20000) -> tuple[float, float]:
    from nsr_megatron.platform import _CudaToCpuMode

    x = torch.randn(64)
    y = torch.randn(64)

    def loop() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            torch.add(x, y)
        return (time.perf_counter() - t0) / n * 1e6

    base, mode = [], []
    for _ in range(repeats):
        base.append(loop())
        with _CudaToCpuMode():
            mode.append(loop())
    return statistics.median(base), statistics.median(mode)


class _Count(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--mbs", type=int, default=4)
    args = ap.parse_args()

    base_us, mode_us = per_op_overhead_us()
    print(f"torch.add(64 floats): {base_us:.2f} us/op plain, {mode_us:.2f} us/op under the platform mode "
          f"(+{mode_us - base_us:.2f} us per torch call)")

    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.models.tiny import tiny_moe_config
    from nsr_megatron.trainer import actor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    par = ParallelConfig()
    parallel.initialize(par, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    arch = arch_from_hf(tiny_moe_config())
    policy = build_model(arch, model=ModelConfig(transformer_impl="local"), parallel=par,
                         optimizer=OptimizerConfig(lr=1e-4))
    n_params = sum(p.numel() for p in policy.gpt.parameters())
    gen = torch.Generator().manual_seed(0)

    def batch() -> list[dict[str, torch.Tensor]]:
        t = torch.randint(0, arch.vocab_size, (args.mbs, args.seq + 1), generator=gen)
        return [{"tokens": t[:, :-1], "targets": t[:, 1:]}]

    def ce(logits: torch.Tensor, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        loss = vocab_parallel_cross_entropy(logits.float(), b["targets"]).mean()
        return loss, {"loss": loss.detach()}

    fb_times, step_times = [], []
    for i in range(args.steps + 1):
        mb = batch()
        actor.zero_grads(policy)
        t0 = time.perf_counter()
        actor.forward_backward(policy, mb, ce)
        t1 = time.perf_counter()
        actor.optimizer_step(policy)
        t2 = time.perf_counter()
        if i > 0:  # first step: one-time setup
            fb_times.append(t1 - t0)
            step_times.append(t2 - t0)
    tokens = args.mbs * args.seq
    fb, st = statistics.median(fb_times), statistics.median(step_times)

    counter = _Count()
    with counter:
        mb = batch()
        actor.zero_grads(policy)
        actor.forward_backward(policy, mb, ce)
        actor.optimizer_step(policy)
    overhead_s = counter.calls * (mode_us - base_us) * 1e-6
    print(f"tiny MoE ({n_params / 1e6:.2f}M params, {arch.num_experts} experts top-{arch.moe_topk}), "
          f"batch {args.mbs}x{args.seq}, {torch.get_num_threads()} threads:")
    print(f"  forward+backward: {tokens / fb:.0f} tokens/s (median of {args.steps})")
    print(f"  forward+backward+optimizer: {tokens / st:.0f} tokens/s")
    print(f"  torch calls intercepted per training step: {counter.calls}; estimated platform-layer time "
          f"{overhead_s * 1e3:.1f} ms of {st * 1e3:.0f} ms = {overhead_s / st:.1%} of the step")
    parallel.destroy()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
