"""A short soak of the rollout tier, with the harness of ``bench/soak.py``: the quickstart with two server engines
for 40 steps, one engine SIGKILLed during step 16's weight sync and the other during step 28's rollout. Every step is
logged once, each kill is counted once in ``rollout/restarts``, the trainer's descriptors, threads and memory stay
flat, no rollout hangs, and no engine or supervisor outlives the run. The full soak (300 steps) is in
bench/RESULTS.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_soak", ROOT / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


soak = _harness()


def test_the_kill_schedule_is_seeded_and_bounded() -> None:
    plan = soak.kill_schedule(300, 30, 60, seed=0)
    assert plan == soak.kill_schedule(300, 30, 60, seed=0) and plan != soak.kill_schedule(300, 30, 60, seed=1)
    gaps = [b.step - a.step for a, b in zip([soak.Kill(0, 0, "rollout"), *plan], plan, strict=False)]
    assert all(30 <= g <= 60 for g in gaps) and plan[-1].step <= 299 and 300 - plan[-1].step <= 60 + 1
    assert {k.phase for k in plan} <= set(soak.PHASES) and {k.engine for k in plan} <= {0, 1}
    assert {k.phase for k in soak.kill_schedule(300, 5, 9, seed=0, phases=("weight_sync",))} == {"weight_sync"}
    with pytest.raises(ValueError, match="MIN <= MAX"):
        soak.kill_schedule(10, 5, 4, seed=0)
    with pytest.raises(ValueError, match="choose among"):
        soak.kill_schedule(10, 2, 4, seed=0, phases=("checkpoint",))


@pytest.mark.timeout(300)
def test_two_engines_survive_kills_without_gaps_leaks_or_leftovers(tmp_path: Path) -> None:
    spec = soak.SoakSpec(steps=40, kill_every=(12, 16), seed=34, out=tmp_path, warmup=11, window=10, timeout_s=240,
                         save_interval=10)  # the early window starts after the first checkpoint (SoakSpec.warmup)
    assert [(k.step, k.phase) for k in soak.kill_schedule(spec.steps, *spec.kill_every, spec.seed)] == [
        (16, "weight_sync"), (28, "rollout")]
    result = soak.run_soak(spec)
    print(soak.report(result))
    log = (tmp_path / "trainer.log").read_text(errors="replace")
    assert result.ok, f"{result.failures()}\n{soak.report(result)}\n{log[-3000:]}"
    assert len(result.kills) == 2 and "restarting it" in log
