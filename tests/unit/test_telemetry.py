"""Telemetry: metrics.jsonl + TensorBoard (with resume), progress bar, PNG plots."""

from __future__ import annotations

import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nsr_megatron.telemetry import (
    REQUIRED_KEYS,
    MetricsWriter,
    ProgressBar,
    format_postfix,
    plot_reward_comparison,
    plot_run,
    read_metrics,
)
from nsr_megatron.telemetry.plots import moving_average
from nsr_megatron.telemetry.progress import format_duration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _step_metrics(step: int, reward_offset: float = 0.0) -> dict[str, float]:
    return {
        "reward/mean": min(1.0, 0.1 + 0.03 * step + reward_offset),
        "response_length/mean": 20.0 + step,
        "loss": 1.0 / step,
        "clip_frac/upper": 0.01 * (step % 5),
        "clip_frac/lower": 0.005 * (step % 3),
        "rescue_frac": 0.002 * (step % 4),
        "entropy": 2.0 - 0.02 * step,
        "grad_norm": 0.5,
        "timing/step_s": 0.6,
        "timing/rollout_s": 0.3,
    }


def _scalars(tb_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``tag`` as TensorBoard itself reads them back (purged steps removed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    events = acc.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


# ---------------------------------------------------------------------------------------------------- metrics


def test_metrics_jsonl_and_tensorboard(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 4):
            writer.log(step, {**_step_metrics(step), "note": "warmup", "kl": torch.tensor(0.25),
                              "n": np.int64(3), "bad": math.nan})
            lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
            assert len(lines) == step  # flushed at every step, before close
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert set(REQUIRED_KEYS) <= set(records[0])
    assert records[0]["kl"] == 0.25 and records[0]["n"] == 3.0 and records[0]["note"] == "warmup"
    assert records[0]["bad"] is None  # valid JSON: NaN becomes null
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    steps, values = _scalars(tmp_path / "tb", "reward/mean")
    assert steps == [1, 2, 3] and values == pytest.approx([0.13, 0.16, 0.19])
    assert _scalars(tmp_path / "tb", "timing/step_s")[0] == [1, 2, 3]


def test_metrics_writer_rejects_bad_input(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.log(1, {"loss": 1.0})
        with pytest.raises(ValueError, match="step 1 was already logged"):
            writer.log(1, {"loss": 1.0})
        with pytest.raises(ValueError, match="is not a scalar"):
            writer.log(2, {"loss": torch.ones(3)})
        with pytest.raises(ValueError, match="step must be an int"):
            writer.log(-1, {})


def test_missing_contract_keys_warn_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), MetricsWriter(tmp_path / "a", tensorboard=False) as writer:
        writer.log(1, {"loss": 1.0})
        writer.log(2, {"loss": 1.0})
    assert caplog.text.count("lacks the metric keys") == 1 and "'reward/mean'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING), MetricsWriter(tmp_path / "b", tensorboard=False) as writer:
        writer.log(1, _step_metrics(1))
    assert "lacks" not in caplog.text


def test_resume_truncates_later_steps_in_jsonl_and_tensorboard(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 11):
            writer.log(step, {"reward/mean": step / 10})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "reward/me')  # a line torn by a crash
    with MetricsWriter(tmp_path, resume_step=6) as writer:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
        with pytest.raises(ValueError, match="already logged"):
            writer.log(6, {"reward/mean": 0.0})
        writer.log(7, {"reward/mean": 7.0})
    assert [(r["step"], r["reward/mean"]) for r in read_metrics(tmp_path)][-2:] == [(6, 0.6), (7, 7.0)]
    steps, values = _scalars(tmp_path / "tb", "reward/mean")
    assert steps == [1, 2, 3, 4, 5, 6, 7] and values == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 7.0])


