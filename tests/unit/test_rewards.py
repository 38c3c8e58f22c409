"""Rewards: math-verify answer checking, exact match, synthetic reward, user rewards, time limits, overlong."""

from __future__ import annotations

import logging
import multiprocessing
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nsr_megatron.rewards import (
    RewardConfig,
    RewardScorer,
    builtin,
    exact_match,
    extract_boxed,
    math_reward,
    overlong_penalty,
    resolve_reward_fn,
    score_batch,
    synthetic_reward,
)

USER_REWARDS = textwrap.dedent(
    """
    import math
    import os
    import time

    def length_match(response, answer, scale=1.0, bonus=0.0, **kw):
        return scale * float(len(response) == len(answer)) + bonus

    def spin(response, answer, **kw):
        if response == "hang":
            while True:
                pass
        return 1.0

    def sleep_forever(response, answer, **kw):
        if response == "hang":
            time.sleep(10_000)
        return 1.0

    def boom(response, answer, **kw):
        raise RuntimeError(f"cannot score {response!r}")

    def not_a_number(response, answer, **kw):
        return {"str": "yes", "nan": math.nan, "inf": -math.inf, "none": None}.get(response, 0.5)

    def slow(response, answer, **kw):
        if response == "slow":
            time.sleep(30)
        return 1.0

    def die(response, answer, **kw):
        if response == "die":
            os._exit(3)
        return 1.0

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real module on sys.path (spawned workers inherit sys.path), named uniquely per test."""
    name = f"user_rewards_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(USER_REWARDS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


# ---------------------------------------------------------------------------------------------------- functions


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\fbox{x^{2}}", "x^{2}"),
        ("$\\boxed 7$", "7"),
        ("\\boxed{unclosed", None),
        ("no box", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
        ("\\boxed{3}", "4", 0.0),
        ("The answer is 4", "4", 0.0),  # no box, and a box is required by default
        ("\\boxed{\\frac{1}{2}}", "\\boxed{\\frac{2}{4}}", 1.0),
    ],
)
def test_math_reward_with_math_verify(response: str, answer: str, expected: float) -> None:
    assert builtin.math_verify_available()
    assert math_reward(response, answer) == expected


def test_math_reward_without_box_when_allowed() -> None:
    assert math_reward("The final answer is 42", "42", require_boxed=False) == 1.0


def test_math_reward_fallback_without_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "math_verify_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="math-verify is not installed"):
        assert math_reward("\\boxed{ \\dfrac{1}{2} }", "$\\frac{1}{2}$") == 1.0
    with pytest.warns(RuntimeWarning):
        assert math_reward("\\boxed{2.50}", "2.5") == 1.0
    with pytest.warns(RuntimeWarning):
        assert math_reward("\\boxed{0.5}", "\\frac{1}{2}") == 0.0  # strings cannot see this equivalence


def test_exact_match_and_synthetic_reward() -> None:
    assert exact_match("  hello \n world ", "hello world") == 1.0
    assert exact_match("hello", "Hello") == 0.0
    assert synthetic_reward("7<eos>", "7") == 1.0
    assert synthetic_reward(" 7 7", "7") == 1.0  # lenient: the first symbol counts
    assert synthetic_reward("77", "7", strict=True) == 0.0
    assert synthetic_reward("<eos>", "7") == 0.0
    # a long answer: the share of its positions right (a wrong symbol costs one position; a short response the rest)
    assert synthetic_reward("7777", "7777") == 1.0 and synthetic_reward("7 7 7 7 7<eos>", "7777") == 1.0
    assert synthetic_reward("7377", "7777") == 0.75 and synthetic_reward("77<eos>", "7777") == 0.5
    assert synthetic_reward("3777", "7777", strict=True) == 0.0 and synthetic_reward("", "7777") == 0.0


