"""Every validation error names the field, the value and the fix, and fires before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from nsr_megatron.config import (
    Config,
    ConfigError,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    apply_overrides,
    load_config,
)
from nsr_megatron.models.hf_config import arch_from_hf, validate_layout
from nsr_megatron.models.tiny import tiny_moe_config

MOE = arch_from_hf(tiny_moe_config())  # 8 heads, 4 kv heads, 4 layers, 8 experts, vocab 256
DENSE = arch_from_hf(
    {
        "model_type": "qwen3",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
)


def check(arch, world=2, cuda=False, te=False, **parallel):  # type: ignore[no-untyped-def]
    model = parallel.pop("model", ModelConfig())
    validate_layout(arch, model, ParallelConfig(**parallel), world, cuda_available=cuda, have_te=te)


def test_valid_layouts_pass() -> None:
    check(MOE, tp=2, sequence_parallel=True)
    check(MOE, ep=2)
    check(MOE, pp=2)
    check(MOE, world=8, tp=2, ep=2, pp=2, sequence_parallel=True)
    check(DENSE, world=2, tp=2)


def test_heads_not_divisible_by_tp() -> None:
    with pytest.raises(
        ConfigError, match=r"parallel.tp=4 does not divide num_attention_heads=6; choose tp among \[1, 2, 3, 6\]"
    ):
        check(DENSE, world=4, tp=4)


def test_query_groups_not_divisible_by_tp() -> None:
    with pytest.raises(ConfigError, match=r"parallel.tp=3 does not divide num_key_value_heads \(query groups\)=2"):
        check(DENSE, world=3, tp=3)


def test_experts_not_divisible_by_ep() -> None:
    with pytest.raises(
        ConfigError, match=r"parallel.ep=3 does not divide num_experts=8; choose ep among \[1, 2, 4, 8\]"
    ):
        check(MOE, world=3, ep=3)


def test_layers_not_divisible_by_pp() -> None:
    with pytest.raises(
        ConfigError, match=r"parallel.pp=2 does not divide num_hidden_layers=3; choose pp among \[1, 3\]"
    ):
        check(DENSE, world=2, pp=2)


def test_world_not_multiple_of_model_parallel() -> None:
    with pytest.raises(ConfigError, match=r"world size 3 is not a multiple of tp\*pp\*cp = 2\*1\*1 = 2"):
        check(MOE, world=3, tp=2, sequence_parallel=True)


def test_moe_with_tp_needs_sequence_parallel() -> None:
    with pytest.raises(
        ConfigError, match=r"MoE with parallel.tp=2 needs sequence parallelism.*set parallel.sequence_parallel=true"
    ):
        check(MOE, tp=2)


def test_fp8_without_cuda_or_te() -> None:
    fp8 = ModelConfig(fp8="e4m3", params_dtype="bf16")
    with pytest.raises(ConfigError, match=r"model.fp8='e4m3' needs CUDA .* unset model.fp8"):
        check(MOE, world=1, model=fp8, cuda=False, te=True)
    with pytest.raises(
        ConfigError, match=r"model.fp8='e4m3' needs Transformer Engine, which is not installed; install the 'gpu' extra"
    ):
        check(MOE, world=1, model=fp8, cuda=True, te=False)
    check(MOE, world=1, model=fp8, cuda=True, te=True)


def test_transformer_engine_requested_without_it() -> None:
    te = ModelConfig(transformer_impl="transformer_engine")
    with pytest.raises(ConfigError, match=r"transformer_impl='transformer_engine' but Transformer Engine with CUDA is not available"):
        check(MOE, world=1, model=te, cuda=True, te=False)
    from nsr_megatron.models.provider import use_transformer_engine

    assert use_transformer_engine(ModelConfig(transformer_impl="local")) is False
    assert use_transformer_engine(ModelConfig(transformer_impl="auto")) is False  # no TE + CUDA on this machine


def test_single_field_errors() -> None:
    with pytest.raises(ConfigError, match=r"parallel.tp=0 must be a positive integer"):
        ParallelConfig(tp=0)
    with pytest.raises(ConfigError, match=r"sequence_parallel=true needs parallel.tp > 1"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"optimizer.lr=-1.0 must be > 0"):
        OptimizerConfig(lr=-1.0)
    with pytest.raises(ConfigError, match=r"model.fp8='e4m3' needs model.params_dtype=bf16 \(got 'fp32'\)"):
        ModelConfig(fp8="e4m3")
    with pytest.raises(ConfigError, match=r"ep=2 needs an MoE model"):
        check(DENSE, ep=2)
    with pytest.raises(ConfigError, match=r"parallel.cp=2 needs Transformer Engine attention"):
        check(MOE, cp=2)


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("parallel:\n  tp: 2\n  sequence_parallel: true\noptimizer:\n  lr: 1.0e-5\n")
    cfg = load_config(path, ["optimizer.lr=3e-4", "run.steps=7", "model.params_dtype=bf16"])
    assert isinstance(cfg, Config)
    assert cfg.parallel.tp == 2 and cfg.parallel.etp == 2  # etp defaults to tp
    assert cfg.optimizer.lr == pytest.approx(3e-4) and cfg.run.steps == 7 and cfg.model.params_dtype == "bf16"
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.lrr'. Did you mean optimizer.lr\?"):
        load_config(path, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match=r"model.params_dtype='fp64' is not one of \['fp32', 'bf16', 'fp16'\]"):
        load_config(None, ["model.params_dtype=fp64"])
    with pytest.raises(ConfigError, match=r"parallel.tp='two' must be an integer"):
        load_config(None, ["parallel.tp=two"])
    with pytest.raises(ConfigError, match=r"override 'run.steps' is not of the form key.sub=value"):
        apply_overrides({}, ["run.steps"])
    with pytest.raises(ConfigError, match=r"config file '.*missing.yaml' does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_off_reads_as_the_choice_not_a_boolean(tmp_path: Path) -> None:
    # YAML 1.1 reads a bare off as false, in a file and in a key=value override alike
    path = tmp_path / "c.yaml"
    path.write_text("profile:\n  routing: off\n")
    cfg = load_config(path, ["algorithm.routing_replay=off"])
    assert cfg.profile.routing == "off" and cfg.algorithm.routing_replay == "off"
    with pytest.raises(ConfigError, match=r"algorithm.routing_replay=True is not one of \['off', 'R2', 'R3'\]"):
        load_config(None, ["algorithm.routing_replay=yes"])


def test_unsupported_architecture_is_named() -> None:
    with pytest.raises(
        ConfigError,
        match=r"model_type='llama' is not supported; supported architectures: deepseek_v3, glm4_moe, gpt_oss, qwen2, qwen3, qwen3_moe",
    ):
        arch_from_hf({"model_type": "llama"})


def test_cli_refuses_invalid_config_before_building(capsys: pytest.CaptureFixture[str]) -> None:
    from nsr_megatron.cli import main

    rc = main(["validate", "parallel.tp=3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "parallel.tp=3 does not divide num_attention_heads=8" in err


def test_experts_without_expert_parallelism_must_split_like_attention() -> None:
    # EP=1 with ETP < TP: megatron-core 0.16.1 would reduce the experts' gradients over data parallelism only, so
    # each TP rank would keep its own sequence shard's share (measured: 0.6-0.75 of transformers' gradients)
    with pytest.raises(ConfigError, match=r"parallel.ep=1 with parallel.etp=1 < parallel.tp=2: .* Set parallel.ep "
                                          r"to 2 or more, or parallel.etp=2"):
        check(MOE, tp=2, etp=1, sequence_parallel=True)
    check(MOE, tp=2, ep=2, etp=1, sequence_parallel=True)  # expert-parallel: reduced over the TP ranks too
    check(MOE, tp=2, etp=2, sequence_parallel=True)  # split like attention: nothing to sum
