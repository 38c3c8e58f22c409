"""``nsr_megatron.cli.model_path``: the HF folder a run starts from, for tools that load the model before the
trainer does (train.sbatch's dedicated engines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nsr_megatron.cli import model_path
from nsr_megatron.config import ConfigError


def test_the_quickstart_model_is_made_in_the_run_directory_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    path = model_path("quickstart", [f"run.run_dir={run_dir}"])
    assert Path(path) == run_dir / "hf-init" and (run_dir / "hf-init" / "config.json").is_file()
    before = (run_dir / "hf-init" / "config.json").stat().st_mtime_ns
    assert model_path("quickstart", [f"run.run_dir={run_dir}"]) == path  # kept, not made again
    assert (run_dir / "hf-init" / "config.json").stat().st_mtime_ns == before


def test_a_named_model_is_returned_as_is_and_a_config_without_one_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  hf_path: /models/x\n")
    assert model_path(str(config), []) == "/models/x"
    config.write_text("run:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="sets no model.hf_path"):
        model_path(str(config), [])
