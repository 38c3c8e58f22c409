"""Cost of the MoE routing profiler and of routing replay, as a ratio of RL step time in one process.

One quickstart run (in-process) whose steps take turns between five modes: ``profile.routing`` off, counters and
full, and ``algorithm.routing_replay`` R2 and R3 (profiler off). The bench installs and removes the profiler's
hooks and the replay between steps, as ``build_runtime`` would for a run in that mode, so every mode sees the same
model, data and machine state; each cycle visits the modes in a rotated order, so the machine's drift falls on all
of them alike. A mode's ratio is the median over cycles of its step time / the same cycle's ``off`` step.

Usage:
    python bench/bench_routing.py                       # 3 warm-up steps, then 12 cycles of 5 steps
    python bench/bench_routing.py --cycles 20 rollout.max_new_tokens=16 model.tiny.num_experts=8
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from typing import Any

warnings.filterwarnings("ignore")

MODES = ("off", "counters", "full", "replay R2", "replay R3")


def set_mode(rt: Any, mode: str) -> None:
    """Put ``rt`` in ``mode``: the hooks and options a run started in that mode would have."""
    from nsr_megatron.models.routing import RoutingProfiler, RoutingReplay

    if rt.policy.routing is not None:
        rt.policy.routing.remove()
    rt.policy.routing, rt.policy.replay = None, None
    arch, sp = rt.arch, rt.config.parallel.sequence_parallel
    layers = [i for i, moe in enumerate(arch.moe_layers) if moe]
    if mode in ("counters", "full"):
        rt.policy.routing = RoutingProfiler(rt.policy.gpt, layers, arch.num_experts, arch.moe_topk,
                                            full=mode == "full", sequence_parallel=sp)
    if mode.startswith("replay"):
        rt.policy.replay = RoutingReplay(rt.policy.gpt, layers, arch.moe_topk, mode=mode[-2:], sequence_parallel=sp)
    rt.routed_experts = mode in ("counters", "full", "replay R3")  # what wants_routed_experts gives


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="quickstart config overrides")
    args = ap.parse_args()
    logging.disable(logging.WARNING)

    from nsr_megatron import parallel
    from nsr_megatron.cli import CONFIGS_DIR, prepare_quickstart
    from nsr_megatron.config import load_config
    from nsr_megatron.telemetry.status import PhaseTimer
    from nsr_megatron.trainer.loop import rl_step, sync_weights
    from nsr_megatron.trainer.preflight import preflight
    from nsr_megatron.trainer.runtime import build_runtime

    steps = args.warmup + args.cycles * len(MODES)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as d:
        config = load_config(CONFIGS_DIR / "quickstart.yaml", [
            f"run.run_dir={d}/run", f"run.steps={steps}", "checkpoint.save_interval=0", "profile.routing=full",
            "algorithm.routing_replay=R2", *args.overrides])  # built with every hook point; set_mode picks
        config = prepare_quickstart(config, task="echo", num_prompts=1024)
        rt = build_runtime(config, preflight(config, world_size=1), world_size=1)
        phases = PhaseTimer(rt.run_dir, write_status=False)
        try:
            sync_weights(rt, 0)
            set_mode(rt, "off")
            for step in range(args.warmup):
                rl_step(rt, step, phases)
            step = args.warmup
            for c in range(args.cycles):
                for mode in MODES[c % len(MODES):] + MODES[: c % len(MODES)]:
                    set_mode(rt, mode)
                    phases.start_step(step + 1)
                    t0 = time.perf_counter()
                    rl_step(rt, step, phases)
                    times[mode].append(time.perf_counter() - t0)
                    step += 1
        finally:
            rt.close()
            parallel.destroy()

    print(f"{args.cycles} cycles of {len(MODES)} steps, one per mode (after {args.warmup} warm-up steps); ratio: "
          "median over cycles of the mode's step / the same cycle's `off` step")
    print(f"{'mode':<12} {'median step':>12} {'ratio to off':>13} {'middle half of ratios':>22}")
    for mode, t in times.items():
        ratios = sorted(a / b for a, b in zip(t, times["off"], strict=True))
        q = len(ratios) // 4
        print(f"{mode:<12} {statistics.median(t) * 1e3:9.1f} ms {statistics.median(ratios):12.3f} "
              f"{ratios[q]:13.3f}-{ratios[-q - 1]:.3f}")


if __name__ == "__main__":
    main()
