"""Rollout throughput: the in-process engine against 1 and 2 engines of the project's rollout server, the same
prompts, seeds and model, in one run (response tokens per second, medians of a few rounds, first round dropped).

On this 2-core machine every variant shares the same two cores: the in-process engine and one server engine get
2 threads, two engines 1 thread each. The server path adds HTTP and JSON; two engines add parallel requests.

Usage: python bench/bench_rollout_engines.py [--prompts 64] [--n 8] [--new-tokens 32] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, head_dim=32, num_experts=8, num_experts_per_tok=2,
             max_position_embeddings=256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()

    import torch

    from nsr_megatron.models.tiny import create_tiny_hf_checkpoint
    from nsr_megatron.rollout import EmbeddedEngine, SamplingParams
    from nsr_megatron.rollout.pool import EnginePool, server_launchers

    torch.set_num_threads(2)
    params = SamplingParams(max_new_tokens=args.new_tokens)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    with tempfile.TemporaryDirectory() as d:
        hf = create_tiny_hf_checkpoint(Path(d) / "hf", seed=0, **MODEL)
        variants = {"in-process": EmbeddedEngine(hf)}
        pools = []
        for engines in (1, 2):
            pool = EnginePool(launchers=server_launchers(str(hf), engines, token="t", log_dir=Path(d) / f"e{engines}",
                                                         threads=2 // engines), token="t",
                              weights_dir=Path(d) / "w", hf_path=str(hf)).start()
            pools.append(pool)
            variants[f"{engines} server engine{'s' if engines > 1 else ''}"] = pool
        rates: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(args.rounds + 1):
            for name, engine in variants.items():  # interleaved: the machine's noise hits every variant alike
                t0 = time.perf_counter()
                out = engine.generate(prompts, params, n=args.n, seed=r)
                seconds = time.perf_counter() - t0
                tokens = sum(len(s.response_ids) for grp in out for s in grp)
                if r:
                    rates[name].append(tokens / seconds)
        for pool in pools:
            pool.close()
    base = statistics.median(rates["in-process"])
    print(f"{args.prompts} prompts x {args.n} samples x {args.new_tokens} new tokens, a Qwen3-MoE of hidden "
          f"{MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, {MODEL['num_experts']} experts; median of "
          f"{args.rounds} rounds")
    print("| engines | response tokens/s | x in-process |")
    print("|---|---|---|")
    for name, values in rates.items():
        m = statistics.median(values)
        print(f"| {name} | {m:.0f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
