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
    assert re.fullmatch(r"(qwen3-30b-a3b|qwen3-8b|qwen2\.5-math-7b)-(nsr|dapo|gspo)-(bf16|fp8)(-.+)?", name), name


def test_a_layout_that_does_not_fit_says_so_and_names_one_that_does(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = RECIPES / "qwen3-30b-a3b-nsr-bf16.yaml"
    config_json = str(RECIPES / "models" / "qwen3-30b-a3b" / "config.json")
    code = main(["plan", "--config", str(recipe), "--nodes", "4", "--gpus-per-node", "8", "--model-config",
                 config_json, "model.recompute="])  # no recompute: 16k-token micro-batches of activations
    out = capsys.readouterr().out
    assert code == 1 and "does not fit" in out
    hint = re.search(r"nearest layout that fits: (.+) \(peak", out)
    assert hint, out
    assert main(["plan", "--config", str(recipe), "--nodes", "4", "--gpus-per-node", "8", "--model-config",
                 config_json, "model.recompute=", *hint.group(1).split()]) == 0  # and it does fit
    capsys.readouterr()
    code = main(["plan", "--config", str(recipe), "--nodes", "1", "--gpus-per-node", "8", "--model-config",
                 config_json])  # 30B with Adam on 8 x 80 GB: nothing fits
    out = capsys.readouterr().out
    assert code == 1 and "no layout fits 8 GPUs of 80 GiB" in out
    code = main(["validate", "--config", str(recipe), "--world-size", "8", "--model-config", config_json,
                 "--gpu-mem-gb", "80"])
    assert code == 2 and "does not fit" in capsys.readouterr().err
