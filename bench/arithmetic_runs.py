"""Per-run numbers of a `compare --task arithmetic` folder that `compare` does not print: each run's rise in held-out
pass@1 over its start (final = mean of the evals in the last tenth, start = eval_start.json) and its clipped share
of response tokens (clip_frac/lower + clip_frac/upper: the run's mean and its largest step). With ``--against
FOLDER:LOSS`` also each loss's paired difference in final held-out pass@1 and reward against LOSS of another compare
folder over their common seeds (runs of one seed start from the same SFT checkpoint), e.g. one task setting
against another.

    python bench/arithmetic_runs.py runs/cmp-arith [--losses dapo,nsr] [--against runs/cmp-arith-eps0.2:dapo]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from nsr_megatron.telemetry.compare import paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the --out folder of nsr-megatron compare")
    parser.add_argument("--losses", default="dapo,nsr,nsr-decay,sapo,cispo,clip-cov,nsr-aa")
    parser.add_argument("--against", default="", help="FOLDER:LOSS, a loss of another compare folder")
    args = parser.parse_args()
    metrics = json.loads((Path(args.out) / "compare.json").read_text())["metrics"]
    finals = metrics["eval/pass@1"]
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
    if args.against:
        folder, _, other = args.against.rpartition(":")
        theirs = json.loads((Path(folder) / "compare.json").read_text())["metrics"]
        for key in ("eval/pass@1", "reward/mean"):
            base = dict(zip(theirs[key][other]["seed_list"], theirs[key][other]["finals"], strict=True))
            for loss in args.losses.split(","):
                if loss not in metrics[key]:
                    continue
                mine = dict(zip(metrics[key][loss]["seed_list"], metrics[key][loss]["finals"], strict=True))
                row = paired(base, mine, key=key)
                if row["half"] is None:
                    continue
                print(f"{key}: {loss} - {other} of {folder}: {row['mean']:+.4f} [{row['low']:+.4f}, "
                      f"{row['high']:+.4f}] over {row['pairs']} seeds, {row['wins']} wins / {row['losses']} losses")


if __name__ == "__main__":
    main()
