"""The matrix-product floor of one RL step of ``bench/bench_vs_trl.py``'s setup on this CPU.

Both trainers do the same matrix products per step (TRL and this project generate the same tokens with the same
model and train on the same tokens), so the products' FLOPs at this machine's own GEMM rate bound any step from
below: whatever else a step does comes on top. This prints:

- the fp32 GEMM rate of the model's own shapes (a [tokens x hidden] activation times each weight), at 1 and 2
  threads, measured here;
- the FLOPs of one step, counted from the model config: the rollout (one forward per generated token that is fed
  back, and the prompts' prefill) and the train phase (forward + backward = 3 forwards over the packed tokens);
- the floor in ms at 1 and 2 threads, and what share of a given TRL step it is (``--trl-ms``, measured by
  ``bench/bench_vs_trl.py``; the issue's goal is a step at most 0.5x TRL's).

Attention scores over 11-token sequences and the router are under 1% of the products and are left out, so the floor
is slightly low.

Usage: python bench/bench_floor.py [--trl-ms 532,437]   (TRL's step at 1 and at 2 threads)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def forward_macs_per_token(c: dict) -> int:
    """Multiply-accumulates of the weight products of one token's forward (Qwen3-MoE: attention projections, the
    top-k experts' SwiGLU MLPs, the output layer)."""
    h, d = c["hidden_size"], c["head_dim"]
    attn = h * c["num_attention_heads"] * d * 2 + h * c["num_key_value_heads"] * d * 2  # q, o; k, v
    experts = c["num_experts_per_tok"] * 3 * h * c["moe_intermediate_size"]  # gate, up, down
    return c["num_hidden_layers"] * (attn + experts) + h * c["vocab_size"]


def gemm_gflops(shapes: list[tuple[int, int, int]], threads: int, seconds: float = 0.5) -> float:
    """The FLOP rate of ``[m, k] @ [k, n]`` over the given shapes (all run in turn), fp32, ``threads`` threads."""
    torch.set_num_threads(threads)
    mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    for a, b in mats:
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for a, b in mats:
            a @ b
        reps += 1
    return reps * flops / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=3, help="tokens per prompt (the echo task's: 3)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--trl-ms", default="", help="TRL's step in ms at 1 and 2 threads, e.g. 532,437")
    args = ap.parse_args()
    from nsr_megatron.models.tiny import tiny_moe_config

    c = tiny_moe_config()
    rows = args.prompts * args.samples
    per_token = forward_macs_per_token(c)
    rollout_tokens = rows * args.prompt_tokens + rows * (args.new_tokens - 1)  # prefill, then fed-back tokens
    train_tokens = rows * (args.prompt_tokens + args.new_tokens)
    rollout_flops = 2 * per_token * rollout_tokens
    train_flops = 3 * 2 * per_token * train_tokens
    h, f = c["hidden_size"], c["moe_intermediate_size"]
    shapes = [(train_tokens, h, c["num_attention_heads"] * c["head_dim"]), (train_tokens, h, 2 * f),
              (train_tokens * c["num_experts_per_tok"] // c["num_experts"], h, 2 * f), (rows, h, 2 * f),
              (rows, f, h)]
    print(f"model: {per_token / 1e6:.2f}M weight MACs per token forward | rollout {rollout_tokens} token forwards "
          f"({rollout_flops / 1e9:.2f} GFLOP) | train {train_tokens} tokens x (forward + backward) "
          f"({train_flops / 1e9:.2f} GFLOP)")
    trl = [float(x) for x in args.trl_ms.split(",")] if args.trl_ms else []
    print("| threads | GEMM GFLOP/s (model shapes) | rollout floor | train floor | step floor | floor / TRL step |")
    print("|---|---|---|---|---|---|")
    for i, threads in enumerate((1, 2)):
        rate = gemm_gflops(shapes, threads)
        ro, tr = rollout_flops / rate / 1e6, train_flops / rate / 1e6
        share = f"{(ro + tr) / trl[i]:.2f}" if i < len(trl) else "-"
        print(f"| {threads} | {rate:.0f} | {ro:.0f} ms | {tr:.0f} ms | {ro + tr:.0f} ms | {share} |")


if __name__ == "__main__":
    main()
