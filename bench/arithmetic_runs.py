"""Per-run numbers of a `compare --task arithmetic` folder that `compare` does not print: each run's rise in held-out
pass@1 over its start (final = mean of the evals in the last tenth, start = eval_start.json) and its clipped share
of response tokens (clip_frac/lower + clip_frac/upper: the run's mean and its largest step).

    python bench/arithmetic_runs.py runs/cmp-arith [--losses dapo,nsr]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the --out folder of nsr-megatron compare")
    parser.add_argument("--losses", default="dapo,nsr,nsr-decay,sapo,cispo,clip-cov,nsr-aa")
    args = parser.parse_args()
    finals = json.loads((Path(args.out) / "compare.json").read_text())["metrics"]["eval/pass@1"]
    for loss in args.losses.split(","):
        if loss not in finals:
            continue
        rises, means, peaks = [], [], []
        for seed, final in zip(finals[loss]["seed_list"], finals[loss]["finals"], strict=True):
            run = Path(args.out) / "runs" / f"{loss}-seed{seed}"
            rises.append(final - json.loads((run / "eval_start.json").read_text())["pass@1"])
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
            clipped = [r.get("clip_frac/lower", 0.0) + r.get("clip_frac/upper", 0.0) for r in rows]
            means.append(statistics.mean(clipped))
            peaks.append(max(clipped))
        print(f"{loss}: {len(rises)} runs, pass@1 rose in {sum(r > 0 for r in rises)}, rise {min(rises):+.3f} to "
              f"{max(rises):+.3f} (mean {statistics.mean(rises):+.3f}); clipped per run {min(means):.1%}-"
              f"{max(means):.1%}, largest step {min(peaks):.1%}-{max(peaks):.1%}")


if __name__ == "__main__":
    main()