def test_overlong_penalty_matches_dapo() -> None:
    # Lmax = 10, Lc = 4: free up to 6 tokens, linear ramp to -1 at 10, -1 beyond.
    assert [overlong_penalty(n, 10, 4) for n in (0, 6, 7, 8, 10, 11, 50)] == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0,
                                                                             -1.0]
    assert overlong_penalty(8, 10, 4, factor=2.0) == -1.0


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "nope"}, "neither a built-in reward"),
        ({"name": "pkg.mod:"}, "neither a built-in reward"),
        ({"timeout_s": 0}, "timeout_s=0"),
        ({"executor": "ray"}, "executor='ray'"),
        ({"num_workers": 0}, "num_workers=0"),
        ({"overlong_punishment": True}, "needs max_response_length"),
        ({"overlong_punishment": True, "max_response_length": 8, "overlong_buffer_length": 9},
         "overlong_buffer_length=9"),
    ],
)
def test_reward_config_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RewardConfig(**kwargs)


def test_resolve_reward_fn_errors(user_module: str) -> None:
    assert resolve_reward_fn("exact_match") is exact_match
    assert resolve_reward_fn(f"{user_module}:boom").__name__ == "boom"
    with pytest.raises(ImportError, match="cannot import module 'no_such_module_xyz'"):
        resolve_reward_fn("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        resolve_reward_fn(f"{user_module}:missing")
    with pytest.raises(TypeError, match="not a function"):
        resolve_reward_fn(f"{user_module}:NOT_CALLABLE")
    with pytest.raises(ImportError):
        RewardScorer(RewardConfig(name="no_such_module_xyz:f"))  # fails at construction, not mid-run


# ---------------------------------------------------------------------------------------------------- scoring


def test_score_batch_builtin_in_processes() -> None:
    responses = ["\\boxed{\\frac{1}{2}}", "\\boxed{3}", "no box", "\\boxed{10}"]
    rewards, stats = score_batch(RewardConfig(name="math", num_workers=2), responses, ["0.5", "4", "1", "10"])
    assert rewards == [1.0, 0.0, 0.0, 1.0]
    assert (stats.calls, stats.errors, stats.timeouts) == (4, 0, 0)


def test_user_reward_kwargs_and_overlong_in_threads(user_module: str) -> None:
    config = RewardConfig(name=f"{user_module}:length_match", executor="thread", kwargs={"scale": 2.0},
                          overlong_punishment=True, max_response_length=10, overlong_buffer_length=4)
    with RewardScorer(config) as scorer:
        rewards, stats = scorer.score_batch(["ab", "abc", "ab"], ["xy", "xy", "xy"], response_lengths=[3, 8, 12],
                                            extra_kwargs=[{}, {}, {"bonus": 0.5}])
        assert rewards == [2.0, -0.5, 2.5 - 1.0]
        assert stats.calls == 3 and scorer.total_stats.calls == 3
        with pytest.raises(ValueError, match="pass response_lengths"):
            scorer.score_batch(["a"], ["a"])
        with pytest.raises(ValueError, match="2 responses but 1 answers"):
            scorer.score_batch(["a", "b"], ["a"], [1, 1])


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_errors_are_scored_zero_counted_and_logged_once(
    user_module: str, executor: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="nsr_megatron.rewards"):
        with RewardScorer(RewardConfig(name=f"{user_module}:boom", executor=executor, num_workers=1)) as scorer:
            rewards, stats = scorer.score_batch(["a", "b", "c"], ["x", "x", "x"])
        bad_config = RewardConfig(name=f"{user_module}:not_a_number", executor=executor, num_workers=1)
        with RewardScorer(bad_config) as scorer:  # one worker: the calls finish in order
            bad, bad_stats = scorer.score_batch(["nan", "str", "inf", "none", "fine"], ["x"] * 5)
    assert rewards == [0.0, 0.0, 0.0] and (stats.errors, stats.invalid, stats.timeouts) == (3, 0, 0)
    assert bad == [0.0, 0.0, 0.0, 0.0, 0.5] and (bad_stats.errors, bad_stats.invalid) == (0, 4)
    assert bad_stats.as_metrics()["reward/invalid"] == 4.0 and stats.as_metrics()["reward/errors"] == 3.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per scorer and kind, with the first message
    assert "RuntimeError: cannot score 'a'" in warnings[0]
    assert "invalid" in warnings[1] and "sample 0: returned nan, not a finite number" in warnings[1]


def test_hung_process_is_killed_scored_zero_and_the_run_goes_on(
    user_module: str, caplog: pytest.LogCaptureFixture
) -> None:
    timeout = 1.0
    config = RewardConfig(name=f"{user_module}:spin", timeout_s=timeout, num_workers=2)
    with RewardScorer(config) as scorer:
        scorer.score_batch(["warm", "warm"], ["x", "x"])  # start the workers (spawn + import) outside the clock
        begin = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="nsr_megatron.rewards"):
            rewards, stats = scorer.score_batch(["ok", "hang", "ok", "ok"], ["x"] * 4)
        elapsed = time.monotonic() - begin
        assert rewards == [1.0, 0.0, 1.0, 1.0]
        assert (stats.calls, stats.errors, stats.timeouts) == (4, 0, 1)
        assert timeout <= elapsed < timeout + 2.0
        assert "ran past timeout_s=1.0" in caplog.text
        rewards, stats = scorer.score_batch(["ok", "ok"], ["x", "x"])  # the replaced worker serves again
        assert rewards == [1.0, 1.0] and stats.timeouts == 0
        assert scorer.total_stats.timeouts == 1 and scorer.total_stats.calls == 8
        assert len(multiprocessing.active_children()) <= config.num_workers  # the hung process is gone
    assert not multiprocessing.active_children()


