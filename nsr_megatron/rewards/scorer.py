"""Time-limited, fault-tolerant reward scoring of a batch of responses.

Each reward call runs in a worker, process (default) or thread, with a per-call time limit. A call that raises
(``errors``), returns NaN, inf, None or anything that is not a number (``invalid``), kills its worker process
(``crashes``; the worker is replaced) or runs past ``timeout_s`` (``timeouts``) scores 0 and is counted in
``RewardStats``; the first of each kind is logged at WARNING with the sample and the value or reason, later ones at
DEBUG. The run goes on. In process mode a timed-out worker is killed and replaced, so even an infinite loop in C costs only
``timeout_s``; in thread mode a hung call can only be abandoned (its thread keeps running in the background).

The optional DAPO soft overlong punishment (arXiv 2503.14476) is added to each reward:

    R_len(y) = 0                          if |y| <= Lmax - Lc
             = ((Lmax - Lc) - |y|) / Lc   if Lmax - Lc < |y| <= Lmax
             = -1                         if |y| > Lmax

with Lmax = ``max_response_length``, Lc = ``overlong_buffer_length``, scaled by ``overlong_penalty_factor``.
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from nsr_megatron.rewards.builtin import BUILTIN_REWARDS, RewardFn, math_verify_available

logger = logging.getLogger(__name__)

EXECUTORS: tuple[str, ...] = ("process", "thread")
START_METHODS: tuple[str, ...] = ("spawn", "forkserver", "fork")
STARTUP_TIMEOUT_S = 60.0  # a worker process gets this long to start and import the reward before its first call


@dataclass(kw_only=True)
class RewardConfig:
    """Which reward to compute and how.

    Attributes:
        name: a built-in reward (``math``, ``exact_match``, ``synthetic``, ``reasoning_gym``: the task's own
            verifier on the last ``<answer>...</answer>`` or else the last non-empty line, for
            ``data.source=reasoning_gym``; it needs the optional reasoning-gym package) or a user one as
            ``"module:function"`` with the signature ``fn(response: str, answer: str, **kwargs) -> float``.
        kwargs: extra keyword arguments passed to every call (e.g. ``{"strict": True}`` for ``synthetic``).
        timeout_s: time limit per call; a call past it scores 0.
        executor: ``process`` (killable, default) or ``thread`` (no process start-up; a hang is only abandoned).
        num_workers: concurrent reward calls.
        start_method: multiprocessing start method of the process workers (``spawn`` is safe with torch threads
            and CUDA; ``fork`` starts faster on CPU-only hosts).
        overlong_punishment: add DAPO's soft overlong punishment (needs ``max_response_length``).
        max_response_length: Lmax, in tokens.
        overlong_buffer_length: Lc, in tokens: the punishment ramps from 0 to -1 over the last Lc tokens.
        overlong_penalty_factor: scale of the punishment (DAPO: 1.0).
    """

    name: str = "math"
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 10.0
    executor: Literal["process", "thread"] = "process"
    num_workers: int = 2
    start_method: Literal["spawn", "forkserver", "fork"] = "spawn"
    overlong_punishment: bool = False
    max_response_length: int | None = None
    overlong_buffer_length: int = 0
    overlong_penalty_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in BUILTIN_REWARDS and not _is_import_path(self.name):
            raise ValueError(
                f"RewardConfig.name={self.name!r} is neither a built-in reward {sorted(BUILTIN_REWARDS)} nor an "
                f"import path 'package.module:function'."
            )
        if not self.timeout_s > 0:
            raise ValueError(f"RewardConfig.timeout_s={self.timeout_s} must be > 0 seconds.")
        if self.executor not in EXECUTORS:
            raise ValueError(f"RewardConfig.executor={self.executor!r} is not one of {EXECUTORS}.")
        if self.num_workers < 1:
            raise ValueError(f"RewardConfig.num_workers={self.num_workers} must be >= 1.")
        if self.start_method not in START_METHODS:
            raise ValueError(f"RewardConfig.start_method={self.start_method!r} is not one of {START_METHODS}.")
        if self.overlong_punishment:
            if self.max_response_length is None or self.max_response_length < 1:
                raise ValueError(
                    f"RewardConfig.overlong_punishment needs max_response_length >= 1 "
                    f"(got {self.max_response_length}): set it to the rollout's max new tokens."
                )
            if not 0 < self.overlong_buffer_length <= self.max_response_length:
                raise ValueError(
                    f"RewardConfig.overlong_buffer_length={self.overlong_buffer_length} must be in "
                    f"(0, max_response_length={self.max_response_length}]: DAPO uses Lmax/4 or so."
                )
        elif self.overlong_buffer_length:
            logger.warning("RewardConfig.overlong_buffer_length=%d is ignored: overlong_punishment is off.",
                           self.overlong_buffer_length)


@dataclass
class RewardStats:
    """Counts of one batch (or, summed with ``+=``, of a whole run)."""

    calls: int = 0
    errors: int = 0  # the reward raised
    invalid: int = 0  # it returned NaN, inf, None or a non-number
    crashes: int = 0  # its worker process died mid-call (replaced)
    timeouts: int = 0
    seconds: float = 0.0

    def __iadd__(self, other: RewardStats) -> Self:
        for name in ("calls", "errors", "invalid", "crashes", "timeouts", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    @property
    def failed(self) -> int:
        """Calls that scored 0 because of a failure of any kind."""
        return self.errors + self.invalid + self.crashes + self.timeouts

    def as_metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """``{prefix}{errors,invalid,worker_crashes,timeouts}`` (counts of this batch)."""
        return {f"{prefix}errors": float(self.errors), f"{prefix}invalid": float(self.invalid),
                f"{prefix}worker_crashes": float(self.crashes), f"{prefix}timeouts": float(self.timeouts)}


def overlong_penalty(length: int, max_length: int, buffer_length: int, factor: float = 1.0) -> float:
    """DAPO soft overlong punishment R_len(|y|) (see the module docstring), times ``factor``."""
    expected = max_length - buffer_length
    if length <= expected:
        return 0.0
    if length <= max_length:
        return factor * (expected - length) / buffer_length
    return -factor


def _is_import_path(spec: str) -> bool:
    module, sep, attr = spec.partition(":")
    return bool(sep and module and attr and all(p.isidentifier() for p in module.split(".") + attr.split(".")))


def resolve_reward_fn(spec: str) -> RewardFn:
    """A built-in name or ``"module:function"`` -> the callable (``function`` may be dotted: ``Class.method``)."""
    path = BUILTIN_REWARDS.get(spec, spec)
    if not _is_import_path(path):
        raise ValueError(f"reward {spec!r} is neither built-in {sorted(BUILTIN_REWARDS)} nor 'module:function'.")
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"reward {spec!r}: cannot import module {module_name!r} ({exc}); "
                          f"is it on PYTHONPATH?") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {spec!r}: {module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"reward {spec!r} is a {type(obj).__name__}, not a function.")
    return obj


def _call(fn: RewardFn, response: str, answer: str, kwargs: Mapping[str, Any]) -> tuple[str, float | str]:
    """Run one reward call: ``("ok", value)``, ``("invalid", message)`` or ``("error", message)``."""
    try:
        value = fn(response, answer, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of user code scores 0 and is counted
        return "error", f"{type(exc).__name__}: {exc}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "invalid", f"returned {type(value).__name__} {value!r:.60}, not a number"
    if not math.isfinite(value):
        return "invalid", f"returned {value!r}, not a finite number"
    return "ok", float(value)


def _process_worker(conn: multiprocessing.connection.Connection, spec: str) -> None:
    """Worker process loop: receive ``(index, response, answer, kwargs)``, send ``(index, status, payload)``."""
    fn = resolve_reward_fn(spec)
    conn.send((None, "ready", 0.0))  # the time limit starts counting after the (slow) spawn + imports
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, response, answer, kwargs = task
        conn.send((index, *_call(fn, response, answer, kwargs)))


class _Worker:
    """One process or daemon thread running reward calls one at a time."""

    def __init__(self, scorer: RewardScorer) -> None:
        self.task: int | None = None
        self.started = 0.0
        self.ready = scorer.config.executor == "thread"
        self.process: Any = None
        self.conn: multiprocessing.connection.Connection | None = None
        self.inbox: queue.Queue[tuple[int, str, str, dict[str, Any]] | None] = queue.Queue()
        self.outbox = scorer._outbox
        if scorer.config.executor == "process":
            ctx: Any = multiprocessing.get_context(scorer.config.start_method)
            self.conn, child = ctx.Pipe()
            self.process = ctx.Process(target=_process_worker, args=(child, scorer.spec), daemon=True,
                                       name="nsr-reward-worker")
            self.process.start()
            child.close()
        else:
            fn = scorer.fn
            threading.Thread(target=self._thread_loop, args=(fn,), daemon=True, name="nsr-reward-worker").start()

    def _thread_loop(self, fn: RewardFn) -> None:
        while (task := self.inbox.get()) is not None:
            index, response, answer, kwargs = task
            self.outbox.put((self, index, *_call(fn, response, answer, kwargs)))

    def submit(self, index: int, response: str, answer: str, kwargs: dict[str, Any]) -> None:
        self.task, self.started = index, time.monotonic()
        if self.conn is not None:
            self.conn.send((index, response, answer, kwargs))
        else:
            self.inbox.put((index, response, answer, kwargs))

    def stop(self, kill: bool) -> None:
        """Kill (hung) or ask to exit (idle); a hung thread cannot be killed and is just forgotten."""
        if self.process is not None:
            if kill:
                self.process.kill()
            else:
                try:
                    assert self.conn is not None
                    self.conn.send(None)
                except OSError:
                    self.process.kill()
            self.process.join(timeout=2.0)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=2.0)
            assert self.conn is not None
            self.conn.close()
        else:
            self.inbox.put(None)


class RewardScorer:
    """Scores batches with the configured reward, in time-limited workers; use as a context manager or ``close()``.

    ``total_stats`` accumulates the ``RewardStats`` of every batch.
    """

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self.spec = BUILTIN_REWARDS.get(config.name, config.name)
        self.fn = resolve_reward_fn(self.spec)  # fail here, in the parent, with a clear error
        if config.name == "math" and not math_verify_available():
            logger.warning("math-verify is not installed: the 'math' reward compares normalised strings "
                           "(pip install math-verify for symbolic equivalence).")
        self.total_stats = RewardStats()
        self._outbox: queue.Queue[tuple[_Worker, int, str, float | str]] = queue.Queue()
        self._workers: list[_Worker] = []
        self._logged: set[str] = set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker."""
        for worker in self._workers:
            worker.stop(kill=worker.task is not None)
        self._workers = []

    def _log_once(self, kind: str, message: str) -> None:
        if kind in self._logged:
            logger.debug("reward %s: %s", kind, message)
        else:
            self._logged.add(kind)
            logger.warning("reward %r %s (scored 0; later ones are logged at DEBUG): %s", self.config.name,
                           kind, message)

    def _wait(self, busy: list[_Worker], timeout: float) -> list[tuple[_Worker, int, str, float | str]]:
        """Finished calls among ``busy`` within ``timeout`` seconds; a dead process reports an error."""
        if self.config.executor == "thread":
            try:
                done = [self._outbox.get(timeout=timeout)]
            except queue.Empty:
                return []
            while not self._outbox.empty():
                done.append(self._outbox.get_nowait())
            return [d for d in done if d[0] in busy and d[0].task == d[1]]  # drop abandoned threads' results
        by_conn: dict[Any, _Worker] = {w.conn: w for w in busy}
        finished: list[tuple[_Worker, int, str, float | str]] = []
        for conn in multiprocessing.connection.wait(list(by_conn), timeout=timeout):
            worker = by_conn[conn]
            assert worker.conn is not None and worker.task is not None
            try:
                index, status, payload = worker.conn.recv()
            except (EOFError, OSError):
                worker.process.join(timeout=1.0)
                code = worker.process.exitcode
                index, status, payload = worker.task, "crash", f"worker process died (exit code {code})"
            if status == "ready":
                worker.ready, worker.started = True, time.monotonic()
                continue
            finished.append((worker, index, status, payload))
        return finished

    def score_batch(
        self,
        responses: Sequence[str],
        answers: Sequence[str],
        response_lengths: Sequence[int] | None = None,
        extra_kwargs: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[list[float], RewardStats]:
        """Score ``responses[i]`` against ``answers[i]``; add the overlong punishment if configured.

        Args:
            responses: decoded responses.
            answers: ground truths, same length.
            response_lengths: response lengths in tokens (needed by the overlong punishment).
            extra_kwargs: per-sample keyword arguments merged over ``config.kwargs``.

        Returns:
            ``(rewards, stats)``: one float per response (0 + punishment for failed calls), this batch's stats.
        """
        n = len(responses)
        if len(answers) != n or (extra_kwargs is not None and len(extra_kwargs) != n):
            raise ValueError(f"score_batch: {n} responses but {len(answers)} answers"
                             f"{'' if extra_kwargs is None else f' and {len(extra_kwargs)} extra_kwargs'}.")
        if self.config.overlong_punishment and (response_lengths is None or len(response_lengths) != n):
            raise ValueError("score_batch: overlong_punishment is on, so pass response_lengths (one per response).")
        begin = time.monotonic()
        stats = RewardStats(calls=n)
        rewards = [0.0] * n
        pending = deque(range(n))
        while len(self._workers) < min(self.config.num_workers, n):
            self._workers.append(_Worker(self))
        timeout = self.config.timeout_s
        while pending or any(w.task is not None for w in self._workers):
            for worker in self._workers:
                if worker.task is None and pending:
                    i = pending.popleft()
                    kwargs = {**self.config.kwargs, **(extra_kwargs[i] if extra_kwargs is not None else {})}
                    worker.submit(i, responses[i], answers[i], kwargs)
            busy = [w for w in self._workers if w.task is not None]
            deadline = min(w.started + self._limit(w) for w in busy)
            for worker, index, status, payload in self._wait(busy, max(0.0, deadline - time.monotonic())):
                if status == "ok":
                    rewards[index] = float(payload)
                else:
                    kind = {"invalid": "invalid", "crash": "crashes"}.get(status, "errors")
                    setattr(stats, kind, getattr(stats, kind) + 1)
                    self._log_once(status, f"sample {index}: {payload}")
                worker.task = None
                if status == "crash":
                    self._replace(worker, kill=True)
            now = time.monotonic()
            for worker in [w for w in self._workers if w.task is not None and now - w.started >= self._limit(w)]:
                stats.timeouts += 1
                what = f"ran past timeout_s={timeout}" if worker.ready else (
                    f"worker did not start within {STARTUP_TIMEOUT_S} s")
                self._log_once("timeout", f"sample {worker.task} {what}")
                self._replace(worker, kill=True)
        if self.config.overlong_punishment:
            assert response_lengths is not None and self.config.max_response_length is not None
            for i, length in enumerate(response_lengths):
                rewards[i] += overlong_penalty(int(length), self.config.max_response_length,
                                               self.config.overlong_buffer_length,
                                               self.config.overlong_penalty_factor)
        stats.seconds = time.monotonic() - begin
        self.total_stats += stats
        return rewards, stats

    def _limit(self, worker: _Worker) -> float:
        return self.config.timeout_s if worker.ready else max(self.config.timeout_s, STARTUP_TIMEOUT_S)

    def _replace(self, worker: _Worker, kill: bool) -> None:
        worker.stop(kill=kill)
        worker.task = None
        self._workers[self._workers.index(worker)] = _Worker(self)


def score_batch(
    config: RewardConfig,
    responses: Sequence[str],
    answers: Sequence[str],
    response_lengths: Sequence[int] | None = None,
) -> tuple[list[float], RewardStats]:
    """One-shot convenience: start a ``RewardScorer``, score one batch, stop the workers."""
    with RewardScorer(config) as scorer:
        return scorer.score_batch(responses, answers, response_lengths)
