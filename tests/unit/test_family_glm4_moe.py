"""GLM-4.5 (:mod:`nsr_megatron.models.families.glm4_moe`) against ``transformers``' own model.

Tiny random ``Glm4MoeForCausalLM`` models of odd sizes (hidden 40, 4 query heads in 2 groups, head_dim 12, RoPE on
the first 6 dimensions of each head, vocabulary 62), one dense layer before two MoE layers (8 experts, top-4,
routed_scaling_factor 2.5, a random expert bias), fp32, in two variants: ``bias-qknorm`` (q/k/v biases, q/k norms,
4 groups / top-2 groups, 2 shared experts) and ``plain`` (neither, no groups, 1 shared expert, tied embeddings):

1. the converted megatron model (local spec, one gloo process) gives the transformers logits to 1e-5, and one
   training step's loss and the gradient of every weight equal the transformers model's;
2. ``tools/convert.py`` HF -> megatron -> HF is bit-exact and its ``verify`` passes;
3. the planner's parameter count is the HF model's ``num_parameters()``;
4. configs the megatron model would not reproduce are refused with the reason and the fix; MTP layers are dropped
   with a warning.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from nsr_megatron.config import ConfigError, read_hf_config
from nsr_megatron.models.families.glm4_moe import Glm4MoeArch
from nsr_megatron.models.hf_config import arch_from_hf
from nsr_megatron.models.memory import count_parameters
from tests.spawn import run_workers
from tests.unit.test_convert import read_all
from tests.unit.test_family_deepseek_v3 import TOKENS, VOCAB, _cli, _grads_worker, _logits_worker, hf_grads

# The DeepSeek-V3 test's workers run its TOKENS [B, S] (vocabulary VOCAB = 62) through any checkpoint's megatron model.

SIZES: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=40, intermediate_size=56, moe_intermediate_size=12, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=12, n_routed_experts=8, n_shared_experts=2,
    num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
    norm_topk_prob=True, attention_bias=True, use_qk_norm=True, max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    num_nextn_predict_layers=0, tie_word_embeddings=False,
)
VARIANTS: dict[str, dict[str, Any]] = {
    "bias-qknorm": {},
    "plain": dict(attention_bias=False, use_qk_norm=False, n_group=1, topk_group=1, n_shared_experts=1,
                  tie_word_embeddings=True),
}


def make_glm4_moe(path: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A random tiny GLM-4-MoE saved with ``save_pretrained`` (fp32; ``SIZES`` with ``overrides``, e.g. the
    ``vocab_size`` of a tokenizer). Weights are drawn wider than the default initialisation, norms and biases away
    from 1 / 0, and the expert bias away from 0, so every mapping and the routing matter."""
    import transformers

    config = transformers.Glm4MoeConfig(**{**SIZES, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1) if p.dim() == 1 else p.normal_(0.0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("glm4_moe")
    return {name: make_glm4_moe(root / name, **overrides) for name, overrides in VARIANTS.items()}


def _hf_model(hf_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_megatron_logits_equal_transformers(models: dict[str, Path], tmp_path: Path, name: str) -> None:
    from nsr_megatron.convert import hf_to_mcore

    step = hf_to_mcore(models[name], tmp_path / "ckpt", progress=False)
    run_workers(_logits_worker, 1, str(step), str(tmp_path / "logits.pt"))
    got = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        ref = _hf_model(models[name]).eval()(TOKENS).logits  # [B, S, V]
    assert got.shape == ref.shape == (*TOKENS.shape, VOCAB)
    assert ref.abs().max() > 1.0  # the logits are not all near zero
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_partial_rotary_matters_in_the_test_models(models: dict[str, Path]) -> None:
    """Rotating every dimension (or none) of the heads changes the HF logits: the logits test pins the partial
    rotary (which dimensions turn, and how)."""
    import transformers

    hf = models["bias-qknorm"]
    model = _hf_model(hf).eval()
    with torch.no_grad():
        ref = model(TOKENS).logits
        for factor in (1.0, 1 / 3):  # all 12 dimensions; the first 4
            config = transformers.AutoConfig.from_pretrained(hf)
            config.rope_parameters["partial_rotary_factor"] = factor
            other = transformers.AutoModelForCausalLM.from_pretrained(hf, config=config, dtype=torch.float32,
                                                                      attn_implementation="eager").eval()
            assert (other(TOKENS).logits - ref).abs().max() > 1e-3, factor


def test_megatron_gradients_equal_transformers(models: dict[str, Path], tmp_path: Path) -> None:
    """One training forward and backward (cross-entropy on the next token) gives the transformers model's loss and
    the gradient of every weight; an optimizer step leaves the expert bias as loaded."""
    hf = models["bias-qknorm"]
    run_workers(_grads_worker, 1, str(hf), str(tmp_path / "grads.pt"))
    got = torch.load(tmp_path / "grads.pt")
    model = _hf_model(hf)
    logits = model(TOKENS).logits  # [B, S, V]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), TOKENS.roll(-1, dims=1).reshape(-1))
    loss.backward()
    assert got["loss"] == pytest.approx(float(loss.detach()), abs=1e-6) and got["bias_kept"]
    ref = hf_grads(model)
    buffers = {k for k in got["grads"] if k.endswith("e_score_correction_bias")}
    assert set(got["grads"]) - buffers == set(ref)
    assert any(k.endswith("self_attn.q_proj.bias") for k in ref) and any(k.endswith("k_norm.weight") for k in ref)
    for name, g in ref.items():
        torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_convert_round_trip_is_bit_exact_and_verify_passes(models: dict[str, Path], tmp_path: Path) -> None:
    hf = models["bias-qknorm"]
    r = _cli("hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "ckpt"), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = _cli("mcore-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"), "--no-progress")
    assert r.returncode == 0, r.stderr
    original, back = read_all(hf), read_all(tmp_path / "back")
    assert sorted(back) == sorted(original)
    assert any(k.endswith("e_score_correction_bias") for k in original)
    assert any(k.endswith("shared_experts.up_proj.weight") for k in original)
    for key, t in original.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
    r = _cli("verify", "--hf-dir", str(hf), "--ckpt", str(tmp_path / "ckpt"), "--tol", "1e-5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_planner_counts_the_hf_models_parameters(models: dict[str, Path], name: str) -> None:
    arch = arch_from_hf(read_hf_config(str(models[name])))
    assert isinstance(arch, Glm4MoeArch) and arch.moe_layers == (False, True, True) and arch.rotary_percent == 0.5
    hf = _hf_model(models[name])
    assert count_parameters(arch).total == hf.num_parameters() == sum(p.numel() for p in hf.parameters())


def _config(**overrides: Any) -> dict[str, Any]:
    return {"model_type": "glm4_moe", **{k: v for k, v in SIZES.items() if k != "rope_parameters"},
            "rope_theta": 10000.0, "partial_rotary_factor": 0.5, **overrides}


def test_config_defaults_follow_transformers() -> None:
    """Keys a published config.json may leave out take transformers' defaults for this family: half of each head
    rotated, one dense layer first, one shared expert, no biases or q/k norms; rope_parameters or top-level keys."""
    bare = {k: v for k, v in _config().items() if k not in ("partial_rotary_factor", "first_k_dense_replace",
                                                               "n_shared_experts", "attention_bias", "use_qk_norm")}
    arch = arch_from_hf(bare)
    assert isinstance(arch, Glm4MoeArch)
    assert (arch.rotary_percent, arch.moe_layers, arch.num_shared_experts) == (0.5, (False, True, True), 1)
    assert not arch.qkv_bias and not arch.qk_norm
    nested = arch_from_hf({**bare, "rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5,
                                                                           "partial_rotary_factor": 1.0}})
    assert isinstance(nested, Glm4MoeArch) and (nested.rope_theta, nested.rotary_percent) == (5e5, 1.0)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type='yarn' is not supported"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_type='linear' is not supported"),
    (dict(partial_rotary_factor=0.25), r"rotates 3 dimensions per head.*must be even"),
    (dict(rope_theta=10000.5), "rope_theta=10000.5 is not an integer"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(norm_topk_prob=False), "norm_topk_prob=false with num_experts_per_tok=4 is not supported"),
    (dict(num_experts_per_tok=1, n_group=1, topk_group=1), "norm_topk_prob=true with num_experts_per_tok=1"),
    (dict(topk_group=1), "num_experts_per_tok == 2 \\* topk_group"),
    (dict(n_shared_experts=0), "n_shared_experts=0"),
])
def test_unreproducible_configs_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        arch_from_hf(_config(**overrides))


def test_grouping_without_a_limit_is_accepted() -> None:
    """topk_group == n_group chooses every group: no grouping on either side, whatever top-k is."""
    from nsr_megatron.config import ModelConfig, ParallelConfig
    from nsr_megatron.models.hf_config import transformer_config

    arch = arch_from_hf(_config(n_group=2, topk_group=2, num_experts_per_tok=3))
    config = transformer_config(arch, ModelConfig(transformer_impl="local"), ParallelConfig())
    assert config.moe_router_num_groups is None and config.moe_router_score_function == "sigmoid"
    grouped = transformer_config(arch_from_hf(_config()), ModelConfig(transformer_impl="local"), ParallelConfig())
    assert (grouped.moe_router_num_groups, grouped.moe_router_group_topk) == (4, 2)
    assert grouped.add_qkv_bias and not grouped.add_bias_linear and grouped.qk_layernorm


def test_multi_token_prediction_layers_are_dropped_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"num_nextn_predict_layers=1: .* not trained here.*model\.layers\.3\.\* "
                                         r"and up.*set num_nextn_predict_layers: 0"):
        arch = arch_from_hf(_config(num_nextn_predict_layers=1))
    assert arch.num_layers == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arch_from_hf(_config())


