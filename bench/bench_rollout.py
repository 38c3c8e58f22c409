"""Rollout throughput: EmbeddedEngine (static KV cache, the default; and ``kv_cache="dynamic"``) vs transformers'
``model.generate(do_sample=True)``, same model, same batch.

Model: the tiny Qwen3-MoE of ``nsr_megatron.models.tiny`` (about 8M parameters: hidden 256, 4 layers, 8 experts
top-2, moe_intermediate 256, vocab 256), random weights (seed 0), float32. Batch: P prompts of ``--prompt-len``
random tokens x n samples, exactly ``--new-tokens`` generated per sequence (no stop tokens, so both sides produce
the same number of tokens). All run in this process on the same model object, interleaved, ``--repeats`` times
after one warm-up each, back to back in rotating order. Reported: median tokens/s of each side (generated tokens
/ wall second), the median of the per-round speed ratios against HF generate and against the dynamic cache
(robust to background load that changes between rounds), and best-vs-best.

Two sampling settings: plain (T=1) and truncated (T=0.8, top_p=0.95, top_k=50).

Usage: python bench/bench_rollout.py [--prompts 16] [--n 8] [--prompt-len 8] [--new-tokens 16] [--repeats 9]
                                    [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def build_model() -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from nsr_megatron.models.tiny import tiny_moe_config

    values = tiny_moe_config()
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from nsr_megatron.rollout import EmbeddedEngine, SamplingParams

    model = build_model()
    engine = EmbeddedEngine.from_model(model)
    dynamic = EmbeddedEngine.from_model(model, kv_cache="dynamic")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, vocab, (args.prompts, args.prompt_len), generator=gen)
    prompt_lists = prompts.tolist()
    num_tokens = args.prompts * args.n * args.new_tokens
    params_count = sum(p.numel() for p in model.parameters())
    print(
        f"model: Qwen3-MoE {params_count / 1e6:.2f}M params | batch: {args.prompts} prompts x {args.n} samples, "
        f"prompt len {args.prompt_len}, {args.new_tokens} new tokens = {num_tokens} generated tokens | "
        f"torch threads {torch.get_num_threads()} | load avg {os.getloadavg()[0]:.1f}"
    )

    settings = {
        "plain T=1": dict(temperature=1.0, top_p=1.0, top_k=0),
        "T=0.8 top_p=0.95 top_k=50": dict(temperature=0.8, top_p=0.95, top_k=50),
    }
    for label, s in settings.items():
        params = SamplingParams(max_new_tokens=args.new_tokens, **s)

        def run_engine(seed: int, params: SamplingParams = params, engine: EmbeddedEngine = engine) -> int:
            groups = engine.generate(prompt_lists, params, n=args.n, seed=seed)
            return sum(len(g.response_ids) for grp in groups for g in grp)

        def run_hf(seed: int, s: dict = s) -> int:
            torch.manual_seed(seed)
            with torch.inference_mode():
                out = model.generate(
                    input_ids=prompts,
                    attention_mask=torch.ones_like(prompts),
                    do_sample=True,
                    num_return_sequences=args.n,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    eos_token_id=None,
                    pad_token_id=0,
                    **s,
                )
            return int(out[:, args.prompt_len :].numel())

        runners = {"embedded": run_engine, "dynamic": lambda seed: run_engine(seed, engine=dynamic), "hf": run_hf}
        times: dict[str, list[float]] = {name: [] for name in runners}
        for name, fn in runners.items():  # warm-up
            assert fn(0) == num_tokens, name
        vs_hf, vs_dynamic = [], []
        names = list(runners)
        for r in range(args.repeats):
            # back to back, in rotating order, so every side sees the same background load
            order = names[r % 3 :] + names[: r % 3]
            took = {}
            for name in order:
                t0 = time.perf_counter()
                produced = runners[name](r + 1)
                took[name] = time.perf_counter() - t0
                assert produced == num_tokens, (name, produced)
                times[name].append(took[name])
            vs_hf.append(took["hf"] / took["embedded"])
            vs_dynamic.append(took["dynamic"] / took["embedded"])
        tok_s = {name: num_tokens / statistics.median(t) for name, t in times.items()}
        print(
            f"[{label}] EmbeddedEngine {tok_s['embedded']:6.0f} tok/s (median of {args.repeats}; best "
            f"{num_tokens / min(times['embedded']):.0f}) | dynamic cache {tok_s['dynamic']:6.0f} | HF generate "
            f"{tok_s['hf']:6.0f} tok/s (best {num_tokens / min(times['hf']):.0f}) | median paired ratio vs HF "
            f"{statistics.median(vs_hf):.2f}x, vs dynamic cache {statistics.median(vs_dynamic):.2f}x | best-vs-best "
            f"vs HF {min(times['hf']) / min(times['embedded']):.2f}x"
        )
    print(f"load avg after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
