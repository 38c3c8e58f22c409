"""megatron-core's CPU-offloaded (hybrid-device) and precision-aware optimizer on the tiny MoE, in 2 gloo processes.

* Under TP=2 + sequence parallel and under EP=2, three Adam steps with ``optimizer.cpu_offload`` (all of the state,
  and half of it) give the weights three steps without it give, to float rounding (the same fp32 AdamW arithmetic
  runs on a host copy instead of in place). On CPU the host copies are separate tensors (``platform.py`` part 9):
  they own their storage, and the offloaded share is the fraction asked for.
* The first step takes the loaded HF weights into the optimizer's own copies (fp32 main copies of bf16 weights,
  host copies): every case starts from ``load_hf_sharded`` after ``build_model``, as a run does.
* A checkpoint saved with offload resumes without it and the other way round, also under another layout
  (TP=2 + SP -> EP=2): the step after the resume equals the uninterrupted run's step.
* ``precision_aware`` with offload: megatron-core 0.16's hybrid optimizer keeps Adam's moments and the master weights
  in fp32 (torch AdamW over fp32 copies; ``exp_avg_dtype=bf16`` applies to TE's FusedAdam only, and preflight says
  so), so it must match plain fp32 Adam to float rounding, not merely within bf16-moment tolerance; checked on fp32
  weights and on bf16 weights (where precision_aware drops the device's fp32 main copy), and across a checkpoint.
* ``validate`` and ``train`` refuse, in one line, the combinations megatron-core asserts on or would train wrongly.

Every rank trains on the same batch, so gradients, and weights, do not depend on the layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.e2e.test_inputs import base, refused
from tests.spawn import run_workers

OFFLOAD = {"cpu_offload": True}
CASES: dict[str, dict[str, Any]] = {  # name -> optimizer settings (+ "dtype": model.params_dtype)
    "plain": {},
    "offload": OFFLOAD,
    "half": {**OFFLOAD, "offload_fraction": 0.5},
    "aware": {**OFFLOAD, "precision_aware": True},
    "plain-bf16": {"dtype": "bf16"},
    "aware-bf16": {**OFFLOAD, "precision_aware": True, "dtype": "bf16"},
}
# (saved by, resumed by): each resume takes the third step and must land on the saving case's uninterrupted step.
RESUMES = [("plain", "offload"), ("offload", "plain"), ("half", "aware"), ("aware", "plain"),
           ("aware-bf16", "plain-bf16")]
LAYOUTS: dict[str, dict[str, Any]] = {"tp2-sp": {"tp": 2, "sequence_parallel": True}, "ep2": {"ep": 2}}
CROSS = {"ep2": [("offload", "plain"), ("plain", "half")]}  # TP=2 + SP checkpoints resumed under EP=2
ON_LAYOUT = {"tp2-sp": list(CASES), "ep2": ["plain", "offload", "half"]}
STEPS, ROWS, S = 3, 4, 12


def _batch(step: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 64, (ROWS, S), generator=g)
    return [{"tokens": tokens, "targets": torch.randint(0, 64, (ROWS, S), generator=g)}]


def _ce_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.float(), batch["targets"]).mean(), {}


def _build(hf_dir: str, layout: dict[str, Any], case: str) -> Any:
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig, read_hf_config
    from nsr_megatron.convert.sharded import load_hf_sharded
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.provider import build_model

    settings = dict(CASES[case])
    dtype = settings.pop("dtype", "fp32")
    arch = arch_from_hf(read_hf_config(hf_dir))
    policy = build_model(arch, model=ModelConfig(hf_path=hf_dir, params_dtype=dtype), parallel=ParallelConfig(**layout),
                         optimizer=OptimizerConfig(lr=1e-2, **settings))
    load_hf_sharded(policy.module, arch, hf_dir)  # after the optimizer exists, as build_runtime does
    return policy


def _step(policy: Any, step: int) -> None:
    from nsr_megatron.trainer import actor

    _, grad_norm = actor.train_step(policy, _batch(step), _ce_loss, lr=1e-2)
    assert grad_norm is not None and grad_norm > 0


def _weights(policy: Any) -> dict[str, torch.Tensor]:
    from nsr_megatron.models.state import canonical_state

    return canonical_state(policy.module)


def _hybrid(policy: Any) -> list[Any]:
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    inner = [opt.optimizer for opt in policy.optimizer.chained_optimizers]
    return [o for o in inner if isinstance(o, HybridDeviceOptimizer)]


def _check_offload(policy: Any, case: str) -> None:
    """The hybrid optimizer's host copies own their storage, cover the fraction asked for, and hold fp32 Adam."""
    fraction = CASES[case].get("offload_fraction", 1.0)
    hybrids = _hybrid(policy)
    assert hybrids, f"{case}: no hybrid-device optimizer was built"
    for hybrid in hybrids:
        params = [p for g in hybrid.param_groups for p in g["params"]]
        total = sum(p.numel() for p in params)
        host = sum(p.numel() for p in hybrid.gpu_params_map_cpu_copy)
        assert fraction * total <= host < fraction * total + max(p.numel() for p in params), (case, host, total)
        for device_param, host_copy in hybrid.gpu_params_map_cpu_copy.items():
            assert host_copy.untyped_storage().data_ptr() != device_param.untyped_storage().data_ptr()
            assert host_copy.dtype == torch.float32
        for state in hybrid.state.values():  # fp32 moments even with precision_aware (exp_avg_dtype=bf16)
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32, case


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str, rel: float) -> None:
    for key, want in expected.items():
        scale = float(want.abs().max()) or 1.0
        err = float((actual[key] - want).abs().max())
        assert err <= rel * scale, f"{what}: {key} max abs diff {err:.3e} > {rel} x max |w| {scale:.3e}"