def test_new_run_refuses_existing_metrics_unless_overwrite(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.log(1, {"loss": 1.0})
    with pytest.raises(ValueError, match=r"already has metrics: pass resume_step=<checkpoint step>"):
        MetricsWriter(tmp_path, tensorboard=False)
    with MetricsWriter(tmp_path, tensorboard=False, overwrite=True) as writer:
        writer.log(5, {"loss": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5]


def test_missing_tensorboard_warns_and_still_writes_jsonl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with caplog.at_level(logging.WARNING), MetricsWriter(tmp_path) as writer:
        assert not writer.tensorboard_enabled
        writer.log(1, {"loss": 1.0})
    assert "pip install tensorboard" in caplog.text
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}] and not (tmp_path / "tb").exists()


# ---------------------------------------------------------------------------------------------------- progress


def test_progress_bar_shows_reward_and_rescue_when_forced() -> None:
    stream = io.StringIO()
    with ProgressBar(10, enabled=True, file=stream) as bar:
        assert bar.enabled
        bar.update(1, {"reward/mean": 0.5, "rescue_frac": 0.0123, "loss": 0.1})
        bar.update(3, {"reward/mean": 0.75, "rescue_frac": 0.02})
        assert bar.eta_seconds() is not None
    out = stream.getvalue()
    assert "reward=0.750" in out and "rescue=0.0200" in out and "3/10" in out


def test_progress_bar_off_for_non_tty_other_ranks_and_forced_off(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    assert not ProgressBar(10, file=stream).enabled  # StringIO is not a TTY
    assert not ProgressBar(10, enabled=True, rank=1, file=stream).enabled
    assert not ProgressBar(10, enabled=False, file=stream).enabled
    with caplog.at_level(logging.INFO, logger="nsr_megatron.telemetry"):
        bar = ProgressBar(10, initial_step=2, log_every=2, file=stream)
        for step in range(3, 7):
            bar.update(step, {"reward/mean": 0.25})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("step 4/10 reward=0.250 eta")
    assert stream.getvalue() == ""
    with pytest.raises(ValueError, match="initial_step=11"):
        ProgressBar(10, initial_step=11)


def test_format_helpers() -> None:
    assert format_postfix({"reward/mean": 1, "rescue_frac": 0.5, "loss": "x"}) == "reward=1.000 rescue=0.5000"
    assert format_duration(65) == "1:05" and format_duration(3725) == "1:02:05"
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


# ---------------------------------------------------------------------------------------------------- plots


def _assert_png(path: Path, min_bytes: int = 5_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes, (path, len(data))


def _write_run(run_dir: Path, steps: int, reward_offset: float = 0.0, **extra: Any) -> Path:
    with MetricsWriter(run_dir, tensorboard=False) as writer:
        for step in range(1, steps + 1):
            writer.log(step, {**_step_metrics(step, reward_offset), **extra})
    return run_dir / "metrics.jsonl"


def test_plot_run_writes_pngs(tmp_path: Path) -> None:
    _write_run(tmp_path, 30)
    written = plot_run(tmp_path, smooth=5)
    names = {p.name for p in written}
    assert names == {"reward.png", "response_length.png", "entropy.png", "clip_rescue.png", "timing.png"}
    for path in written:
        assert path.parent == tmp_path / "plots"
        _assert_png(path)


def test_plot_run_skips_absent_metrics(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(1, 5):
            writer.log(step, {"reward/mean": step / 4, "entropy": None})
    assert [p.name for p in plot_run(tmp_path, out_dir=tmp_path / "figs")] == ["reward.png"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_run(tmp_path / "elsewhere")


def test_plot_reward_comparison(tmp_path: Path) -> None:
    grpo = _write_run(tmp_path / "grpo", 25)
    nsr = _write_run(tmp_path / "nsr", 25, reward_offset=0.1)
    out = plot_reward_comparison([("grpo", grpo), ("nsr", tmp_path / "nsr")], tmp_path / "cmp" / "reward.png",
                                 smooth=3, title="GRPO vs NSR")
    _assert_png(out)
    assert json.loads(nsr.read_text().splitlines()[0])["step"] == 1
    with pytest.raises(ValueError, match="runs is empty"):
        plot_reward_comparison([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="none of the 1 runs has 'missing/key'"):
        plot_reward_comparison([("grpo", grpo)], tmp_path / "x.png", key="missing/key")
