"""The quickstart task trains from the folder of each model family other than Qwen, a tiny random HF model with
the quickstart's tokenizer, with R2 routing replay and the routing profiler on:

- DeepSeek-V3 (multi-latent attention, grouped sigmoid routing with an expert bias, shared experts, a first dense
  layer), with the embedded engine (in process) and the project's server (shared-memory sync). Each weight sync
  carries the router's expert bias, a buffer of the HF model, to the engine.
- GLM-4.5 (sigmoid routing with a bias, shared experts, partial rotary, attention biases) and gpt-oss (attention
  sinks, sliding-window layers, biased experts with the clamped SwiGLU), with the project's server.

Two mini-batches per step: without replay the second trains on routers the first moved; with R2 the training
forward routes as the old-log-prob pass did, so ``routing/drift_old_train`` is 0 at every step."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from nsr_megatron.data.tokenizer import save_synthetic_tokenizer
from tests.e2e.test_rl_loop import _ok, read_metrics, run_cli

STEPS = 3


def _deepseek_v3(path: Path) -> Path:
    from tests.unit.test_family_deepseek_v3 import make_deepseek_v3

    return make_deepseek_v3(path, q_lora_rank=16, vocab_size=32)


def _glm4_moe(path: Path) -> Path:
    from tests.unit.test_family_glm4_moe import make_glm4_moe

    return make_glm4_moe(path, vocab_size=32)


def _gpt_oss(path: Path) -> Path:
    from tests.unit.test_family_gpt_oss import make_gpt_oss

    return make_gpt_oss(path, vocab_size=32)


FAMILIES: dict[str, Callable[[Path], Path]] = {"deepseek_v3": _deepseek_v3, "glm4_moe": _glm4_moe,
                                               "gpt_oss": _gpt_oss}
CASES = [("deepseek_v3", "embedded"), ("deepseek_v3", "server"), ("glm4_moe", "server"), ("gpt_oss", "server")]


@pytest.mark.parametrize(("family", "backend"), CASES, ids=[f"{f}-{b}" for f, b in CASES])
def test_the_quickstart_trains_from_the_folder_of_a_model_family(tmp_path: Path, family: str, backend: str) -> None:
    hf = FAMILIES[family](tmp_path / "hf")
    save_synthetic_tokenizer(hf)
    run_dir = tmp_path / "run"
    proc = run_cli("quickstart", f"run.run_dir={run_dir}", f"model.hf_path={hf}", f"run.steps={STEPS}",
                   f"rollout.backend={backend}", "rollout.prompts_per_step=16", "rollout.samples_per_prompt=4",
                   "algorithm.mini_batches=2", "algorithm.routing_replay=R2", "profile.routing=counters",
                   "checkpoint.save_interval=0")
    _ok(proc)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # it trained: a random model's rewards are sparse (0-4 of 32 responses per step), so a step may find no group
    # with unequal rewards; 64 responses a step make three such steps in a row unlikely
    assert any(r["grad_norm"] > 0 for r in rows), [(r["reward/mean"], r["grad_norm"]) for r in rows]
    assert all(r["response_length/mean"] > 0 for r in rows)
    assert [r["routing/drift_old_train"] for r in rows] == [0.0] * STEPS
    assert all(math.isfinite(r["routing/entropy"]) and r["routing/entropy"] > 0 for r in rows)
    if backend == "server":
        assert "by shared_memory" in proc.stdout + proc.stderr
