"""Does ``torch.compile`` of the decode forward pay on CPU? One decode step of the rollout model (the tiny
Qwen3-MoE of bench_rollout.py, 128 rows, 8 prompt tokens in the cache), eager against
``torch.compile(model.forward, dynamic=True)``, in one process, alternating; and what the compile costs.

Usage: python bench/bench_decode_compile.py [--threads 1] [--steps 16] [--rounds 3]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")


def decode_ms(forward: Any, model: Any, ids: torch.Tensor, steps: int) -> float:
    """Milliseconds per decode step after a prefill of ``ids`` [B, L] (greedy; the tokens do not matter)."""
    from transformers import DynamicCache

    rows, length = ids.shape
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = forward(input_ids=ids, use_cache=True, past_key_values=cache, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1)
        t0 = time.perf_counter()
        for t in range(steps):
            out = forward(input_ids=tok[:, None], use_cache=True, past_key_values=cache,
                          position_ids=torch.full((rows, 1), length + t))
            tok = out.logits[:, -1].argmax(-1)
        return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from bench_rollout import build_model

    model = build_model()
    ids = torch.randint(0, int(model.config.vocab_size), (128, 8), generator=torch.Generator().manual_seed(0))
    decode_ms(model.forward, model, ids, 2)  # warm-up
    t0 = time.perf_counter()
    compiled = torch.compile(model.forward, dynamic=True)
    decode_ms(compiled, model, ids, 2)  # compiles (prefill and decode shapes)
    compile_s = time.perf_counter() - t0
    eager, comp = [], []
    for _ in range(args.rounds):
        eager.append(decode_ms(model.forward, model, ids, args.steps))
        comp.append(decode_ms(compiled, model, ids, args.steps))
    e, c = statistics.median(eager), statistics.median(comp)
    print(f"torch threads {torch.get_num_threads()}; decode step of 128 rows, median of {args.rounds} rounds")
    print(f"eager {e:.2f} ms | compiled {c:.2f} ms | eager / compiled {e / c:.2f}x | first compile {compile_s:.0f} s "
          f"(pays after {compile_s * 1e3 / max(e - c, 1e-9):.0f} decode steps)")


if __name__ == "__main__":
    main()
