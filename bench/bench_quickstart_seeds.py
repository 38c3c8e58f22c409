"""Does the quickstart learn on every seed and thread count? Runs the real CLI once per (seed, threads).

For each run it prints the mean reward of the first 5 and last 5 steps, the best 10-step window, the last 10 steps
and the verdict of :func:`nsr_megatron.telemetry.summary.learning_summary` (gain >= 0.3, last 10 >= 0.8 x best
window). Different thread counts change torch's reduction order, which stands in for another CPU's rounding.

Usage:
    python bench/bench_quickstart_seeds.py                          # seeds 1-10, 1 and 2 threads, 2 runs at a time
    python bench/bench_quickstart_seeds.py --seeds 1-3 --threads 2 optimizer.lr=2e-3
    python bench/bench_quickstart_seeds.py --task repeat --seeds 1-5   # the task where clipping matters

Besides the verdict it prints the largest clipped and in-band token fractions of the run (``clip_frac``,
``band_frac``) and the last held-out pass@1 when the config evaluates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsr_megatron.telemetry.summary import learning_summary  # noqa: E402


def parse_range(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def one_run(seed: int, threads: int, overrides: list[str], root: Path, task: str) -> dict[str, Any]:
    run_dir = root / f"seed{seed}-t{threads}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "nsr_megatron.cli", "quickstart", "--task", task, "--no-progress",
           f"run.run_dir={run_dir}",
           f"run.seed={seed}", "checkpoint.save_interval=0", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"seed": seed, "threads": threads, "error": proc.stderr[-2000:], "seconds": seconds}
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8") if line.strip()]
    s = learning_summary([r["reward/mean"] for r in rows])
    evals = [r["eval/pass@1"] for r in rows if "eval/pass@1" in r]
    return {"seed": seed, "threads": threads, "summary": s, "seconds": seconds,
            "clip": max(r.get("clip_frac", 0.0) for r in rows), "band": max(r.get("band_frac", 0.0) for r in rows),
            "pass1": f"{evals[-1]:.3f}" if evals else "-"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1-10", help="e.g. 1-10 or 1,3,5 (default: %(default)s)")
    ap.add_argument("--threads", default="1,2", help="torch thread counts (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default: %(default)s)")
    ap.add_argument("--task", default="echo", help="quickstart task (default: %(default)s)")
    ap.add_argument("overrides", nargs="*", help="quickstart config overrides, e.g. optimizer.lr=2e-3")
    args = ap.parse_args()
    runs = [(s, t) for t in parse_range(args.threads) for s in parse_range(args.seeds)]
    with tempfile.TemporaryDirectory() as d, ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda st: one_run(st[0], st[1], args.overrides, Path(d), args.task), runs))
    print(f"task {args.task}; overrides: {' '.join(args.overrides) or '(none: the shipped config)'}")
    print("| seed | threads | first 5 | last 5 | best 10-step window | last 10 | learned | max clip_frac | "
          "max band_frac | last eval pass@1 | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    learned = 0
    for r in results:
        if "error" in r:
            print(f"| {r['seed']} | {r['threads']} | error | | | | no | | | | {r['seconds']:.0f} |")
            print(r["error"], file=sys.stderr)
            continue
        s = r["summary"]
        learned += s.learned
        print(f"| {r['seed']} | {r['threads']} | {s.first:.3f} | {s.last:.3f} | {s.best_window:.3f} | "
              f"{s.last_window:.3f} | {'yes' if s.learned else 'NO'} | {r['clip']:.3f} | {r['band']:.3f} | "
              f"{r['pass1']} | {r['seconds']:.0f} |")
    print(f"learned in {learned} of {len(results)} runs")
    sys.exit(0 if learned == len(results) else 1)


if __name__ == "__main__":
    main()
