"""A supervisor that ties a rollout engine's life to the trainer that launched it.

The trainer launches every engine through it (:class:`~nsr_megatron.rollout.pool.EngineLauncher`)::

    python .../nsr_megatron/rollout/reaper.py --parent-pid PID  < command.json

It reads the engine's command line (a JSON list) from stdin, starts it in its own process group (the group the
launcher made it the leader of), and stays beside it. When the trainer dies, by any signal, SIGKILL included
(a scheduler, the OOM killer), it sends SIGTERM to the engine's whole group, waits ``--grace-s``, then SIGKILLs
every process left: the engine, its children (SGLang's scheduler and detokenizer) and any descendant that left
the group. So no engine outlives its trainer by more than a few seconds, holding ports and memory.

How the trainer's death is seen:

- ``PR_SET_PDEATHSIG`` (Linux): a signal the moment the parent *thread* dies. That thread may be one of the
  trainer's threads (an engine restarted from a background rollout), so the signal only wakes the supervisor,
  which then checks whether the trainer *process* is gone.
- Polling, every ``--poll-s``: ``os.getppid()`` changes when the supervisor is re-parented (the trainer exited);
  this also covers systems without ``prctl``.

It also makes itself a child subreaper (Linux), so descendants that the engine orphans are re-parented to it and
can still be found and stopped. When the engine exits, the processes it leaves get SIGTERM, then SIGKILL after
the grace, and the supervisor exits with the engine's exit status (``128 + signal`` for a signal), so the launcher sees the engine's
life through it. SIGTERM, SIGINT or SIGHUP to the supervisor is passed on to the engine as SIGTERM (the launcher
signals the whole group, which reaches both).

It runs from its file path, not with ``-m``: the package's ``nsr_megatron.rollout`` imports torch, and a
supervisor needs none of it (the standard library only, tens of milliseconds to start, a few MB).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Iterable

__all__ = ["main", "supervisor_command"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_WAKE = signal.SIGUSR1  # what PR_SET_PDEATHSIG sends: it only wakes the loop
_STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_WATCHED = {signal.SIGCHLD, _WAKE, *_STOP}


def supervisor_command(parent_pid: int, *, grace_s: float = 3.0, poll_s: float = 0.25) -> list[str]:
    """The command that starts a supervisor for the trainer process ``parent_pid`` (the engine's command goes
    to its stdin as a JSON list)."""
    return [sys.executable, os.path.abspath(__file__), "--parent-pid", str(parent_pid), "--grace-s", str(grace_s),
            "--poll-s", str(poll_s)]


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; False where the system has no prctl (not Linux) or refuses it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _say(message: str) -> None:
    print(f"[reaper {os.getpid()}] {message}", file=sys.stderr, flush=True)


def _wait_signal(timeout_s: float) -> int | None:
    """The next watched signal (they are blocked, so none is lost), or None after ``timeout_s``."""
    if hasattr(signal, "sigtimedwait"):
        info = signal.sigtimedwait(_WATCHED, timeout_s)
        return None if info is None else info.si_signo
    time.sleep(timeout_s)  # systems without sigtimedwait (macOS): look at what is pending
    pending = signal.sigpending() & _WATCHED
    return int(signal.sigwait(pending)) if pending else None


def _stat(pid: str) -> tuple[int, int, str] | None:
    """(parent pid, process group, state) of ``/proc/<pid>``, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the name in parentheses may hold spaces
    return int(fields[1]), int(fields[2]), fields[0]


def _others() -> list[int] | None:
    """Live processes this supervisor answers for: its process group and its descendants, itself excepted.
    None without ``/proc``."""
    if not os.path.isdir("/proc/self"):
        return None
    me, group = os.getpid(), os.getpgrp()
    table = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _stat(p)) is not None}
    mine: set[int] = set()
    grew = True
    while grew:  # descendants: parents among mine (the supervisor is a subreaper, so orphans point to it)
        before = len(mine)
        mine |= {pid for pid, (ppid, _, _) in table.items() if ppid == me or ppid in mine}
        grew = len(mine) > before
    mine |= {pid for pid, (_, pgrp, _) in table.items() if pgrp == group}
    return sorted(pid for pid in mine if pid != me and table[pid][2] not in ("Z", "X"))


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _reap(engine: int) -> int | None:
    """Collect every exited child (orphans re-parented here too); the engine's exit code once it exited."""
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return code
        if pid == 0:
            return code
        if pid == engine:
            code = os.waitstatus_to_exitcode(status)


def _kill_rest() -> None:
    """SIGKILL every process left in the group or below the supervisor (without ``/proc``, the whole group,
    the supervisor included: it is the last thing it does)."""
    for _ in range(20):  # a process may fork while we look; a few rounds catch its children
        others = _others()
        if others is None:
            os.killpg(os.getpgrp(), signal.SIGKILL)
            return
        if not others:
            return
        _signal_all(others, signal.SIGKILL)
        time.sleep(0.02)
        _reap(-1)


def _stop_all(engine: int | None, grace_s: float) -> None:
    """SIGTERM to every process of the group and below (the engine included), ``grace_s`` for the engine (or,
    with ``engine=None``, all of them) to exit, then SIGKILL to the rest."""
    others = _others()
    if others == []:
        return
    if others is None:
        os.killpg(os.getpgrp(), signal.SIGTERM)  # the supervisor blocks SIGTERM: it is not hurt
    else:
        _signal_all(others, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        code = _reap(engine if engine is not None else -1)
        if (engine is not None and code is not None) or (engine is None and not _others()):
            break
        _wait_signal(min(0.05, max(0.0, deadline - time.monotonic())))
    _kill_rest()
    _reap(-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run an engine (command as JSON on stdin) and stop it, with its "
                                                 "whole process group, when the parent process dies.")
    parser.add_argument("--parent-pid", type=int, required=True, help="the process whose death stops the engine")
    parser.add_argument("--grace-s", type=float, default=3.0, help="SIGTERM to SIGKILL, seconds")
    parser.add_argument("--poll-s", type=float, default=0.25, help="how often the parent is checked, seconds")
    args = parser.parse_args(argv)
    signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)  # taken one by one in the loop (sigtimedwait)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_PDEATHSIG, _WAKE)
    try:
        command = json.loads(sys.stdin.read())
    except ValueError:
        command = None
    if not (isinstance(command, list) and command and all(isinstance(c, str) for c in command)):
        _say("no engine command on stdin (a JSON list of strings); nothing started.")
        return 2
    if os.getppid() != args.parent_pid:  # the trainer died before the engine started
        _say(f"the parent (pid {args.parent_pid}) is gone; the engine is not started.")
        return 1
    try:  # the engine gets the default signal dispositions, nothing blocked, and no stdin
        engine = os.posix_spawnp(command[0], command, dict(os.environ), setsigmask=(), setsigdef=_WATCHED,
                                 file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)])
    except OSError as exc:
        _say(f"cannot start the engine {command[0]!r}: {exc}")
        return 127
    forwarded = False
    while True:
        sig = _wait_signal(args.poll_s)
        code = _reap(engine)
        if code is not None:  # the engine ended on its own (or as asked): nothing it started stays
            _stop_all(None, args.grace_s)
            return code if code >= 0 else 128 - code
        if sig in _STOP and not forwarded:
            forwarded = True
            _signal_all([engine], signal.SIGTERM)
        if os.getppid() != args.parent_pid:
            _say(f"the trainer (pid {args.parent_pid}) is gone: stopping engine pid {engine} and its process group.")
            _stop_all(engine, args.grace_s)
            return 1


if __name__ == "__main__":
    sys.exit(main())
