"""``examples/slurm/train.sbatch`` across two Slurm nodes made on this host.

``scripts/slurm_cluster.sh start-nodes 2`` adds nodes ``nsr-node1`` and ``nsr-node2`` to the test cluster: each a
network and UTS namespace with its own hostname, its own address on a bridge, and its own slurmd (partition
``nodes``). Jobs there run torchrun on both nodes with a c10d rendezvous over TCP between them, as on a real cluster
(CPU mode: gloo, no GPUs, no InfiniBand, no NCCL). The tests:

- the quickstart over 4 ranks, 2 per node (data parallel across the nodes), with the project's rollout server
  launched by rank 0: it learns by the quickstart's own criterion, the weights reach the engine over the
  distributed path (the ranks span nodes, so shared memory is not used), and the engine runs on the first node;
- every process of the second node killed mid-run: the job fails (it does not hang), no engine or trainer process
  is left anywhere, and the job submitted again on the restarted node resumes from the newest checkpoint, with every
  step once and each step's values those of the run that was never interrupted;
- the engines on the second node (``NSR_ROLLOUT=dedicated``, the project's server), attached with
  ``rollout.urls``, training on the first.

The fixture removes the namespace nodes again at the end. Without Slurm, or where namespaces cannot be made, the
tests fail with the reason: they are never skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from nsr_megatron.rollout.weight_sync import free_port
from tests.e2e.test_rl_loop import read_metrics
from tests.e2e.test_slurm import (
    assert_every_step_once_as_in,
    cluster,  # noqa: F401  (the fixture: Slurm installed and started)
    job_gone,
    wait_past_a_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "examples" / "slurm" / "train.sbatch"
CLUSTER = ["bash", str(ROOT / "scripts" / "slurm_cluster.sh")]
STEPS = 40
OVERRIDES = (f"run.steps={STEPS} checkpoint.save_interval=10 rollout.backend=server rollout.num_engines=1")


@pytest.fixture(scope="module")
def nodes(cluster: None) -> object:  # noqa: F811
    proc = subprocess.run([*CLUSTER, "start-nodes", "2"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"the two namespace nodes did not start: {proc.stderr.strip()}", pytrace=False)
    yield
    subprocess.run([*CLUSTER, "stop-nodes"], capture_output=True, text=True, timeout=300)


def _submit(run_dir: Path, out: Path, *, wait: bool, overrides: str = OVERRIDES,
            **env: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NSR_CPU": "1", "NSR_CONFIG": "quickstart", "NSR_RUN_DIR": str(run_dir),
           "NSR_PYTHON": sys.executable, "NSR_OVERRIDES": overrides, "MASTER_PORT": str(free_port()), **env}
    cmd = ["sbatch", "--parsable", f"--job-name=nsr-nodes-{uuid.uuid4().hex[:8]}", "--nodes=2", "--partition=nodes",
           "--gpus-per-node=0", "--cpus-per-task=2", "--no-requeue", "--time=00:20:00", f"--output={out}"]
    return subprocess.run([*cmd, *(["--wait"] if wait else []), str(SBATCH)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def _processes_of(run_dir: Path) -> list[str]:
    """Every process on this host (all nodes) whose command line names the run: trainers, torchrun, engines."""
    out = subprocess.run(["pgrep", "-af", str(run_dir)], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


def _no_processes_left(run_dir: Path, within_s: float = 20.0) -> list[str]:
    deadline = time.time() + within_s
    while (left := _processes_of(run_dir)) and time.time() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def straight(nodes: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nodes")
    proc = _submit(root / "run", root / "job.out", wait=True)
    log = (root / "job.out").read_text() if (root / "job.out").exists() else ""
    assert proc.returncode == 0, f"sbatch --wait exited {proc.returncode}: {proc.stderr}\n{log[-3000:]}"
    return root / "run"


def test_four_ranks_on_two_nodes_learn_with_the_distributed_weight_sync(straight: Path) -> None:
    rows = read_metrics(straight)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    log = (straight.parent / "job.out").read_text()
    assert "2 training node(s) x 2 processes" in log
    assert "weights reach the engines by distributed" in log  # ranks on two nodes: no shared-memory sync
    assert f"train: {STEPS} steps in {straight}; learned" in log, log[-3000:]
    engine_log = (straight / "engines" / "engine0.log").read_text()
    assert "host nsr-node1" in engine_log  # rank 0's node launched it
    assert not _no_processes_left(straight)


def test_a_killed_node_fails_the_job_and_the_resubmitted_job_resumes(straight: Path, tmp_path: Path) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    proc = _submit(run_dir, out, wait=False)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    wait_past_a_checkpoint(run_dir, job, out)
    subprocess.run([*CLUSTER, "kill-node", "nsr-node2"], check=True, capture_output=True, timeout=60)
    deadline = time.time() + 240
    while not job_gone(job):
        assert time.time() < deadline, f"the job did not end after its second node died:\n{out.read_text()[-3000:]}"
        time.sleep(0.5)
    done = [r["step"] for r in read_metrics(run_dir)]
    assert done and done[-1] < STEPS, f"the job was not stopped mid-run: {done}"
    assert not (left := _no_processes_left(run_dir)), f"processes outlived the job: {left}"

    restart = subprocess.run([*CLUSTER, "start-nodes", "2"], capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr
    proc = _submit(run_dir, out, wait=True)
    assert proc.returncode == 0, f"{proc.stderr}\n{out.read_text()[-3000:]}"
    assert "resumed from" in out.read_text()
    assert_every_step_once_as_in(run_dir, straight, STEPS)


def test_engines_on_the_second_node_attached_by_url(nodes: None, tmp_path: Path) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    steps = 4  # each step syncs the weights to the engine on the second node
    proc = _submit(run_dir, out, wait=True, overrides=f"run.steps={steps}", NSR_ROLLOUT="dedicated",
                   NSR_ENGINE_BACKEND="server")
    log = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, f"sbatch --wait exited {proc.returncode}: {proc.stderr}\n{log[-3000:]}"
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, steps + 1))
    assert "1 training node(s) x 2 processes, rollout dedicated" in log
    assert "1 engine(s) ready: http://nsr-node2:30000" in log
    assert "weights reach the engines by distributed" in log
    engine_log = Path(f"{run_dir}-engines-nsr-node2-0.log").read_text()
    assert "host nsr-node2" in engine_log
    assert not _no_processes_left(run_dir)
