"""rollout.offload_train: the training state leaves the device while the engine generates and comes back bit for
bit, so a run with it logs the same metrics, and ends with the same weights and Adam state, as a run without it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.e2e.test_rl_loop import _final_weights, _ok, read_metrics, run_cli

COMMON = ["--no-progress", "run.steps=3", "checkpoint.save_interval=3", "rollout.prompts_per_step=8",
          "rollout.samples_per_prompt=4", "loss.kl_coef=0.01",  # KL on: a reference model to offload too
          "eval.interval=1", "eval.data=generate", "eval.k=2", "eval.max_problems=8"]  # evaluation between rollouts


def test_offloaded_train_state_is_freed_while_generating_and_changes_no_number(tmp_path: Path) -> None:
    runs = {flag: tmp_path / f"offload-{flag}" for flag in ("true", "false")}
    spies = {flag: tmp_path / f"spy-{flag}.jsonl" for flag in runs}
    for flag, run_dir in runs.items():
        _ok(run_cli("quickstart", *COMMON, f"run.run_dir={run_dir}", f"rollout.offload_train={flag}",
                    module="tests.e2e.offload_spy", env={"NSR_OFFLOAD_SPY": str(spies[flag])}))
    seen = {flag: [json.loads(line) for line in path.read_text().splitlines()] for flag, path in spies.items()}
    on, off = seen["true"], seen["false"]
    assert [r["phase"] for r in on] == [r["phase"] for r in off] and len(on) >= 6
    for r_on, r_off in zip(on, off, strict=True):
        if r_on["phase"] == "rollout":  # the policy, its gradients, Adam state and the reference: all freed
            assert r_on["train_state"] == 0 < r_off["train_state"], (r_on, r_off)
            assert r_on["engine"] == r_off["engine"] > 0  # the engine generates from its weights
        else:  # training: the state is back in full; the engine's weights wait in host memory
            assert r_on["train_state"] == r_off["train_state"] > 0, (r_on, r_off)
            assert r_on["engine"] == 0 < r_off["engine"], (r_on, r_off)
    a, b = read_metrics(runs["true"]), read_metrics(runs["false"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert (ra["kl_ref"] > 0 or ra["step"] == 1) and "eval/pass@1" in ra
        for key, value in rb.items():
            if not key.startswith("timing/"):
                assert ra[key] == value, f"step {rb['step']} {key}: offloaded {ra[key]} vs not {value}"
    wa, wb = _final_weights(runs["true"], 3, tmp_path), _final_weights(runs["false"], 3, tmp_path)
    assert sorted(wa) == sorted(wb) and any(k.startswith("optimizer.") for k in wa)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