def _worker(rank: int, world: int, init: str, hf_dir: str, out: str, layout_name: str) -> None:
    from nsr_megatron import parallel
    from nsr_megatron.config import ParallelConfig
    from nsr_megatron.trainer.checkpoint import load_checkpoint, save_checkpoint

    layout = LAYOUTS[layout_name]
    parallel.initialize(ParallelConfig(**layout), seed=3, rank=rank, world_size=world, init_method=init)
    root = Path(out)
    final: dict[str, dict[str, torch.Tensor]] = {}
    for case in ON_LAYOUT[layout_name]:
        policy = _build(hf_dir, layout, case)
        for step in range(STEPS):
            if step == STEPS - 1:
                save_checkpoint(root / layout_name / case, step, policy.module, policy.optimizer)
            _step(policy, step)
        if CASES[case].get("cpu_offload"):
            _check_offload(policy, case)
        final[case] = _weights(policy)
    # Offloading changes where Adam runs, not what it computes: the same weights to float rounding.
    for case, weights in final.items():
        reference = "plain-bf16" if case.endswith("-bf16") else "plain"
        _assert_same(weights, final[reference], f"{layout_name}: {case} vs {reference}", rel=1e-6)

    resumes = [(layout_name, saved, resumed) for saved, resumed in RESUMES if saved in final and resumed in final]
    resumes += [("tp2-sp", saved, resumed) for saved, resumed in CROSS.get(layout_name, [])]
    for saved_layout, saved, resumed in resumes:
        policy = _build(hf_dir, layout, resumed)
        load_checkpoint(root / saved_layout / saved / f"step_{STEPS - 1:08d}", policy.module, policy.optimizer)
        _step(policy, STEPS - 1)
        if saved_layout == layout_name:
            expected, rel = final[saved], 1e-6
        else:  # another layout reduces in another order: float rounding of fp32 sums
            expected, rel = torch.load(root / f"{saved_layout}-{saved}.pt"), 1e-5
        _assert_same(_weights(policy), expected, f"{saved_layout} {saved} -> {layout_name} {resumed}", rel=rel)
    if rank == 0:
        for case, weights in final.items():
            torch.save(weights, root / f"{layout_name}-{case}.pt")
        (root / f"{layout_name}.json").write_text(json.dumps(sorted(final)), encoding="utf-8")
    parallel.destroy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nsr_megatron.models.tiny import create_tiny_hf_checkpoint
    from tests.distributed.test_routing_profiler import MOE

    return create_tiny_hf_checkpoint(tmp_path_factory.mktemp("offload") / "hf", seed=9, **MOE)


def test_offload_and_precision_aware_match_plain_adam_and_resume_across_settings(hf_dir: Path,
                                                                                 tmp_path: Path) -> None:
    for layout_name in LAYOUTS:  # TP=2 + SP first: its checkpoints are resumed under EP=2
        run_workers(_worker, 2, str(hf_dir), str(tmp_path), layout_name)
        assert json.loads((tmp_path / f"{layout_name}.json").read_text()) == sorted(ON_LAYOUT[layout_name])


# ------------------------------------------------------------------------------------------------ refusals

def test_validate_refuses_what_megatron_asserts_on(model: Path, data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "r"
    msg = refused(capsys, *base(model, data, run, "optimizer.precision_aware=true"))
    assert "optimizer.precision_aware=true needs Transformer Engine's FusedAdam" in msg
    assert "set optimizer.cpu_offload=true" in msg
    msg = refused(capsys, *base(model, data, run, "optimizer.precision_aware=true",
                                "parallel.use_distributed_optimizer=false"))
    assert "optimizer.precision_aware=true needs parallel.use_distributed_optimizer=true" in msg
    msg = refused(capsys, *base(model, data, run, "optimizer.cpu_offload=true",
                                "parallel.use_distributed_optimizer=false"))
    assert "optimizer.cpu_offload=true needs parallel.use_distributed_optimizer=true" in msg
    msg = refused(capsys, *base(model, data, run, "optimizer.main_params_dtype=fp16", "optimizer.exp_avg_dtype=fp16"))
    assert "optimizer.main_params_dtype=fp16, optimizer.exp_avg_dtype=fp16 applies only with " \
           "optimizer.precision_aware=true" in msg
    msg = refused(capsys, *base(model, data, run, "optimizer.precision_aware=true", "optimizer.cpu_offload=true",
                                "optimizer.offload_fraction=0.5"))
    assert "optimizer.offload_fraction=0.5 and model.params_dtype=fp32" in msg
    assert "set optimizer.offload_fraction=1.0" in msg


def test_validate_accepts_the_fixes_and_names_what_offload_ignores(model: Path, data: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from nsr_megatron.cli import main

    run = tmp_path / "r"
    with caplog.at_level("WARNING"):
        assert main(["validate", *base(model, data, run, "optimizer.precision_aware=true",
                                       "optimizer.cpu_offload=true")]) == 0
        assert main(["validate", *base(model, data, run, "optimizer.offload_fraction=0.5")]) == 0
    assert "optimizer.exp_avg_dtype=bf16, exp_avg_sq_dtype=bf16 are ignored with optimizer.cpu_offload=true" \
        in caplog.text
    assert "optimizer.offload_fraction / offload_overlap are ignored: optimizer.cpu_offload=false." in caplog.text
    capsys.readouterr()
