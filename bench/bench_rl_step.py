"""Per-step time split of the quickstart RL loop (rollout, rewards+advantages, log-probs, train, weight sync)
and its throughput, from one in-process run's metrics.jsonl (medians over the steps after the first).

Usage: python bench/bench_rl_step.py [--steps 30] [key=value overrides for the quickstart config]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from nsr_megatron import parallel
    from nsr_megatron.cli import CONFIGS_DIR, prepare_quickstart
    from nsr_megatron.config import load_config
    from nsr_megatron.trainer.loop import train

    with tempfile.TemporaryDirectory() as d:
        overrides = [f"run.run_dir={d}/run", f"run.steps={args.steps}", "checkpoint.save_interval=0", *args.overrides]
        config = load_config(CONFIGS_DIR / "quickstart.yaml", overrides)
        config = prepare_quickstart(config, task="echo", num_prompts=1024)
        train(config, progress=False)
        parallel.destroy()
        rows = [json.loads(line) for line in open(Path(d) / "run" / "metrics.jsonl", encoding="utf-8")][1:]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith("timing/")}
    step = med["timing/step"]
    parts = {k: v for k, v in med.items() if k != "timing/step"}
    other = statistics.median(r["timing/step"] - sum(r[k] for k in parts) for r in rows)
    print(f"quickstart RL step (median of {len(rows)} steps after the first): {step * 1e3:.0f} ms")
    for k, v in parts.items():
        print(f"  {k[7:]:<12} {v * 1e3:7.1f} ms  {v / step:6.1%}")
    print(f"  {'other':<12} {other * 1e3:7.1f} ms  {other / step:6.1%}  (advantages, packing, logging)")
    resp = statistics.median(r["tokens"] for r in rows)
    samples = config.rollout.prompts_per_step * config.rollout.samples_per_prompt
    print(f"  {samples} samples/step, {resp:.0f} response tokens/step -> {resp / step:.0f} response tokens/s, "
          f"{samples / step:.0f} samples/s")


if __name__ == "__main__":
    main()
