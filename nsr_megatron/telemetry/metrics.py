"""Per-step metrics: ``<run_dir>/metrics.jsonl`` and TensorBoard events under ``<run_dir>/tb/``.

``metrics.jsonl`` holds one JSON object per step, ``{"step": N, "reward/mean": ..., ...}`` (the run directory
contract in the README, "Data, rewards, telemetry"), appended and flushed at every ``log`` so a crash loses at most the line being written. Values are
converted to float (0-d tensors and numpy scalars included); non-finite floats are written as ``null`` to keep the
file valid JSON (TensorBoard still receives them). Strings are kept in the JSON line and skipped in TensorBoard.

Resuming from a checkpoint at step S (``resume_step=S``) drops the lines with ``step > S`` (and a torn last line)
and tells TensorBoard to purge events after S, so both records continue as if the run had never gone past S.

Create the writer on the logging rank only (rank 0); it holds no global state.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"

# The keys every trainer step writes (the README's run directory contract); ``timing/*`` keys come in addition.
REQUIRED_KEYS: tuple[str, ...] = (
    "step", "reward/mean", "response_length/mean", "loss", "clip_frac/upper", "clip_frac/lower", "rescue_frac",
    "entropy", "grad_norm",
)


def to_scalar(value: Any) -> float | str | None:
    """A metric value -> float (numbers, bools, 0-d / one-element tensors and arrays), str (kept), or None.

    Raises:
        ValueError: for a multi-element tensor or any other type, naming it.
    """
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "item") and _numel(value) == 1:
        return float(value.item())
    raise ValueError(f"metric value {value!r:.80} of type {type(value).__name__} is not a scalar: log a number "
                     f"(e.g. tensor.item() or tensor.mean().item()).")


def _numel(value: Any) -> int | None:
    """Element count of a torch tensor (``numel()``) or numpy array/scalar (``size``); None otherwise."""
    numel = getattr(value, "numel", None)
    if callable(numel):
        return int(numel())
    size = getattr(value, "size", None)
    return size if isinstance(size, int) else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a run directory is accepted too); a torn last line is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records, _ = _read_lines(path)
    return records


def _read_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """``(records, number of unreadable lines)``."""
    records: list[dict[str, Any]] = []
    bad = 0
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            else:
                bad += 1
    return records, bad


class MetricsWriter:
    """Appends one JSON line per step to ``metrics.jsonl`` and mirrors numeric values to TensorBoard.

    Args:
        run_dir: the run directory (created if missing).
        resume_step: the step of the checkpoint being resumed: later lines and TB events are dropped. ``None``
            starts a new run, which refuses a non-empty ``metrics.jsonl`` unless ``overwrite``.
        tensorboard: also write TensorBoard events (skipped with one warning if tensorboard is missing).
        overwrite: with ``resume_step=None``, truncate an existing ``metrics.jsonl`` instead of refusing.
        required_keys: keys the first logged step should have (the run directory contract); a warning lists the missing
            ones once. Pass ``()`` for a writer that is not a trainer's.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
        overwrite: bool = False,
        required_keys: Sequence[str] = REQUIRED_KEYS,
    ) -> None:
        self.required_keys = tuple(required_keys)
        self._checked_keys = False
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.last_step: int | None = None
        if resume_step is not None:
            if resume_step < 0:
                raise ValueError(f"MetricsWriter(resume_step={resume_step}): the step must be >= 0.")
            self._truncate_after(resume_step)
        elif self.path.exists() and self.path.stat().st_size > 0 and not overwrite:
            raise ValueError(
                f"{self.path} already has metrics: pass resume_step=<checkpoint step> to resume this run, "
                f"overwrite=True to start it again, or choose a new run directory."
            )
        else:
            self.path.write_text("", encoding="utf-8")
        self._file = self.path.open("a", encoding="utf-8")
        self._tb: Any = None
        if tensorboard:
            self._tb = self._open_tensorboard(None if resume_step is None else resume_step + 1)

    def _truncate_after(self, resume_step: int) -> None:
        if not self.path.exists():
            logger.warning("resuming at step %d but %s does not exist: starting a new file.", resume_step, self.path)
            self.path.write_text("", encoding="utf-8")
            return
        records, bad = _read_lines(self.path)
        kept = [r for r in records if r["step"] <= resume_step]
        if bad or len(kept) < len(records):
            logger.info("%s: dropped %d lines after step %d and %d unreadable lines for the resume.",
                        self.path, len(records) - len(kept), resume_step, bad)
        tmp = self.path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)
        self.last_step = kept[-1]["step"] if kept else None

    def _open_tensorboard(self, purge_step: int | None) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            logger.warning("TensorBoard events are not written (%s): pip install tensorboard.", exc)
            return None
        return SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=purge_step)

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write ``metrics`` for ``step`` (steps must increase); the JSON line is flushed at once."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"MetricsWriter.log(step={step!r}): step must be an int >= 0.")
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"MetricsWriter.log(step={step}): step {self.last_step} was already logged; steps "
                             f"must increase (resume with resume_step=<checkpoint step> to rewrite them).")
        if not self._checked_keys:
            self._checked_keys = True
            missing = [k for k in self.required_keys if k != "step" and k not in metrics]
            if missing:
                logger.warning("%s: step %d lacks the metric keys %s that the README's telemetry section lists for every step.",
                               self.path, step, missing)
        record: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if key == "step":
                continue
            scalar = to_scalar(value)
            record[key] = None if isinstance(scalar, float) and not math.isfinite(scalar) else scalar
            if self._tb is not None and isinstance(scalar, float):
                self._tb.add_scalar(key, scalar, global_step=step)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.last_step = step

    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the file and the TensorBoard writer (idempotent)."""
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
