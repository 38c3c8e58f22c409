"""Soak test of the rollout tier: the quickstart with two server engines (``rollout.backend=server
rollout.num_engines=2``) for many steps, one engine process SIGKILLed every MIN-MAX steps, and the trainer watched
from outside through ``/proc``.

How it runs: the trainer (``python -m nsr_megatron.cli quickstart``) is a subprocess in a session of its own. The
harness polls ``<run>/status.json`` (step and phase in progress) every 10 ms. Kills follow a seeded schedule: the
step (the previous kill plus a draw in [MIN, MAX], the last one at least a step before the end, so its restart lands
in a logged step), the engine (by port: a restarted engine keeps its port) and the phase (rollout, rewards,
logprobs, train or weight_sync, or those of ``--phases``; when a phase is too short to be seen, the kill lands in
the next phase seen; ``--jitter-ms`` delays each kill by a seeded draw, to land inside the phase). The
engines are found in ``/proc``: the trainer's children that run ``rollout/reaper.py`` (the supervisors) and their
children that run ``nsr_megatron.rollout.server``. At the start of every ``--sample-every``-th step the harness
reads the trainer's open descriptors (``/proc/PID/fd``), threads and resident memory (``/proc/PID/status``), and
counts the engines, supervisors and zombies under it.

Checks (the run fails, exit 1, when one does not hold):

- ``exit``: the trainer exits 0 within ``--timeout-s``;
- ``steps``: ``metrics.jsonl`` holds every step 1..N exactly once, each line whole JSON;
- ``keys``: every step logs reward, loss and the other required keys, ``rollout/restarts`` and the timings, all finite;
- ``kills``: every scheduled kill happened;
- ``restarts``: the restarts logged (``rollout/restarts``, the step's new ones) sum to the kills, and each kill's
  restart is logged at the step it landed in or the next;
- ``rollout``: no step's ``timing/rollout`` (which includes an engine's restart and resync) exceeds the bound;
- ``fds``, ``threads``: the median over the last ``--window`` steps is within +N of the median over ``--window`` steps
  after ``--warmup``;
- ``rss``: resident memory (the lowest of each window: it rises for a few steps after each checkpoint save) grows
  by less than the bound per 100 steps between those two windows (a span under 100 steps counts as 100);
- ``engines``: no sample sees more engines or supervisors than ``rollout.num_engines``, nor a zombie child of the
  trainer in two samples running (a killed engine's supervisor is collected at the next health check);
- ``leftovers``: once the trainer has exited, no process it started is alive: the engines, their supervisors, and
  any other process seen below it (megatron's checkpoint writer starts one).

Prints a table of the checks, the kills and the resources; writes them and every sample to ``<out>/soak.json``.

Usage: python bench/soak.py [--steps 300] [--kill-every 30 60] [--seed 0] [--phases rollout ... weight_sync]
                            [--jitter-ms 0] [--out bench/out/soak] [key=value ...]
(300 steps: about 2.5 minutes on 2 busy cores). ``tests/e2e/test_soak.py`` runs 40 steps of it in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsr_megatron.telemetry.metrics import METRICS_FILE, REQUIRED_KEYS  # noqa: E402
from nsr_megatron.telemetry.status import read_status  # noqa: E402

PHASES = ("rollout", "rewards", "logprobs", "train", "weight_sync")  # where a kill may land, in step order
ORDER = {p: i for i, p in enumerate((*PHASES, "checkpoint", "done"))}
STEP_KEYS = (*REQUIRED_KEYS, "rollout/restarts", "timing/rollout", "timing/train", "timing/weight_sync",
             "timing/step")
# The quickstart made cheap: 4 prompts x 4 samples of at most 3 tokens a step.
CHEAP = ("rollout.prompts_per_step=4", "rollout.samples_per_prompt=4")
SUPERVISOR, ENGINE = "rollout/reaper.py", "nsr_megatron.rollout.server"


@dataclass(frozen=True)
class Bounds:
    """What the run must stay within (chosen from measured runs, with margin: bench/RESULTS.md)."""

    fd_growth: int = 4  # open descriptors, late median minus early median
    thread_growth: int = 4  # threads, likewise
    rss_mib_per_100_steps: float = 8.0  # resident memory growth between the two windows
    rollout_s: float = 60.0  # the longest step's timing/rollout (an engine's restart and resync included)
    gone_s: float = 5.0  # after the trainer's exit, until no process it started is alive


@dataclass(frozen=True)
class SoakSpec:
    """One soak: the run, the kill schedule, the /proc sampling and the bounds."""

    steps: int = 300
    kill_every: tuple[int, int] = (30, 60)
    seed: int = 0
    phases: tuple[str, ...] = PHASES  # the phases kills are aimed at
    jitter_ms: float = 0.0  # each kill waits a seeded draw in [0, jitter_ms] after its phase starts
    out: Path = ROOT / "bench" / "out" / "soak"
    engines: int = 2
    threads: int = 1  # OMP_NUM_THREADS of the trainer (each engine takes its own share of the cores)
    timeout_s: float = 1800.0
    # The warm-up ends after the first checkpoint: megatron's checkpoint writer starts a helper process then (a
    # multiprocessing manager), which the trainer keeps for the rest of the run (3 pipes and a socket more).
    warmup: int = 30  # steps before the early window
    window: int = 30  # steps in the early and in the late window
    sample_every: int = 2  # steps between /proc samples
    save_interval: int = 25  # checkpoint.save_interval
    overrides: tuple[str, ...] = ()
    bounds: Bounds = field(default_factory=Bounds)


@dataclass(frozen=True)
class Kill:
    """A planned kill: ``delay_s`` after ``phase`` of ``step`` is seen, the ``engine``-th engine in port order."""

    step: int
    engine: int
    phase: str
    delay_s: float = 0.0


@dataclass
class Killed:
    """A kill that happened: where the trainer was (status.json just before the signal and just after it: a phase
    may end in between), which process, and where its restart was logged."""

    step: int
    phase: str
    wanted_phase: str
    step_after: int
    phase_after: str
    pid: int
    port: int
    at_s: float
    restart_step: int = 0  # the step whose rollout/restarts counted it (0: none)
    restart_rollout_s: float = 0.0  # that step's timing/rollout


@dataclass
class Sample:
    """The trainer at the start of ``step``, ``at_s`` seconds into the soak."""

    step: int
    at_s: float
    fds: int
    threads: int
    rss_mib: float
    engines: int
    supervisors: int
    zombies: list[int]  # the trainer's exited, not yet collected children (a killed engine's supervisor, briefly)


@dataclass
class Check:
    name: str
    ok: bool
    value: str
    bound: str


@dataclass
class SoakResult:
    spec: dict[str, object]
    command: list[str]
    exit_code: int | None
    wall_s: float
    kills: list[Killed]
    samples: list[Sample]
    checks: list[Check]
    resources: dict[str, float]

    def write(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**asdict(self), "ok": self.ok}, f, indent=1)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> str:
        return "; ".join(f"{c.name}: {c.value} (bound {c.bound})" for c in self.checks if not c.ok)


# ------------------------------------------------------------------------------------------------ the schedule
def kill_schedule(steps: int, lo: int, hi: int, seed: int, engines: int = 2,
                  phases: tuple[str, ...] = PHASES, jitter_s: float = 0.0) -> list[Kill]:
    """Kills every ``lo``..``hi`` steps (seeded), the last at step ``steps - 1`` at the latest: a kill in step s is
    counted at step s or s + 1 (the next rollout's health check). Each waits a draw in [0, ``jitter_s``] after its
    phase is seen (none by default: the kill lands at the phase's start)."""
    if not 1 <= lo <= hi:
        raise ValueError(f"--kill-every {lo} {hi}: need 1 <= MIN <= MAX.")
    if not phases or not set(phases) <= set(PHASES):
        raise ValueError(f"--phases {' '.join(phases)}: choose among {' '.join(PHASES)}.")
    rng = random.Random(seed)
    out: list[Kill] = []
    step = rng.randint(lo, hi)
    while step <= steps - 1:
        kill = Kill(step=step, engine=rng.randrange(engines), phase=rng.choice(phases))
        if jitter_s > 0:  # drawn only then: the schedule without jitter stays the same
            kill = dataclasses.replace(kill, delay_s=round(rng.uniform(0, jitter_s), 3))
        out.append(kill)
        step += rng.randint(lo, hi)
    return out


def due(kill: Kill, step: int, phase: str) -> bool:
    """Whether the trainer, at ``step`` in ``phase``, has reached the kill's phase (or passed it)."""
    return step > kill.step or (step == kill.step and ORDER.get(phase, len(ORDER)) >= ORDER[kill.phase])


# ------------------------------------------------------------------------------------------------ /proc
def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time in clock ticks: with the pid, names the process) of a process, None once it
    is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _table() -> dict[int, tuple[int, str, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            out[int(name)] = st
    return out


def _children(pid: int, table: dict[int, tuple[int, str, int]]) -> list[int]:
    return [p for p, (ppid, _, _) in table.items() if ppid == pid]


def _descendants(pid: int, table: dict[int, tuple[int, str, int]]) -> dict[int, int]:
    """pid -> start time of every live process below ``pid``."""
    found: dict[int, int] = {}
    frontier = [pid]
    while frontier:
        frontier = [c for p in frontier for c in _children(p, table) if c not in found]
        found |= {c: table[c][2] for c in frontier if table[c][1] not in ("Z", "X")}
    return found


def _port(cmd: list[str]) -> int:
    return int(cmd[cmd.index("--port") + 1]) if "--port" in cmd[:-1] else 0


@dataclass
class Tree:
    """What runs under the trainer: engine port -> pid, supervisor pids, zombie pids, and every live process below
    it (pid -> start time: the engines, their supervisors, megatron's checkpoint helper, ...)."""

    engines: dict[int, int]
    supervisors: list[int]
    zombies: list[int]
    below: dict[int, int]


def engine_tree(trainer: int) -> Tree:
    table = _table()
    supervisors, engines, zombies = [], {}, []
    for child in _children(trainer, table):
        if table[child][1] == "Z":
            zombies.append(child)
        elif any(a.endswith(SUPERVISOR) for a in _cmdline(child)):
            supervisors.append(child)
            for pid in _children(child, table):
                cmd = _cmdline(pid)
                if table[pid][1] not in ("Z", "X") and ENGINE in cmd:
                    engines[_port(cmd)] = pid
    return Tree(engines=dict(sorted(engines.items())), supervisors=supervisors, zombies=zombies,
                below=_descendants(trainer, table))


def _proc_status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def sample(trainer: int, step: int, at_s: float) -> Sample | None:
    """The trainer's descriptors, threads and RSS, and what runs under it; None once it is gone."""
    status = _proc_status(trainer)
    try:
        fds = len(os.listdir(f"/proc/{trainer}/fd"))
    except OSError:
        return None
    if "Threads" not in status or "VmRSS" not in status:
        return None
    tree = engine_tree(trainer)
    return Sample(step=step, at_s=round(at_s, 2), fds=fds, threads=int(status["Threads"]),
                  rss_mib=round(int(status["VmRSS"].split()[0]) / 1024, 1), engines=len(tree.engines),
                  supervisors=len(tree.supervisors), zombies=tree.zombies)


def leftovers(trainer: int, run_dir: Path, seen: dict[int, int]) -> dict[int, str]:
    """Live processes of this run once the trainer is gone: any process seen below the trainer (the same pid and
    start time), and any engine serving the run's model or supervisor for the trainer's pid (an engine restarted
    after the last sample)."""
    model = str(run_dir / "hf-init")
    out = {}
    for pid, (_, state, start) in _table().items():
        cmd = _cmdline(pid)
        ours = seen.get(pid) == start or (ENGINE in cmd and model in cmd) or (
            any(a.endswith(SUPERVISOR) for a in cmd) and "--parent-pid" in cmd and str(trainer) in cmd)
        if ours and state not in ("Z", "X"):
            out[pid] = " ".join(cmd)[:120]
    return out


# ------------------------------------------------------------------------------------------------ the run
def trainer_command(spec: SoakSpec, run_dir: Path, kills: int) -> list[str]:
    return [sys.executable, "-m", "nsr_megatron.cli", "quickstart", "--no-progress", f"run.run_dir={run_dir}",
            f"run.steps={spec.steps}", "rollout.backend=server", f"rollout.num_engines={spec.engines}",
            f"rollout.max_restarts={kills + 5}", f"checkpoint.save_interval={spec.save_interval}", *CHEAP,
            *spec.overrides]


def _victim(trainer: int, kill: Kill, engines: int) -> tuple[int, int] | None:
    """(port, pid) of the engine ``kill`` names; None while one of the engines is still starting."""
    tree = engine_tree(trainer)
    if len(tree.engines) < engines:
        return None
    port = list(tree.engines)[kill.engine]
    return port, tree.engines[port]


def _kill_engine(run_dir: Path, victim: tuple[int, int], kill: Kill, step: int, phase: str, at_s: float
                 ) -> Killed | None:
    port, pid = victim
    if ENGINE not in _cmdline(pid):  # it died since it was looked up
        return None
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    after = read_status(run_dir) or {}
    return Killed(step=step, phase=phase, wanted_phase=kill.phase, step_after=int(str(after.get("step", step))),
                  phase_after=str(after.get("phase", phase)), pid=pid, port=port, at_s=round(at_s, 2))


def _watch(proc: subprocess.Popen[bytes], spec: SoakSpec, run_dir: Path, schedule: list[Kill]
           ) -> tuple[list[Killed], list[Sample], dict[int, int], bool]:
    """Poll status.json until the trainer exits (or the time limit): kill on schedule, sample /proc at step
    starts. Returns (kills, samples, every process seen below the trainer: pid -> start time, timed out). The next
    kill's engine is looked up a step ahead, so the kill itself takes one read of its command line: a phase of a few tens of
    milliseconds (a rollout of 3 tokens) can still be hit."""
    began = time.monotonic()
    pending = list(schedule)
    kills: list[Killed] = []
    samples: list[Sample] = []
    seen: dict[int, int] = {}
    last = 0
    victim: tuple[int, int] | None = None
    due_at: float | None = None  # when the next kill's phase was first seen
    while proc.poll() is None:
        now = time.monotonic() - began
        if now > spec.timeout_s:
            os.killpg(proc.pid, signal.SIGKILL)  # its engines' supervisors stop them (the point of reaper.py)
            proc.wait()
            return kills, samples, seen, True
        status = read_status(run_dir) or {}
        step, phase = int(str(status.get("step", 0))), str(status.get("phase", ""))
        if pending and step and due(pending[0], step, phase):
            due_at = now if due_at is None else due_at
        if pending and due_at is not None and now - due_at >= pending[0].delay_s:
            if victim is None or ENGINE not in _cmdline(victim[1]):
                victim = _victim(proc.pid, pending[0], spec.engines)
            if victim is not None and (k := _kill_engine(run_dir, victim, pending[0], step, phase, now)) is not None:
                kills.append(k)
                pending.pop(0)
                victim, due_at = None, None
                landed = "" if (k.step_after, k.phase_after) == (step, phase) else \
                    f" (status after it: step {k.step_after} {k.phase_after})"
                print(f"  t={now:6.1f}s step {step:4d} {phase:<11}: SIGKILL engine :{k.port} (pid {k.pid}){landed}",
                      flush=True)
        if step != last and phase != "done":
            last = step
            kill_now = bool(pending) and pending[0].step == step  # the /proc reads would delay the kill
            if (step == 1 or step % spec.sample_every == 0) and not kill_now:
                if (s := sample(proc.pid, step, now)) is not None:
                    samples.append(s)
                seen |= engine_tree(proc.pid).below
            if pending and step == pending[0].step - 1:
                victim = _victim(proc.pid, pending[0], spec.engines)
        time.sleep(0.01)
    return kills, samples, seen, False


def run_soak(spec: SoakSpec) -> SoakResult:
    """Run the soak (the module docstring) and check it."""
    schedule = kill_schedule(spec.steps, *spec.kill_every, spec.seed, spec.engines, spec.phases, spec.jitter_ms / 1e3)
    run_dir = spec.out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: checkpoint.resume=auto would continue an old one
    spec.out.mkdir(parents=True, exist_ok=True)
    command = trainer_command(spec, run_dir, len(schedule))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads), "PYTHONUNBUFFERED": "1"}
    print(f"soak: {spec.steps} steps, {len(schedule)} kills at steps {[k.step for k in schedule]}; "
          f"log {spec.out / 'trainer.log'}", flush=True)
    began = time.monotonic()
    with open(spec.out / "trainer.log", "wb") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        kills, samples, seen, timed_out = _watch(proc, spec, run_dir, schedule)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    wall = time.monotonic() - began
    gone_began = time.monotonic()
    while (left := leftovers(proc.pid, run_dir, seen)) and time.monotonic() - gone_began < spec.bounds.gone_s:
        time.sleep(0.1)
    gone_s = time.monotonic() - gone_began
    for pid in left:  # nothing leaks from a failed soak
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    rows, bad_lines = _metrics(run_dir)
    checks, resources = evaluate(spec, rows, bad_lines, schedule, kills, samples)
    checks.insert(0, Check("exit", proc.returncode == 0 and not timed_out,
                           "timed out" if timed_out else f"exit {proc.returncode} in {wall:.0f} s",
                           f"exit 0 within {spec.timeout_s:.0f} s"))
    checks.append(Check("leftovers", not left, f"{len(left)} alive {gone_s:.1f} s after exit" if left
                        else f"none of {len(seen)} processes seen below the trainer", f"none after {spec.bounds.gone_s} s"))
    spec_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items()}
    result = SoakResult(spec=spec_dict, command=command, exit_code=proc.returncode, wall_s=round(wall, 1),
                        kills=kills, samples=samples, checks=checks, resources=resources)
    result.write(spec.out / "soak.json")
    return result


