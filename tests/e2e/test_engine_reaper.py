"""Engines never outlive their trainer: a trainer SIGKILLed (as a scheduler or the OOM killer does) takes the
engines it launched with it within seconds, the project's server and SGLang alike (SGLang's own child processes
included), also under torchrun; an engine attached with ``rollout.urls`` is never touched.

Each test starts the real CLI, waits until it reports its engines healthy, SIGKILLs the process that launched them,
and looks at ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nsr_megatron.rollout.pool import EngineLauncher
from tests.e2e.test_rl_loop import ROOT, _command, _free_port, _status, _threads
from tests.e2e.test_sglang import STUB, _clean_shm, sglang_python
from tests.helpers import project_server

TINY = ["--no-progress", "run.steps=1000", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=3", "checkpoint.save_interval=0"]
GONE_WITHIN_S = 10.0


def _table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) of every process."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                raw = Path(f"/proc/{name}/stat").read_text(errors="replace")
            except OSError:
                continue
            fields = raw[raw.rfind(")") + 2:].split()
            out[int(name)] = (int(fields[1]), int(fields[2]), fields[0])
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(root: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (ppid, _, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def _live(pids: set[int], groups: set[int]) -> dict[int, str]:
    """The processes of ``pids`` or of the process groups ``groups`` still running (zombies count as gone)."""
    return {pid: _cmdline(pid)[:100] for pid, (_, pgrp, state) in _table().items()
            if (pid in pids or pgrp in groups) and state not in ("Z", "X")}


@contextmanager
def _trainer(run_dir: Path, args: list[str], *, nproc: int = 1) -> Iterator[subprocess.Popen[bytes]]:
    """The quickstart CLI (or torchrun with ``nproc`` ranks) in a session of its own, output to files; whatever
    is left of it is SIGKILLed at the end."""
    run_dir.mkdir(parents=True)
    with open(run_dir.parent / f"{run_dir.name}.out", "wb") as out:
        proc = subprocess.Popen(_command(("quickstart", f"run.run_dir={run_dir}", *args), nproc), cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": str(_threads(nproc))}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        for pid in _descendants(proc.pid, _table()) | {proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(30)


def _output(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.out").read_text(errors="replace")


def _engines_up(proc: subprocess.Popen[bytes], run_dir: Path, count: int, timeout_s: float
                ) -> tuple[int, set[int], set[int]]:
    """Wait until the trainer reports ``count`` launched engines healthy; returns (the pid of the process that
    launched them, every process of the engines: supervisors, engines and their children, their groups)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the trainer exited ({proc.returncode}) before its engines were up:\n"
                                 f"{_output(run_dir)[-4000:]}")
        if f"rollout: {count} engine(s) ready" in _output(run_dir):
            table = _table()
            supervisors = {pid for pid in _descendants(proc.pid, table) if "rollout/reaper.py" in _cmdline(pid)}
            assert len(supervisors) == count, [_cmdline(p) for p in supervisors]
            engines = set().union(*(_descendants(s, table) for s in supervisors)) | supervisors
            parents = {table[s][0] for s in supervisors}
            assert len(parents) == 1 and len(engines) >= 2 * count, (parents, engines)
            return parents.pop(), engines, supervisors
        time.sleep(0.2)
    raise AssertionError(f"the engines were not up within {timeout_s} s")


def _kill_and_expect_all_gone(victim: int, engines: set[int], groups: set[int]) -> float:
    """SIGKILL ``victim``; every engine process must be gone within GONE_WITHIN_S. Returns the seconds it took."""
    os.kill(victim, signal.SIGKILL)
    began = time.monotonic()
    while (left := _live(engines, groups)) and time.monotonic() - began < GONE_WITHIN_S:
        time.sleep(0.1)
    for pid in left:  # no leak from a failing test
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"engine processes outlived their trainer by {GONE_WITHIN_S} s: {left}"
    seconds = time.monotonic() - began
    print(f"{len(engines)} engine processes gone {seconds:.2f} s after the SIGKILL")
    return seconds


def _step(run_dir: Path) -> tuple[int, int]:
    """(the step in progress, the pid of the rank writing ``status.json``); (0, 0) before the first step."""
    status = _status(run_dir) or {}
    return int(str(status.get("step", 0))), int(str(status.get("pid", 0)))


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def _sleeping(*marks: str) -> list[int]:
    """Live processes running ``sleep <mark>``."""
    return [pid for pid, (_, _, state) in _table().items() if state not in ("Z", "X")
            and _cmdline(pid).strip() in {f"sleep {m}" for m in marks}]


