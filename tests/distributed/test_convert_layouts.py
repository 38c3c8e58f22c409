"""Converted checkpoints give the transformers model's logits under every layout, and checkpoints
saved by a TP=2 run convert back to the original HF weights.

Tiny random HF models (``tests/unit/test_convert.py``) are converted with ``hf_to_mcore``; two gloo
processes then load each one under TP=1 (DP=2), TP=2 + sequence parallelism, PP=2, EP=2 (MoE) and
TP=2 + EP=2 with expert-TP=1, all in one spawn, and compare full-vocabulary logits with the HF
model's (eager attention, fp32) to 1e-4. Under TP=2 the models are saved with ``save_checkpoint``
(the MoE one as a policy with Adam state after a zero-learning-rate step, under a run directory)
and converted back to HF, which must equal the original bit for bit. ``tools/convert.py verify``
runs as a command, spawning its own workers.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from nsr_megatron.convert import hf_to_mcore, mcore_to_hf
from tests.spawn import run_workers
from tests.unit.test_convert import make_tiny_hf, read_all

REPO = Path(__file__).resolve().parents[2]
SEED = 11
TOKENS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(SEED))  # [B, S]
TOL = 1e-4

LAYOUTS: dict[str, dict[str, Any]] = {
    "tp1": {},
    "tp2-sp": {"tp": 2, "sequence_parallel": True},
    "pp2": {"pp": 2},
    "ep2": {"ep": 2},
    "tp2-ep2-etp1": {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True},
}
ARCH_LAYOUTS = {
    "qwen2-tied": ["tp1", "tp2-sp", "pp2"],
    "qwen2-untied": ["tp2-sp"],
    "qwen3": ["tp1", "tp2-sp", "pp2"],
    "qwen3-moe": ["tp1", "tp2-sp", "pp2", "ep2", "tp2-ep2-etp1"],
    "qwen3-moe-mixed": ["tp2-sp", "pp2", "ep2"],
}
# (arch, layout) whose loaded model is saved again with save_checkpoint: (with optimizer state?)
SAVES = {("qwen3-moe", "tp2-sp"): True, ("qwen2-tied", "tp2-sp"): False, ("qwen3", "tp2-sp"): False}
CASES = [(arch, layout) for arch, layouts in ARCH_LAYOUTS.items() for layout in layouts]


def _worker(rank: int, world: int, init: str, cases: list[dict[str, Any]], out: str) -> None:
    from megatron.core import parallel_state as mpu

    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig, read_hf_config
    from nsr_megatron.models.hf_config import arch_from_hf, validate_layout
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.trainer import actor
    from nsr_megatron.trainer.checkpoint import load_checkpoint, save_checkpoint

    model_cfg = ModelConfig(transformer_impl="local")
    for case in cases:
        par = ParallelConfig(**LAYOUTS[case["layout"]])
        arch = arch_from_hf(read_hf_config(case["hf"]))
        validate_layout(arch, model_cfg, par, world)
        parallel.initialize(par, seed=SEED, rank=rank, world_size=world, init_method=init)
        role = "policy" if case.get("save_optimizer") else "reference"
        bundle = build_model(
            arch, model=model_cfg, parallel=par, role=role, optimizer=OptimizerConfig(lr=1e-3)
        )
        load_checkpoint(case["ckpt"], bundle.module)
        logits = actor.forward_logits(bundle, [{"tokens": TOKENS}])
        if case.get("save_root"):
            if case["save_optimizer"]:  # Adam state exists after a step; lr=0 leaves the weights as loaded
                actor.zero_grads(bundle)
                actor.optimizer_step(bundle, lr=0.0)
            save_checkpoint(
                case["save_root"], 3, bundle.module, bundle.optimizer if case["save_optimizer"] else None
            )
        if (
            logits is not None
            and mpu.get_tensor_model_parallel_rank() == 0
            and mpu.get_data_parallel_rank() == 0
        ):
            torch.save(logits[0], os.path.join(out, f"{case['arch']}-{case['layout']}.pt"))
        mpu.destroy_model_parallel()
    parallel.destroy()


def _hf_logits(hf: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(TOKENS).logits  # [B, S, V]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("convert_layouts")
    hf = {arch: make_tiny_hf(tmp / "hf" / arch, arch) for arch in ARCH_LAYOUTS}
    ckpt = {arch: hf_to_mcore(hf[arch], tmp / "ckpt" / arch, progress=False) for arch in ARCH_LAYOUTS}
    saved: dict[tuple[str, str], Path] = {}
    cases = []
    for arch, layout in CASES:
        case: dict[str, Any] = {"arch": arch, "layout": layout, "hf": str(hf[arch]), "ckpt": str(ckpt[arch])}
        if (arch, layout) in SAVES:
            run_dir = tmp / "runs" / arch
            run_dir.mkdir(parents=True)
            (run_dir / "config.yaml").write_text(f"model:\n  hf_path: {hf[arch]}\n")
            saved[(arch, layout)] = run_dir / "checkpoints"
            case.update(save_root=str(run_dir / "checkpoints"), save_optimizer=SAVES[(arch, layout)])
        cases.append(case)
    out = tmp / "logits"
    out.mkdir()
    run_workers(_worker, 2, cases, str(out))
    return {
        "hf": hf,
        "ckpt": ckpt,
        "saved": saved,
        "ref": {arch: _hf_logits(hf[arch]) for arch in ARCH_LAYOUTS},
        "got": {f"{a}-{lay}": torch.load(out / f"{a}-{lay}.pt", weights_only=True) for a, lay in CASES},
        "tmp": tmp,
    }


@pytest.mark.parametrize("arch,layout", CASES, ids=[f"{a}-{lay}" for a, lay in CASES])
def test_logits_match_transformers(runs: dict[str, Any], arch: str, layout: str) -> None:
    ref, got = runs["ref"][arch], runs["got"][f"{arch}-{layout}"]
    assert got.shape == ref.shape == (2, 8, 64)
    err = float((got - ref).abs().max())
    assert err <= TOL, f"{arch} under {layout}: max |logit diff| {err:.3e} > {TOL}"


@pytest.mark.parametrize("arch,layout", sorted(SAVES), ids=[f"{a}-{lay}" for a, lay in sorted(SAVES)])
def test_checkpoint_saved_under_tp2_converts_back_to_the_original(
    runs: dict[str, Any], arch: str, layout: str, tmp_path: Path
) -> None:
    root = runs["saved"][(arch, layout)]
    step = root / "step_00000003"
    meta = pickle.loads((step / ".metadata").read_bytes()).state_dict_metadata
    qkv = next(v for k, v in meta.items() if k.endswith("linear_qkv.weight"))
    assert len(qkv.chunks) >= 2, "saved under TP=2: the qkv weight is stored in TP shards"
    assert json.loads((step / "nsr_meta.json").read_text())["has_optimizer"] is SAVES[(arch, layout)]
    assert any(k.startswith("optimizer.") for k in meta) is SAVES[(arch, layout)]
    if SAVES[(arch, layout)]:
        # the command line, from the checkpoint root; the HF config comes from the run's config.yaml
        r = subprocess.run(
            [
                sys.executable,
                str(REPO / "tools" / "convert.py"),
                "mcore-to-hf",
                "--ckpt",
                str(root),
                "--out",
                str(tmp_path / "hf"),
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        assert "step_00000003" in r.stdout
        out = tmp_path / "hf"
    else:
        out = mcore_to_hf(step, tmp_path / "hf", hf_config=runs["hf"][arch], progress=False)
    original, back = read_all(runs["hf"][arch]), read_all(out)
    assert sorted(back) == sorted(original)
    for key, t in original.items():
        assert torch.equal(back[key], t), key


def _verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert.py"), "verify", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def test_verify_command_passes_under_tp2_and_fails_on_other_weights(runs: dict[str, Any]) -> None:
    hf, ckpt = runs["hf"]["qwen3-moe"], runs["ckpt"]["qwen3-moe"]
    r = _verify("--hf-dir", str(hf), "--ckpt", str(ckpt), "--tp", "2", "--tol", "1e-4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(2 processes)" in r.stdout and "max |logit diff|" in r.stdout and "OK" in r.stdout

    other = make_tiny_hf(runs["tmp"] / "other", "qwen3-moe", seed=5)
    r = _verify("--hf-dir", str(other), "--ckpt", str(ckpt))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "max |logprob diff|" in r.stdout and "FAILED" in r.stderr
