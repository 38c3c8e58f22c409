"""The memory planner (``models/memory.py``, ``nsr-megatron plan``) and the recipes it checks.

- Parameter counts of the shipped configs by arithmetic: Qwen3-30B-A3B has about 30.5B parameters, 3.3B active.
- Every recipe passes ``validate --model-config`` and ``plan`` for the cluster its header names.
- A layout that does not fit says so, exits 1, and names the nearest layout that fits.
- The planner's per-GPU parameter, gradient and optimizer counts equal those of the real megatron-core model under
  TP=2, EP=2 and PP=2 (tests/distributed/test_memory_layouts.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nsr_megatron.cli import main
from nsr_megatron.models.hf_config import arch_from_hf
from nsr_megatron.models.memory import Layout, count_parameters, plan_memory

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "recipes"


def _arch(name: str):  # type: ignore[no-untyped-def]
    return arch_from_hf(json.loads((RECIPES / "models" / name / "config.json").read_text()))


def test_parameter_counts_of_the_shipped_models() -> None:
    moe = count_parameters(_arch("qwen3-30b-a3b"))
    assert moe.total == pytest.approx(30.5e9, rel=0.01) and moe.active == pytest.approx(3.3e9, rel=0.03)
    assert count_parameters(_arch("qwen3-8b")).total == pytest.approx(8.19e9, rel=0.01)
    assert count_parameters(_arch("qwen2.5-math-7b")).total == pytest.approx(7.62e9, rel=0.01)
    moonlight = count_parameters(_arch("moonlight-16b-a3b"))  # "16B-A3B"; the planner's count equals HF's (test_family_*)
    assert moonlight.total == pytest.approx(15.96e9, rel=0.01) and moonlight.active == pytest.approx(2.91e9, rel=0.01)


def test_sharding_divides_what_it_should() -> None:
    arch = _arch("qwen3-30b-a3b")
    kw = dict(params_dtype="bf16", micro_batch_tokens=4096)
    one = plan_memory(arch, Layout(world=64), **kw)  # type: ignore[arg-type]
    ep8 = plan_memory(arch, Layout(ep=8, world=64), **kw)  # type: ignore[arg-type]
    experts = 48 * count_parameters(arch).experts_per_layer * 2  # bf16 bytes of every expert
    assert one.parts["parameters"] - ep8.parts["parameters"] == pytest.approx(experts * 7 / 8)
    recompute = plan_memory(arch, Layout(ep=8, world=64), recompute="full", **kw)  # type: ignore[arg-type]
    assert recompute.parts["activations"] < ep8.parts["activations"] / 5
    fp8 = plan_memory(arch, Layout(ep=8, world=64), fp8=True, **kw)  # type: ignore[arg-type]
    assert fp8.parts["activations"] < ep8.parts["activations"] and "fp8 weights" in fp8.parts


def _recipes() -> list[Path]:
    found = sorted(RECIPES.glob("*.yaml"))
    assert len(found) >= 8, found
    return found


@pytest.mark.parametrize("recipe", _recipes(), ids=lambda p: p.stem)
def test_every_recipe_validates_and_fits_its_cluster(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = recipe.read_text()
    cluster = re.search(r"^# cluster: (.+)$", text, re.M)
    model = re.search(r"^# model-config: (.+)$", text, re.M)
    assert cluster and model, f"{recipe.name} must name its cluster and model-config in its header"
    args = cluster.group(1).split()
    config_json = str(RECIPES / model.group(1).strip())
    world = int(args[args.index("--nodes") + 1]) * int(args[args.index("--gpus-per-node") + 1])
    assert main(["validate", "--config", str(recipe), "--world-size", str(world), "--model-config", config_json,
                 "--gpu-mem-gb", args[args.index("--gpu-mem-gb") + 1]]) == 0, capsys.readouterr().err
    assert main(["plan", "--config", str(recipe), *args, "--model-config", config_json]) == 0
    out = capsys.readouterr().out
    assert "fits: peak" in out and "B parameters" in out
    name = recipe.stem  # named by model, loss and precision
    assert re.fullmatch(r"(qwen3-30b-a3b|qwen3-8b|qwen2\.5-math-7b|moonlight-16b-a3b|gpt-oss-20b|glm-4\.5-air)-(nsr|dapo|gspo)-"
                        r"(bf16|fp8)(-.+)?", name), name


def test_a_layout_that_does_not_fit_says_so_and_names_one_that_does(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = RECIPES / "qwen3-30b-a3b-nsr-bf16.yaml"
    config_json = str(RECIPES / "models" / "qwen3-30b-a3b" / "config.json")
    code = main(["plan", "--config", str(recipe), "--nodes", "4", "--gpus-per-node", "8", "--model-config",
                 config_json, "model.recompute="])  # no recompute: 16k-token micro-batches of activations
    out = capsys.readouterr().out
    assert code == 1 and "does not fit" in out
    hint = re.search(r"nearest settings that fit: (.+) \(peak", out)
    assert hint, out
    assert main(["plan", "--config", str(recipe), "--nodes", "4", "--gpus-per-node", "8", "--model-config",
                 config_json, "model.recompute=", *hint.group(1).split()]) == 0  # and it does fit
    capsys.readouterr()
    code = main(["plan", "--config", str(recipe), "--nodes", "1", "--gpus-per-node", "8", "--model-config",
                 config_json])  # 30B with Adam on 8 x 80 GB: only with memory options turned on
    out = capsys.readouterr().out
    hint = re.search(r"nearest settings that fit: (.+) \(peak", out)
    assert code == 1 and hint and re.search(r"optimizer\.cpu_offload=true|rollout\.offload_train=true", hint.group(1)), out
    assert main(["plan", "--config", str(recipe), "--nodes", "1", "--gpus-per-node", "8", "--model-config",
                 config_json, *hint.group(1).split()]) == 0
    capsys.readouterr()
    code = main(["plan", "--config", str(recipe), "--nodes", "1", "--gpus-per-node", "2", "--model-config",
                 config_json, "parallel.ep=2", "parallel.tp=2"])  # 2 GPUs: nothing fits, whatever is on
    assert code == 1 and "no layout fits 2 GPUs of 80 GiB" in capsys.readouterr().out
    code = main(["validate", "--config", str(recipe), "--world-size", "8", "--model-config", config_json,
                 "--gpu-mem-gb", "80"])
    assert code == 2 and "does not fit" in capsys.readouterr().err


def test_each_memory_option_takes_what_it_should() -> None:
    """Each option changes its own term by the amount its mechanism saves, and the phases combine as described."""
    from nsr_megatron.models.memory import MemoryOptions

    arch = _arch("qwen3-30b-a3b")
    lay = Layout(tp=4, ep=8, etp=1, world=8, sequence_parallel=True)
    kw = dict(params_dtype="bf16", micro_batch_tokens=32768, recompute="full", colocated_fraction=0.7,
              gpu_bytes=80 * 1024**3)
    base = plan_memory(arch, lay, **kw)  # type: ignore[arg-type]
    full_opt = base.parts["optimizer"]
    half = plan_memory(arch, lay, options=MemoryOptions(optimizer_offload=0.5), **kw)  # type: ignore[arg-type]
    # the offloaded half moves to the host (fp32 copy + moments, 12 B); its fp32 master shards (4 B) stay
    assert half.parts["optimizer"] == pytest.approx(full_opt * (6 + 2) / 12)
    assert half.host_optimizer == pytest.approx(full_opt / 2)
    both = plan_memory(arch, lay, options=MemoryOptions(optimizer_offload=1.0, precision_aware=True), **kw)  # type: ignore[arg-type]
    assert both.parts["optimizer"] == 0.0 and both.host_optimizer == pytest.approx(full_opt)
    aware = plan_memory(arch, lay, options=MemoryOptions(precision_aware=True, exp_avg_bytes=2, exp_avg_sq_bytes=2),
                        **kw)  # type: ignore[arg-type]
    assert aware.parts["optimizer"] == pytest.approx(full_opt * 8 / 12)  # fp32 master (4) + bf16 moments (2 + 2)
    fused = plan_memory(arch, lay, options=MemoryOptions(fused_logprobs=True), **kw)  # type: ignore[arg-type]
    assert fused.parts["logits"] < base.parts["logits"] / 20
    assert base.parts["logits"] == pytest.approx(32768 * 151936 / 4 * 12 + 32768 * 24)
    assert base.while_generating == pytest.approx(base.resident + 0.7 * 80 * 1024**3)
    off = plan_memory(arch, lay, options=MemoryOptions(offload_train=True), **kw)  # type: ignore[arg-type]
    assert off.while_generating == pytest.approx(0.7 * 80 * 1024**3)  # nothing of the trainer's stays
    assert off.weight_sync == pytest.approx(off.resident + 2 * count_parameters(arch).total)  # engine TP 1
    assert off.peak == max(off.training_peak, off.while_generating, off.weight_sync)
    assert base.largest[0] == "optimizer"


def test_the_one_node_recipe_plans_each_option_off_in_turn(capsys: pytest.CaptureFixture[str]) -> None:
    """The 1-node H100 recipe fits with 10% headroom at 32k tokens per GPU; the plan names the options it assumed,
    and without train-state offload it does not fit (the engine's 0.7 share on top of the trainer's state)."""
    recipe = RECIPES / "qwen3-30b-a3b-nsr-bf16-1node-h100.yaml"
    config_json = str(RECIPES / "models" / "qwen3-30b-a3b" / "config.json")
    args = ["plan", "--config", str(recipe), "--nodes", "1", "--gpus-per-node", "8", "--model-config", config_json]
    assert main(args) == 0
    out = capsys.readouterr().out
    peak = float(re.search(r"fits: peak ([\d.]+) GiB", out).group(1))  # type: ignore[union-attr]
    import yaml

    assert peak <= 0.9 * 0.9 * 80  # 10% headroom below the 90% the planner calls usable
    assert yaml.safe_load(recipe.read_text())["algorithm"]["max_tokens_per_micro_batch"] >= 16384
    assert ("options: optimizer.cpu_offload=on" in out and "precision_aware=on" in out
            and "rollout.offload_train=on" in out and "model.fused_logprobs=on" in out)
    assert main([*args, "rollout.offload_train=false"]) == 1
    assert "nearest settings that fit: rollout.offload_train=true" in capsys.readouterr().out
    for option in ("optimizer.cpu_offload=false", "optimizer.precision_aware=false", "model.fused_logprobs=false"):
        main([*args, option])
        assert "peak" in capsys.readouterr().out


def test_glm_4_5_air_takes_two_nodes_of_8_x_80_gb_and_not_one(capsys: pytest.CaptureFixture[str]) -> None:
    """The GLM-4.5-Air recipe names the fewest nodes the planner allows: on one node no layout fits, whatever the
    memory options; on two its own layout does."""
    recipe = RECIPES / "glm-4.5-air-nsr-bf16.yaml"
    config_json = str(RECIPES / "models" / "glm-4.5-air" / "config.json")
    args = ["plan", "--config", str(recipe), "--gpus-per-node", "8", "--gpu-mem-gb", "80", "--model-config",
            config_json]
    assert main([*args, "--nodes", "1", "parallel.ep=8", "rollout.num_engines=1"]) == 1
    assert "no layout fits 8 GPUs of 80 GiB" in capsys.readouterr().out
    assert main([*args, "--nodes", "2"]) == 0
    assert "fits: peak" in capsys.readouterr().out
