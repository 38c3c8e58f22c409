"""The wheel holds every module of the package, and a non-editable install runs the quickstart from a folder
outside the source tree (as a pip-installed user, or an image built without ``-e``, would)."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.glob("nsr_megatron-*.whl")
    return found


def _package_files() -> set[str]:
    """Every file of the package in the source tree that is part of the code: modules, configs, py.typed."""
    pkg = ROOT / "nsr_megatron"
    return {str(p.relative_to(ROOT)) for p in pkg.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".yaml", ".typed")}


def test_the_wheel_holds_every_module_of_the_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith("nsr_megatron/")}
    source = _package_files()
    assert "nsr_megatron/trainer/loop.py" in source and "nsr_megatron/configs/quickstart.yaml" in source
    assert source - shipped == set(), f"left out of the wheel: {sorted(source - shipped)}"
    assert shipped - source == set(), f"in the wheel but not in the source tree: {sorted(shipped - source)}"


def test_a_non_editable_install_runs_the_quickstart_outside_the_source_tree(wheel: Path, tmp_path: Path) -> None:
    """A fresh venv gets the wheel (no source tree on its path); the dependencies come from this interpreter's
    site-packages through a .pth line, so nothing is downloaded. Editable-install hooks there are not run
    (.pth files of an added folder are not processed), so only the wheel can provide ``nsr_megatron``."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (Path(purelib) / "nsr_deps.pth").write_text("\n".join(deps) + "\n", encoding="utf-8")
    proc = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "2"
    where = subprocess.run([str(py), "-c", "import nsr_megatron.trainer.loop as m; print(m.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(purelib), f"nsr_megatron came from {where}, not from the wheel"
    check = subprocess.run([str(py), "-m", "pip", "check"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "nsr-megatron" not in check.stdout, check.stdout  # the wheel's requirements are all met
    run_dir = tmp_path / "runs" / "qs"
    proc = subprocess.run([str(venv / "bin" / "nsr-megatron"), "quickstart", "--no-progress", "run.steps=2",
                           f"run.run_dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"train: 2 steps in {run_dir}" in proc.stdout
    assert (run_dir / "checkpoints" / "step_00000002" / "nsr_meta.json").is_file()
