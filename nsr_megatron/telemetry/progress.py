"""Console progress: a tqdm bar with ETA, reward and rescue fraction; plain log lines where a bar makes no sense.

The bar is shown only on rank 0 and only when the stream is a terminal (Slurm logs and CI get no carriage-return
noise), unless forced with ``enabled=True`` / ``enabled=False``. When the bar is off, ``log_every=N`` writes one
``logging`` line every N steps with the same fields and the ETA instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import IO, Any, Self

logger = logging.getLogger(__name__)

# (metrics key, short label, format) shown after the bar, in this order, when present.
POSTFIX_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("reward/mean", "reward", "{:.3f}"),
    ("rescue_frac", "rescue", "{:.4f}"),
    ("response_length/mean", "len", "{:.0f}"),
    ("loss", "loss", "{:.4g}"),
)


def format_postfix(metrics: Mapping[str, Any]) -> str:
    """``"reward=0.531 rescue=0.0123 ..."`` for the ``POSTFIX_FIELDS`` present (non-numeric values skipped)."""
    parts = []
    for key, label, fmt in POSTFIX_FIELDS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{label}={fmt.format(value)}")
    return " ".join(parts)


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1:02:05"``, ``65`` -> ``"1:05"``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """Training progress over ``total_steps`` steps, starting at ``initial_step`` (for resumed runs).

    Args:
        total_steps: the last step of the run.
        initial_step: steps already done (a resumed run starts its bar and ETA there).
        rank: the process's global rank; ranks other than 0 never show anything.
        enabled: ``None`` (auto: on when ``file`` is a TTY), ``True`` (force on, rank 0) or ``False`` (force off).
        log_every: when the bar is off, log a line every this many steps on rank 0 (0: never).
        file: stream of the bar (default ``sys.stderr``).
    """

    def __init__(
        self,
        total_steps: int,
        *,
        initial_step: int = 0,
        rank: int = 0,
        enabled: bool | None = None,
        log_every: int = 0,
        file: IO[str] | None = None,
        desc: str = "train",
    ) -> None:
        if total_steps < 1 or not 0 <= initial_step <= total_steps:
            raise ValueError(f"ProgressBar(total_steps={total_steps}, initial_step={initial_step}): need "
                             f"total_steps >= 1 and 0 <= initial_step <= total_steps.")
        if log_every < 0:
            raise ValueError(f"ProgressBar(log_every={log_every}) must be >= 0 (0 turns the log lines off).")
        self.total_steps = total_steps
        self.initial_step = initial_step
        self.step = initial_step
        self.log_every = log_every if rank == 0 else 0
        self._start = time.monotonic()
        stream = file if file is not None else sys.stderr
        is_tty = bool(getattr(stream, "isatty", lambda: False)())
        show = rank == 0 and (is_tty if enabled is None else enabled)
        self._bar: Any = None
        if show:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, unit="step", file=stream,
                             dynamic_ncols=True)

    @property
    def enabled(self) -> bool:
        """Whether a bar is shown."""
        return self._bar is not None

    def eta_seconds(self) -> float | None:
        """Estimated seconds left, from the mean time per step since this bar started (None before a step)."""
        done = self.step - self.initial_step
        if done <= 0:
            return None
        return (time.monotonic() - self._start) / done * (self.total_steps - self.step)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Move to ``step`` (the step just finished) and show ``metrics``' reward, rescue fraction, ..."""
        postfix = format_postfix(metrics or {})
        if self._bar is not None:
            self._bar.update(step - self.step)
            self._bar.set_postfix_str(postfix, refresh=True)
        self.step = step
        if self._bar is None and self.log_every and step % self.log_every == 0:
            eta = self.eta_seconds()
            logger.info("step %d/%d %s eta %s", step, self.total_steps, postfix,
                        "?" if eta is None else format_duration(eta))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