def test_arch_record_is_json(models: dict[str, Path]) -> None:
    import dataclasses

    arch = arch_from_hf(read_hf_config(str(models["bias-qknorm"])))
    record = json.loads(json.dumps(dataclasses.asdict(arch)))
    assert record["rotary_percent"] == 0.5 and record["moe_groups"] == 4 and record["num_shared_experts"] == 2
    assert record["qkv_bias"] and record["qk_norm"] and record["routed_scaling_factor"] == 2.5


def test_group_limited_routing_changes_the_choice_in_the_test_models(models: dict[str, Path]) -> None:
    """The logits test exercises n_group / topk_group: for some tokens the best 4 experts over all groups differ
    from the best 4 within the top-2 groups (else the groups would go untested)."""
    model = _hf_model(models["bias-qknorm"]).eval()
    gate = model.model.layers[1].mlp.gate
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = gate.register_forward_hook(lambda mod, args, out: seen.append((args[0].reshape(-1, 40), out[2])))
    with torch.no_grad():
        model(TOKENS)
        handle.remove()
        x, chosen = seen[0]  # [T, H], [T, k]
        ungrouped = (torch.sigmoid(x @ gate.weight.T) + gate.e_score_correction_bias).topk(4, dim=-1).indices
    differ = [set(a.tolist()) != set(b.tolist()) for a, b in zip(chosen, ungrouped, strict=True)]
    assert any(differ) and not all(differ)