def _metrics(run_dir: Path) -> tuple[list[dict[str, float]], int]:
    """The rows of metrics.jsonl and the number of lines that are not whole JSON objects."""
    rows, bad = [], 0
    path = run_dir / METRICS_FILE
    if not path.exists():
        return [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return rows, bad


# ------------------------------------------------------------------------------------------------ the checks
def _window(samples: list[Sample], lo: int, hi: int) -> list[Sample]:
    return [s for s in samples if lo <= s.step < hi]


def evaluate(spec: SoakSpec, rows: list[dict[str, float]], bad_lines: int, schedule: list[Kill],
             kills: list[Killed], samples: list[Sample]) -> tuple[list[Check], dict[str, float]]:
    """Every check but ``exit`` and ``leftovers`` (they need the process); also fills in each kill's restart step."""
    b, n = spec.bounds, spec.steps
    checks: list[Check] = []
    steps = [int(r.get("step", -1)) for r in rows]
    checks.append(Check("steps", steps == list(range(1, n + 1)) and bad_lines == 0,
                        f"{len(rows)} rows, {len(set(steps))} distinct, {bad_lines} torn"
                        + ("" if steps == list(range(1, n + 1)) else f", first gap or repeat near "
                           f"{next((i + 1 for i, s in enumerate(steps) if s != i + 1), len(steps) + 1)}"),
                        f"1..{n} once each"))
    missing = [(int(r.get("step", -1)), k) for r in rows for k in STEP_KEYS
               if not isinstance(r.get(k), (int, float)) or not math.isfinite(float(r[k]))]
    checks.append(Check("keys", bool(rows) and not missing, f"{len(missing)} missing or non-finite"
                        + (f", first {missing[0]}" if missing else ""), f"{len(STEP_KEYS)} keys finite every step"))
    checks.append(Check("kills", len(kills) == len(schedule), f"{len(kills)} of {len(schedule)}", "all scheduled"))

    restarts = {int(r["step"]): int(r.get("rollout/restarts", 0)) for r in rows if "step" in r}
    left = dict(restarts)
    unmatched = 0
    for k in kills:  # each kill's restart: at the step it landed in, or the next step's health check
        at = next((s for s in range(k.step, k.step_after + 2) if left.get(s, 0) > 0), 0)
        if at:
            left[at] -= 1
            k.restart_step = at
            k.restart_rollout_s = round(float(next(r for r in rows if r.get("step") == at)["timing/rollout"]), 2)
        else:
            unmatched += 1
    total = sum(restarts.values())
    checks.append(Check("restarts", total == len(kills) and unmatched == 0,
                        f"{total} logged for {len(kills)} kills, {unmatched} kills without one at their step or the next",
                        "sum == kills"))
    rollout = [float(r.get("timing/rollout", 0.0)) for r in rows]
    calm = [t for r, t in zip(rows, rollout, strict=True) if not r.get("rollout/restarts")]
    checks.append(Check("rollout", bool(rollout) and max(rollout) <= b.rollout_s,
                        f"max {max(rollout, default=0):.2f} s (steps without a restart: max "
                        f"{max(calm, default=0):.3f} s, median {statistics.median(calm) if calm else 0:.3f} s)",
                        f"<= {b.rollout_s} s"))

    early = _window(samples, spec.warmup, spec.warmup + spec.window)
    late = _window(samples, n - spec.window + 1, n + 1)
    resources: dict[str, float] = {}
    if early and late:
        # fds and threads: the windows' medians. RSS: the windows' floors, since it rises for a few steps after each
        # checkpoint save (about 8 MiB here) and falls back; spans under 100 steps count as 100 (that noise would
        # otherwise read as a rate).
        for key, pick in (("fds", statistics.median), ("threads", statistics.median), ("rss_mib", min)):
            resources[f"{key}/early"] = pick(getattr(s, key) for s in early)
            resources[f"{key}/late"] = pick(getattr(s, key) for s in late)
            resources[f"{key}/max"] = max(getattr(s, key) for s in samples)
        span = statistics.median(s.step for s in late) - statistics.median(s.step for s in early)
        resources["rss_mib_per_100_steps"] = round(
            (resources["rss_mib/late"] - resources["rss_mib/early"]) / max(100.0, span) * 100, 2)
        for key, bound in (("fds", b.fd_growth), ("threads", b.thread_growth)):
            grew = resources[f"{key}/late"] - resources[f"{key}/early"]
            checks.append(Check(key, grew <= bound, f"{resources[f'{key}/early']:g} -> {resources[f'{key}/late']:g} "
                                f"(max {resources[f'{key}/max']:g})", f"+{bound}"))
        checks.append(Check("rss", resources["rss_mib_per_100_steps"] <= b.rss_mib_per_100_steps,
                            f"floor {resources['rss_mib/early']:.1f} -> {resources['rss_mib/late']:.1f} MiB over "
                            f"{span:g} steps: {resources['rss_mib_per_100_steps']:+.2f} MiB/100 steps",
                            f"<= {b.rss_mib_per_100_steps} MiB/100 steps"))
    else:
        checks.append(Check("samples", False, f"{len(early)} early, {len(late)} late samples",
                            "a sample in each window"))
    # a killed engine's supervisor stays a zombie until the next health check collects it: one sample at most
    crowded = [s.step for s in samples if s.engines > spec.engines or s.supervisors > spec.engines]
    kept = [b.step for a, b in zip(samples, samples[1:], strict=False) if set(a.zombies) & set(b.zombies)]
    checks.append(Check("engines", not crowded and not kept,
                        f"{len(samples)} samples; over the count at steps {crowded[:5]}, zombies kept at steps "
                        f"{kept[:5]}" if crowded or kept else f"{len(samples)} samples, at most {spec.engines} each",
                        f"<= {spec.engines} engines and supervisors; no zombie in two samples"))
    return checks, resources


# ------------------------------------------------------------------------------------------------ the report
def report(result: SoakResult) -> str:
    lines = ["", f"{'check':<10} {'ok':<5} {'value':<78} bound"]
    lines += [f"{c.name:<10} {'PASS' if c.ok else 'FAIL':<5} {c.value:<78} {c.bound}" for c in result.checks]
    lines += ["", f"{'kill':>4} {'step':>9} {'phase (wanted)':<32} {'engine':>7} {'restart at':>10} {'rollout s':>9}"]
    for i, k in enumerate(result.kills):
        step = f"{k.step}" if k.step_after == k.step else f"{k.step}-{k.step_after}"
        phase = k.phase if (k.step_after, k.phase_after) == (k.step, k.phase) else f"{k.phase}..{k.phase_after}"
        lines.append(f"{i + 1:>4} {step:>9} {f'{phase} ({k.wanted_phase})':<32} {k.port:>7} {k.restart_step:>10} "
                     f"{k.restart_rollout_s:>9.2f}")
    r = result.resources
    if r:
        lines += ["", f"{'resource':<16} {'early':>9} {'late':>9} {'max':>9}"]
        lines += [f"{name:<16} {r[f'{k}/early']:>9g} {r[f'{k}/late']:>9g} {r[f'{k}/max']:>9g}"
                  for k, name in (("fds", "fds (median)"), ("threads", "threads (median)"), ("rss_mib", "RSS MiB (floor)"))]
    lines += ["", f"{'PASS' if result.ok else 'FAIL'}: {result.spec['steps']} steps, {len(result.kills)} kills, "
              f"{result.wall_s:.0f} s"]
    return "\n".join(lines)


def _exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d, db = SoakSpec(), Bounds()
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--kill-every", type=int, nargs=2, metavar=("MIN", "MAX"), default=list(d.kill_every))
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(d.phases), help="phases kills aim at")
    ap.add_argument("--jitter-ms", type=float, default=d.jitter_ms,
                    help="each kill waits a seeded draw in [0, JITTER] ms after its phase starts (default: none)")
    ap.add_argument("--out", type=Path, default=d.out, help="holds run/, trainer.log and soak.json")
    ap.add_argument("--threads", type=int, default=d.threads, help="OMP_NUM_THREADS of the trainer")
    ap.add_argument("--timeout-s", type=float, default=d.timeout_s)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--window", type=int, default=d.window)
    ap.add_argument("--sample-every", type=int, default=d.sample_every)
    ap.add_argument("--save-interval", type=int, default=d.save_interval)
    ap.add_argument("--max-fd-growth", type=int, default=db.fd_growth)
    ap.add_argument("--max-thread-growth", type=int, default=db.thread_growth)
    ap.add_argument("--max-rss-mib-per-100", type=float, default=db.rss_mib_per_100_steps)
    ap.add_argument("--max-rollout-s", type=float, default=db.rollout_s)
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value) for the trainer")
    a = ap.parse_args(argv)
    spec = SoakSpec(steps=a.steps, kill_every=(a.kill_every[0], a.kill_every[1]), seed=a.seed,
                    phases=tuple(a.phases), jitter_ms=a.jitter_ms, out=a.out,
                    threads=a.threads, timeout_s=a.timeout_s, warmup=a.warmup, window=a.window,
                    sample_every=a.sample_every, save_interval=a.save_interval, overrides=tuple(a.overrides),
                    bounds=Bounds(fd_growth=a.max_fd_growth, thread_growth=a.max_thread_growth,
                                  rss_mib_per_100_steps=a.max_rss_mib_per_100, rollout_s=a.max_rollout_s))
    if spec.warmup + 2 * spec.window > spec.steps:
        ap.error(f"--warmup {spec.warmup} + 2 x --window {spec.window} must fit in --steps {spec.steps}.")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # stopped from outside: the trainer's group goes too (run_soak)
        signal.signal(sig, _exit)
    result = run_soak(spec)
    print(report(result))
    print(f"wrote {spec.out / 'soak.json'}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
