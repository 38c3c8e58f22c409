"""Core attention of the local layer spec: torch SDPA (``nsr_megatron.models.attention.SDPAttention``) against
megatron-core's ``DotProductAttention`` (scores materialized, masked softmax, bmm), forward + backward, in one
process with alternating repeats. About 1,400 tokens per batch at every sequence length (the bench_vs_trl
train batch is 128 x 11), grouped-query heads as in that model (8 query heads, 4 key-value groups, head
dimension 32), fp32, causal.

Usage: python bench/bench_attention.py [--threads 1] [--repeats 5] [--lengths 11,64,256,1024]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lengths", default="11,64,256,1024")
    ap.add_argument("--tokens", type=int, default=1408)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nsr_megatron import parallel
    from nsr_megatron.config import ParallelConfig
    from nsr_megatron.models.attention import SDPAttention

    parallel.initialize(ParallelConfig(), seed=1)
    heads, groups, dim = 8, 4, 32
    cfg = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                            num_query_groups=groups, kv_channels=dim, attention_dropout=0.0)
    kw: dict[str, Any] = {"layer_number": 1, "attn_mask_type": AttnMaskType.causal, "attention_type": "self"}
    modules = {"megatron": DotProductAttention(cfg, **kw), "sdpa": SDPAttention(cfg, **kw)}
    print(f"torch threads {torch.get_num_threads()}; ~{args.tokens} tokens per batch; forward + backward, ms "
          f"(median of {args.repeats} alternating repeats of 5 calls)")
    print(f"{'S':>6} {'B':>5} {'megatron':>10} {'sdpa':>10} {'sdpa / megatron':>16}")
    for length in (int(x) for x in args.lengths.split(",")):
        batch = max(1, args.tokens // length)
        q = torch.randn(length, batch, heads, dim, requires_grad=True)
        k, v = (torch.randn(length, batch, groups, dim, requires_grad=True) for _ in range(2))

        def once(module: Any, q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v) -> None:
            module(q, k, v, None).sum().backward()

        times: dict[str, list[float]] = {name: [] for name in modules}
        for module in modules.values():
            once(module)  # warm-up
        for _ in range(args.repeats):
            for name, module in modules.items():
                t0 = time.perf_counter()
                for _ in range(5):
                    once(module)
                times[name].append((time.perf_counter() - t0) / 5 * 1e3)
        mega, sdpa = (statistics.median(times[n]) for n in ("megatron", "sdpa"))
        print(f"{length:>6} {batch:>5} {mega:>10.2f} {sdpa:>10.2f} {sdpa / mega:>16.2f}")
    parallel.destroy()


if __name__ == "__main__":
    main()