def test_hung_thread_is_abandoned_and_scored_zero(user_module: str) -> None:
    config = RewardConfig(name=f"{user_module}:sleep_forever", timeout_s=0.5, executor="thread", num_workers=2)
    with RewardScorer(config) as scorer:
        begin = time.monotonic()
        rewards, stats = scorer.score_batch(["hang", "ok", "hang", "ok"], ["x"] * 4)
        elapsed = time.monotonic() - begin
        assert rewards == [0.0, 1.0, 0.0, 1.0] and stats.timeouts == 2
        assert elapsed < 2 * 0.5 + 1.0
        assert scorer.score_batch(["ok"], ["x"])[0] == [1.0]


def test_crashed_worker_process_is_replaced_and_counted(user_module: str) -> None:
    with RewardScorer(RewardConfig(name=f"{user_module}:die", num_workers=1)) as scorer:
        rewards, stats = scorer.score_batch(["ok", "die", "ok"], ["x"] * 3)
    assert rewards == [1.0, 0.0, 1.0] and (stats.crashes, stats.errors, stats.timeouts) == (1, 0, 0)
    assert stats.as_metrics()["reward/worker_crashes"] == 1.0


def test_worker_killed_from_outside_mid_batch_is_replaced(user_module: str) -> None:
    """A worker process SIGKILLed while scoring (the OOM killer, an operator): its sample scores 0 and is
    counted, the other samples are scored, and the replacement worker serves the next batch."""
    import os
    import signal
    import threading

    config = RewardConfig(name=f"{user_module}:slow", num_workers=2, timeout_s=60.0)
    with RewardScorer(config) as scorer:
        scorer.score_batch(["warm", "warm"], ["x", "x"])  # start both workers
        before = {w.process.pid for w in scorer._workers}

        def kill_the_busy_worker() -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                busy = [w for w in scorer._workers if w.task == 1 and w.process is not None]
                if busy:
                    time.sleep(0.2)  # let the call start inside the worker
                    os.kill(busy[0].process.pid, signal.SIGKILL)
                    return
                time.sleep(0.01)

        killer = threading.Thread(target=kill_the_busy_worker)
        killer.start()
        begin = time.monotonic()
        rewards, stats = scorer.score_batch(["ok", "slow", "ok", "ok"], ["x"] * 4)
        killer.join()
        assert time.monotonic() - begin < 20, "the killed call was waited for until its time-out"
        assert rewards == [1.0, 0.0, 1.0, 1.0]
        assert (stats.crashes, stats.errors, stats.timeouts) == (1, 0, 0)
        after = {w.process.pid for w in scorer._workers}
        assert len(after) == 2 and after != before  # the dead worker was replaced
        assert scorer.score_batch(["ok", "ok"], ["x", "x"])[0] == [1.0, 1.0]
