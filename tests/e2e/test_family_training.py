"""The quickstart task trains from the folder of a model family other than Qwen: a tiny random DeepSeek-V3
(multi-latent attention, grouped sigmoid routing with an expert bias, shared experts, a first dense layer) with the
quickstart's tokenizer. Each weight sync carries the router's expert bias, a buffer of the HF model, to the engine:
the embedded engine (in process) and the project's server (shared-memory sync)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nsr_megatron.data.tokenizer import save_synthetic_tokenizer
from tests.e2e.test_rl_loop import _ok, read_metrics, run_cli
from tests.unit.test_family_deepseek_v3 import make_deepseek_v3

STEPS = 4


@pytest.mark.parametrize("backend", ["embedded", "server"])
def test_the_quickstart_trains_from_a_deepseek_v3_folder(tmp_path: Path, backend: str) -> None:
    hf = make_deepseek_v3(tmp_path / "hf", q_lora_rank=16, vocab_size=32)
    save_synthetic_tokenizer(hf)
    run_dir = tmp_path / "run"
    proc = run_cli("quickstart", f"run.run_dir={run_dir}", f"model.hf_path={hf}", f"run.steps={STEPS}",
                   f"rollout.backend={backend}", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4",
                   "checkpoint.save_interval=0")
    _ok(proc)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["grad_norm"] > 0 for r in rows)
    assert all(r["response_length/mean"] > 0 for r in rows)
    if backend == "server":
        assert "by shared_memory" in proc.stdout + proc.stderr