def test_a_checkpoint_holding_mtp_layers_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    """GLM-4.5 ships one MTP layer (``model.layers.{num_hidden_layers}.*``): its tensors are named, not dropped
    silently, until they are removed from the checkpoint."""
    import shutil

    from safetensors.torch import load_file, save_file

    from nsr_megatron.convert import hf_to_mcore
    from nsr_megatron.convert.mapping import ConvertError

    hf = shutil.copytree(models["plain"], tmp_path / "mtp")
    weights = load_file(hf / "model.safetensors")
    weights["model.layers.3.eh_proj.weight"] = torch.zeros(40, 80)
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    with pytest.warns(UserWarning, match="num_nextn_predict_layers=1"), \
            pytest.raises(ConvertError, match=r"unexpected tensor.*model\.layers\.3\.eh_proj\.weight"):
        hf_to_mcore(hf, tmp_path / "ckpt", progress=False)


@pytest.mark.parametrize(("sizes", "total", "active"), [
    (dict(hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=92,
          n_routed_experts=160, first_k_dense_replace=3, use_qk_norm=True, routed_scaling_factor=2.5), 352.8, 32.1),
    (dict(hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=46,
          n_routed_experts=128, first_k_dense_replace=1, use_qk_norm=False), 106.9, 12.2),
], ids=["GLM-4.5", "GLM-4.5-Air"])
def test_planner_counts_the_published_models(sizes: dict[str, Any], total: float, active: float) -> None:
    """The published configs (without their MTP layer, which is not built): GLM-4.5 is 355B parameters with it
    (about 3.9B) and 32B activated, GLM-4.5-Air 106B and 12B (arXiv:2508.06471; activated without the embedding
    and output layers)."""
    config = dict(model_type="glm4_moe", vocab_size=151552, num_attention_heads=96, num_key_value_heads=8,
                  head_dim=128, n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1,
                  norm_topk_prob=True, partial_rotary_factor=0.5, rope_theta=1000000, attention_bias=True,
                  tie_word_embeddings=False, num_nextn_predict_layers=0, max_position_embeddings=131072, **sizes)
    counts = count_parameters(arch_from_hf(config))
    embeddings = 2 * 151552 * sizes["hidden_size"]
    assert counts.total / 1e9 == pytest.approx(total, abs=0.05)
    assert (counts.active - embeddings) / 1e9 == pytest.approx(active, abs=0.05)
