"""Where a run is right now: ``<run_dir>/status.json`` names the step and phase in progress, and the step's
phase timings.

``status.json`` is ``{"step": 12, "phase": "train", "pid": 4242, "time": 1764432000.5}``: the step being worked on
(1-based), the phase that started last (``rollout``, ``rewards``, ``logprobs``, ``train``, ``weight_sync``,
``checkpoint``; ``done`` at the end) and the process. It is replaced atomically at every phase start by the logging
rank, so a watcher (a person with ``watch cat``, a scheduler's health check, a test that kills the run in a given
phase) always reads a whole file.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["STATUS_FILE", "PhaseTimer", "read_status"]

STATUS_FILE = "status.json"


def read_status(run_dir: str | Path) -> dict[str, object] | None:
    """The run's current ``status.json``, or None when there is none yet."""
    try:
        with open(Path(run_dir) / STATUS_FILE, encoding="utf-8") as f:
            return dict(json.load(f))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class PhaseTimer:
    """Times the named phases of each step (``timing/<phase>``, summed when a phase repeats within a step, as
    rollout and rewards do under dynamic sampling) and records the phase in progress in ``status.json``."""

    def __init__(self, run_dir: str | Path, *, write_status: bool, annotate: bool = False) -> None:
        self.path = Path(run_dir) / STATUS_FILE
        self.write_status = write_status
        self.annotate = annotate  # named ranges for torch.profiler (and NVTX on CUDA, for nsys)
        self.step = 0
        self.seconds: dict[str, float] = {}
        self._began = time.perf_counter()

    def start_step(self, step: int) -> None:
        """Begin step ``step`` (1-based): the timings start from zero."""
        self.step, self.seconds, self._began = step, {}, time.perf_counter()

    def mark(self, phase: str) -> None:
        """Record that ``phase`` of the current step has begun."""
        if not self.write_status:
            return
        tmp = self.path.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"step": self.step, "phase": phase, "pid": os.getpid(), "time": time.time()}, f)
        os.replace(tmp, self.path)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self.mark(phase)
        start = time.perf_counter()
        ranges = _ranges(f"nsr/{phase}") if self.annotate else contextlib.nullcontext()
        try:
            with ranges:
                yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def timings(self) -> dict[str, float]:
        """``{"timing/<phase>": seconds}`` of the current step, and ``timing/step`` (the whole step so far)."""
        return {**{f"timing/{k}": v for k, v in self.seconds.items()},
                "timing/step": time.perf_counter() - self._began}


@contextmanager
def _ranges(name: str) -> Iterator[None]:
    """A ``torch.profiler.record_function`` range, and an NVTX range on CUDA (``nsys`` shows those)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if cuda:
            torch.cuda.nvtx.range_pop()
