"""The suite's per-test timeout (pyproject.toml): a test that hangs fails under its own name, with the stacks of
its threads, and the tests after it still run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_hanging_test_fails_by_name_and_the_next_one_runs(tmp_path: Path) -> None:
    (tmp_path / "test_hang.py").write_text(
        "import time\n\n"
        "def test_hangs_forever():\n    time.sleep(3600)\n\n"
        "def test_after_the_hang():\n    assert True\n")
    # the project's own pytest settings, with the limit lowered from its 600 s
    proc = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                           str(tmp_path), "-o", "timeout=3", str(tmp_path / "test_hang.py")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Timeout" in out and "test_hangs_forever" in out, out
    assert "1 failed, 1 passed" in out, out


def test_the_project_sets_a_timeout() -> None:
    import tomllib

    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert int(options["timeout"]) >= 300 and options["timeout_method"] == "signal"