def test_an_engine_started_from_a_thread_outlives_the_thread_and_stops_when_asked(tmp_path: Path) -> None:
    """``PR_SET_PDEATHSIG`` fires when the launching *thread* ends (a restart from a background rollout): the
    supervisor checks that the trainer process is still there and keeps the engine. ``stop`` ends both at once."""
    launcher = EngineLauncher(command=["sleep", "3001"], url="http://127.0.0.1:9", log_path=tmp_path / "engine.log")
    thread = threading.Thread(target=launcher.start)
    thread.start()
    thread.join()
    time.sleep(1.0)
    assert launcher.alive() and launcher.process is not None
    supervisor = launcher.process.pid
    assert _sleeping("3001") and _table()[_sleeping("3001")[0]][0] == supervisor
    began = time.monotonic()
    launcher.stop()
    assert time.monotonic() - began < 2.0
    assert not _live({supervisor}, {supervisor}) and not _sleeping("3001")


def test_the_supervisor_exits_with_the_engine_and_leaves_nothing() -> None:
    """An engine that exits leaves no process behind (one in a session of its own neither), and its exit status
    is the supervisor's: the pool sees the engine's death through it."""
    script = ("import subprocess, sys, time; subprocess.Popen(['sleep', '3002']); "
              "subprocess.Popen(['sleep', '3003'], start_new_session=True); time.sleep(0.5); sys.exit(3)")
    launcher = EngineLauncher(command=[sys.executable, "-c", script], url="http://127.0.0.1:9")
    launcher.start()
    assert launcher.process is not None
    assert launcher.process.wait(10) == 3
    assert not _live(set(), {launcher.process.pid}) and not _sleeping("3002", "3003")


def test_server_engines_die_with_a_sigkilled_trainer(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with _trainer(run_dir, [*TINY, "rollout.backend=server", "rollout.num_engines=2"]) as proc:
        victim, engines, groups = _engines_up(proc, run_dir, 2, timeout_s=180)
        assert victim == proc.pid
        _kill_and_expect_all_gone(victim, engines, groups)


def test_sglang_engine_and_its_children_die_with_a_sigkilled_trainer(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*TINY, "rollout.backend=sglang", f"rollout.sglang.python={sglang_python()}",
            f"rollout.sglang.env.PYTHONPATH={STUB}"]
    try:
        with _trainer(run_dir, args) as proc:
            victim, engines, groups = _engines_up(proc, run_dir, 1, timeout_s=300)
            # the supervisor, SGLang's server and its scheduler / detokenizer processes
            assert len(engines) >= 3, [_cmdline(p)[:80] for p in engines]
            _kill_and_expect_all_gone(victim, engines, groups)
    finally:
        _clean_shm()


def test_engines_die_with_a_sigkilled_torchrun_worker(tmp_path: Path) -> None:
    """Under torchrun the driver rank (rank 0) launches the engines; SIGKILL it."""
    run_dir = tmp_path / "run"
    with _trainer(run_dir, [*TINY, "rollout.backend=server", "rollout.num_engines=2", "parallel.ep=2"],
                  nproc=2) as proc:
        victim, engines, groups = _engines_up(proc, run_dir, 2, timeout_s=240)
        assert victim != proc.pid  # a worker, not torchrun
        _kill_and_expect_all_gone(victim, engines, groups)


def test_an_engine_attached_by_url_survives_the_trainer(tmp_path: Path, model: Path) -> None:
    run_dir = tmp_path / "run"
    with project_server(model, port=_free_port()) as url:
        with _trainer(run_dir, [*TINY, "rollout.backend=server", f"rollout.urls=[{url}]",
                                f"model.hf_path={model}"]) as proc:
            deadline = time.monotonic() + 180
            while _step(run_dir)[0] < 1:
                assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
                time.sleep(0.2)
            assert not any("rollout/reaper.py" in _cmdline(p) for p in _descendants(proc.pid, _table()))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            time.sleep(4.0)  # longer than a supervisor's poll and grace
            assert _healthy(url), "the attached engine did not survive the trainer's death"
