"""DeepSeek-V3 (:mod:`nsr_megatron.models.families.deepseek_v3`) against ``transformers``' own model.

Tiny random ``DeepseekV3ForCausalLM`` models of odd sizes (hidden 40, 4 heads, latent ranks 16 / 20, Dn 14, Dr 6,
Dv 10, vocabulary 62), with and without a query latent, one dense layer before two MoE layers (8 experts in 4 groups,
top-2 groups, top-4 experts, 2 shared experts, routed_scaling_factor 2.5, a random expert bias), fp32:

1. the converted megatron model (local spec, one gloo process) gives the transformers logits to 1e-5;
2. ``tools/convert.py`` HF -> megatron -> HF is bit-exact and its ``verify`` passes;
3. the planner's parameter count is the HF model's ``num_parameters()``;
4. configs the megatron model would not reproduce are refused with the reason and the fix.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from nsr_megatron.config import ConfigError, read_hf_config
from nsr_megatron.models.families.deepseek_v3 import DeepseekV3Arch
from nsr_megatron.models.hf_config import arch_from_hf
from nsr_megatron.models.memory import count_parameters
from tests.spawn import run_workers
from tests.unit.test_convert import read_all

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert.py"
VOCAB = 62
TOKENS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))  # [B, S]
SIZES: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=40, intermediate_size=56, moe_intermediate_size=12, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=20, qk_rope_head_dim=6, qk_nope_head_dim=14,
    v_head_dim=10, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=4, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, num_nextn_predict_layers=0,
    tie_word_embeddings=False,
)


def make_deepseek_v3(path: Path, *, q_lora_rank: int | None, seed: int = 0, **overrides: Any) -> Path:
    """A random tiny DeepSeek-V3 saved with ``save_pretrained`` (fp32). Weights are drawn wider than the default
    initialisation, norms away from 1 and the expert bias away from 0, so every mapping and the routing matter."""
    import transformers

    config = transformers.DeepseekV3Config(q_lora_rank=q_lora_rank, **{**SIZES, **overrides})
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
    root = tmp_path_factory.mktemp("deepseek_v3")
    return {"q-lora": make_deepseek_v3(root / "q-lora", q_lora_rank=16),
            "no-q-lora": make_deepseek_v3(root / "no-q-lora", q_lora_rank=None)}


def _hf_logits(hf_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(TOKENS).logits  # [B, S, V]


def _logits_worker(rank: int, world: int, init: str, ckpt: str, out: str) -> None:
    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, ParallelConfig
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.trainer import actor
    from nsr_megatron.trainer.checkpoint import load_checkpoint

    par = ParallelConfig()
    arch = arch_from_hf(read_hf_config(str(Path(ckpt) / "hf_config")))
    parallel.initialize(par, seed=1, rank=rank, world_size=world, init_method=init)
    bundle = build_model(arch, model=ModelConfig(transformer_impl="local"), parallel=par, role="reference")
    load_checkpoint(ckpt, bundle.module)
    logits = actor.forward_logits(bundle, [{"tokens": TOKENS}])
    torch.save(logits[0], out)
    parallel.destroy()


@pytest.mark.parametrize("name", ["q-lora", "no-q-lora"])
def test_megatron_logits_equal_transformers(models: dict[str, Path], tmp_path: Path, name: str) -> None:
    from nsr_megatron.convert import hf_to_mcore

    step = hf_to_mcore(models[name], tmp_path / "ckpt", progress=False)
    run_workers(_logits_worker, 1, str(step), str(tmp_path / "logits.pt"))
    got, ref = torch.load(tmp_path / "logits.pt"), _hf_logits(models[name])
    assert got.shape == ref.shape == (*TOKENS.shape, VOCAB)
    assert ref.abs().max() > 1.0  # the logits are not all near zero
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_convert_round_trip_is_bit_exact_and_verify_passes(models: dict[str, Path], tmp_path: Path) -> None:
    hf = models["q-lora"]
    r = _cli("hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "ckpt"), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = _cli("mcore-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"), "--no-progress")
    assert r.returncode == 0, r.stderr
    original, back = read_all(hf), read_all(tmp_path / "back")
    assert sorted(back) == sorted(original)
    assert any(k.endswith("e_score_correction_bias") for k in original)
    for key, t in original.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
    r = _cli("verify", "--hf-dir", str(hf), "--ckpt", str(tmp_path / "ckpt"), "--tol", "1e-5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout


@pytest.mark.parametrize("name", ["q-lora", "no-q-lora"])
def test_planner_counts_the_hf_models_parameters(models: dict[str, Path], name: str) -> None:
    from transformers import AutoModelForCausalLM

    arch = arch_from_hf(read_hf_config(str(models[name])))
    assert isinstance(arch, DeepseekV3Arch) and arch.moe_layers == (False, True, True)
    hf = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32)
    assert count_parameters(arch).total == hf.num_parameters() == sum(p.numel() for p in hf.parameters())


def _config(**overrides: Any) -> dict[str, Any]:
    return {"model_type": "deepseek_v3", "num_attention_heads": 4, "hidden_size": 40, "num_hidden_layers": 3,
            "vocab_size": VOCAB, "q_lora_rank": None, **{k: v for k, v in SIZES.items() if k not in
                                                          ("rope_parameters",)}, **overrides}


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(rope_interleave=False), "rope_interleave=false is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 40}), "rope_type='yarn' is not supported yet"),
    (dict(norm_topk_prob=False), "norm_topk_prob=false with num_experts_per_tok=4 is not supported"),
    (dict(topk_group=1), "num_experts_per_tok == 2 \\* topk_group"),
    (dict(num_experts_per_tok=1, n_group=1, topk_group=1), "norm_topk_prob=true with num_experts_per_tok=1"),
    (dict(attention_bias=True), "attention_bias=true"),
])
def test_unreproducible_configs_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        arch_from_hf(_config(**overrides))


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

    arch = arch_from_hf(read_hf_config(str(models["q-lora"])))
    record = json.loads(json.dumps(dataclasses.asdict(arch)))
    assert record["q_lora_rank"] == 16 and record["moe_groups"] == 4 and record["routed_scaling_factor"] == 2.5


def test_group_limited_routing_changes_the_choice_in_the_test_models(models: dict[str, Path]) -> None:
    """The logits test exercises n_group / topk_group: for some tokens the best 4 experts over all groups differ
    from the best 4 within the top-2 groups (else the groups would go untested)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["q-lora"], dtype=torch.float32).eval()
    gate = model.model.layers[1].mlp.gate
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = gate.register_forward_hook(lambda mod, args, out: seen.append((args[0].reshape(-1, 40), out[2])))
    with torch.no_grad():
        model(TOKENS)
    handle.remove()
    x, chosen = seen[0]  # [T, H], [T, k]
    with torch.no_grad():
        biased = torch.sigmoid(x @ gate.weight.T) + gate.e_score_correction_bias  # [T, E]
    ungrouped = biased.topk(4, dim=-1).indices
    differ = [set(a.tolist()) != set(b.tolist()) for a, b in zip(chosen, ungrouped, strict=True)]
    assert any(differ) and not all(differ)


