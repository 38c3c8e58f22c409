"""What ``rollout.overlap`` saves: the quickstart's RL step with one engine process of the project's server
(``rollout.backend=server``), sequential against one-step off-policy, in alternating in-process runs.

With overlap the engine samples step k+1 while the trainer runs step k, so on a machine with a core (or a GPU)
for each, the step takes about max(rollout, train) instead of their sum. Prints each run's median step and the
ratio of the medians (overlap / sequential), with the phase split of both.

Usage: OMP_NUM_THREADS=1 python bench/bench_overlap.py [--steps 20] [--rounds 2] [key=value overrides]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

PHASES = ("rollout", "rollout_background", "rewards", "rewards_background", "logprobs", "train", "weight_sync")


def one_run(overlap: bool, steps: int, overrides: list[str], root: Path, index: int) -> dict[str, float]:
    from nsr_megatron import parallel
    from nsr_megatron.cli import CONFIGS_DIR, prepare_quickstart
    from nsr_megatron.config import load_config
    from nsr_megatron.trainer.loop import train

    run_dir = root / f"run-{index}-{'overlap' if overlap else 'sequential'}"
    config = load_config(CONFIGS_DIR / "quickstart.yaml", [
        f"run.run_dir={run_dir}", f"run.steps={steps}", "checkpoint.save_interval=0", "rollout.backend=server",
        "rollout.num_engines=1", "rollout.max_new_tokens=32", "loss.tis_cap=2.0", f"rollout.overlap={overlap}",
        *overrides])
    config = prepare_quickstart(config, task="echo", num_prompts=1024, where=root)
    try:
        train(config, progress=False)
    finally:
        parallel.destroy()
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8")][2:]  # warm-up dropped
    out = {"step": statistics.median(r["timing/step"] for r in rows)}
    for phase in PHASES:
        out[phase] = statistics.median(r.get(f"timing/{phase}", 0.0) for r in rows)
    out["reward_last5"] = statistics.fmean(r["reward/mean"] for r in rows[-5:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.rounds):
            for overlap in (False, True):
                r = one_run(overlap, args.steps, args.overrides, Path(d), i)
                results[overlap].append(r)
                print(f"round {i + 1} {'overlap   ' if overlap else 'sequential'}: median step {r['step'] * 1e3:6.1f} "
                      "ms | " + " ".join(f"{p} {r[p] * 1e3:.0f}" for p in PHASES if r[p]), flush=True)
    seq = statistics.median(r["step"] for r in results[False])
    ovl = statistics.median(r["step"] for r in results[True])
    print(f"median step: sequential {seq * 1e3:.1f} ms, overlap {ovl * 1e3:.1f} ms -> overlap / sequential "
          f"{ovl / seq:.2f}")


if __name__ == "__main__":
    main()
