"""The prepared GPU check (bench/gpu_check.sh) runs end to end here at toy sizes (``dry-run``), so the script that
a GPU session runs once has no error of its own: every part completes and reports its numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_every_part_in_a_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "dry-run", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["dry_run"] is True
    for part in ("env", "layouts", "rl", "train", "logprob_op", "engine", "memory"):
        assert "error" not in got[part], (part, got[part])
    assert got["layouts"]["world1"]["fp32_ok"] and got["layouts"]["world1"]["bf16_ok"]
    assert got["train"]["tokens_per_s"] > 0 and got["engine"]["embedded_static_tok_s"] > 0
    assert got["logprob_op"]["max_abs_diff_logprob"] < 1e-4
    assert got["rl"]["verdict"].startswith("train: ")
    memory = got["memory"]
    for name in ("offload_off_fused_off", "offload_off_fused_on", "offload_on_fused_off", "offload_on_fused_on"):
        assert "error" not in memory[name] and memory[name]["planned_training_peak_bytes"] > 0, memory[name]
    assert memory["fused_op"]["max_abs_diff_logprob"] < 1e-4