def _ce_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    loss = vocab_parallel_cross_entropy(logits.float(), batch["targets"]).mean()  # [B, S] -> mean
    return loss, {"loss": loss.detach()}


def _grads_worker(rank: int, world: int, init: str, hf_dir: str, out: str) -> None:
    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig
    from nsr_megatron.convert.mapping import canonical_to_hf_state
    from nsr_megatron.convert.sharded import load_hf_sharded
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.models.state import canonical_state
    from nsr_megatron.trainer import actor

    par = ParallelConfig()
    arch = arch_from_hf(read_hf_config(hf_dir))
    parallel.initialize(par, seed=1, rank=rank, world_size=world, init_method=init)
    policy = build_model(arch, model=ModelConfig(hf_path=hf_dir, transformer_impl="local"), parallel=par,
                         optimizer=OptimizerConfig(lr=1e-3))
    load_hf_sharded(policy.module, arch, hf_dir)
    micro = [{"tokens": TOKENS, "targets": TOKENS.roll(-1, dims=1)}]
    actor.zero_grads(policy)
    losses = actor.forward_backward(policy, micro, _ce_loss)
    canonical_grads = canonical_state(policy.module, grads=True)
    weights = canonical_state(policy.module)
    for key in weights:  # buffers (the expert bias) have no gradient
        canonical_grads.setdefault(key, torch.zeros_like(weights[key]))
    grads = canonical_to_hf_state(arch, canonical_grads)
    bias = {k: v.clone() for k, v in policy.gpt.state_dict().items() if k.endswith("expert_bias")}
    actor.optimizer_step(policy)
    bias_after = {k: v for k, v in policy.gpt.state_dict().items() if k.endswith("expert_bias")}
    torch.save({"loss": float(losses[0]["loss"]), "grads": grads,
                "bias_kept": all(torch.equal(bias[k], bias_after[k]) for k in bias) and len(bias) == 2}, out)
    parallel.destroy()


def hf_grads(model: Any) -> dict[str, torch.Tensor]:
    """The gradients of a transformers model under its checkpoint names (the fused experts split per expert)."""
    ref: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            half = p.shape[1] // 2
            for e in range(p.shape[0]):
                ref[f"{name[:-len('gate_up_proj')]}{e}.gate_proj.weight"] = p.grad[e, :half]
                ref[f"{name[:-len('gate_up_proj')]}{e}.up_proj.weight"] = p.grad[e, half:]
        elif name.endswith("experts.down_proj"):
            for e in range(p.shape[0]):
                ref[f"{name[:-len('down_proj')]}{e}.down_proj.weight"] = p.grad[e]
        else:
            ref[name] = p.grad
    return ref


def test_megatron_gradients_equal_transformers(models: dict[str, Path], tmp_path: Path) -> None:
    """One training forward and backward (cross-entropy on the next token) gives the transformers model's loss and
    the gradient of every weight; an optimizer step leaves the expert bias as loaded (no bias update here)."""
    from transformers import AutoModelForCausalLM

    hf = models["q-lora"]
    run_workers(_grads_worker, 1, str(hf), str(tmp_path / "grads.pt"))
    got = torch.load(tmp_path / "grads.pt")
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager")
    logits = model(TOKENS).logits  # [B, S, V]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), TOKENS.roll(-1, dims=1).reshape(-1))
    loss.backward()
    assert got["loss"] == pytest.approx(float(loss.detach()), abs=1e-6) and got["bias_kept"]
    ref = hf_grads(model)
    buffers = {k for k in got["grads"] if k.endswith("e_score_correction_bias")}
    assert set(got["grads"]) - buffers == set(ref)
    for name, g in ref.items():
        torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_planner_counts_deepseek_v3_671b_with_37b_active() -> None:
    """DeepSeek-V3's published config (less its YaRN rope_scaling, which changes no count, and its MTP layer, which
    is not built): 671B parameters, 37B activated per token (arXiv:2412.19437)."""
    config = dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
        first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=163840, rope_theta=10000,
        num_nextn_predict_layers=0, tie_word_embeddings=False)
    counts = count_parameters(arch_from_hf(config))
    assert 670.5e9 < counts.total < 671.5e9 and 37e9 < counts.active < 38e9
