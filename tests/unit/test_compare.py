"""Multi-seed aggregation of ``nsr-megatron compare`` on hand-made runs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from nsr_megatron.telemetry.compare import aggregate, interval, plot_comparison, read_runs, table


def test_interval_is_student_t() -> None:
    assert interval([2.0]) == (2.0, 0.0)
    mean, half = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3**0.5, rel=1e-4)  # t(0.975, 2) = 4.30265


def _run(path: Path, rewards: list[float]) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "reward/mean": r, "entropy": 1.0})
                                                + "\n" for i, r in enumerate(rewards)))
    return path


def test_final_best_spread_and_outputs(tmp_path: Path) -> None:
    runs = {"dapo": {1: _run(tmp_path / "d1", [0.1, 0.5, 0.3, 0.2]), 2: _run(tmp_path / "d2", [0.1, 0.2, 0.3, 0.4])},
            "nsr": {1: _run(tmp_path / "n1", [0.2, 0.4, 0.6, 0.8])}}
    summary = aggregate(read_runs(runs), tail=2)
    d = summary["metrics"]["reward/mean"]["dapo"]
    assert d["finals"] == pytest.approx([0.25, 0.35]) and d["final"] == pytest.approx(0.3)
    assert d["best"] == pytest.approx((0.4 + 0.35) / 2)  # best 2-step means: 0.4 (0.5, 0.3) and 0.35
    assert d["spread"] == pytest.approx(statistics.stdev([0.25, 0.35]))
    assert [p["mean"] for p in d["curve"]] == pytest.approx([0.1, 0.35, 0.3, 0.3])
    n = summary["metrics"]["reward/mean"]["nsr"]
    assert n["seeds"] == 1 and n["final_ci"] == 0.0 and n["final"] == pytest.approx(0.7)
    text = table(summary)
    assert "| reward/mean | dapo | 2 | 0.3000 +- " in text and "| entropy | nsr | 1 |" in text
    assert "eval/pass@1" not in summary["metrics"]  # no run logged it
    png = plot_comparison(summary, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
