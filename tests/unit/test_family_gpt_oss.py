"""gpt-oss (:mod:`nsr_megatron.models.families.gpt_oss`) against ``transformers``' own model.

Tiny random ``GptOssForCausalLM`` models of odd sizes (hidden 40, 4 query heads of head_dim 12 in 2 kv groups,
6 experts top-2 of width 12, vocabulary 62), three layers sliding / full / sliding with a window of 3 (so the test
sequences of 9 tokens are longer than it), nonzero sinks, router and expert biases and a tight ``swiglu_limit``
(so the clamps act), fp32:

1. the converted megatron model (local spec, one gloo process) gives the transformers logits to 1e-5, with plain
   RoPE and with YaRN (factor 4 over 4 original positions, ``truncate`` either way), and the window matters;
2. one forward and backward gives the transformers loss and the gradient of every weight;
3. ``tools/convert.py`` HF -> megatron -> HF is bit-exact and its ``verify`` passes;
4. the planner's parameter count is the HF model's ``num_parameters()`` (sinks and biases included);
5. MXFP4 checkpoints (by config or by tensors) and configs the megatron model would not reproduce are refused with
   the reason and the fix.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from nsr_megatron.config import ConfigError, read_hf_config
from nsr_megatron.models.families.gpt_oss import GptOssArch
from nsr_megatron.models.hf_config import arch_from_hf
from nsr_megatron.models.memory import count_parameters
from tests.spawn import run_workers
from tests.unit.test_convert import read_all

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert.py"
VOCAB = 62
TOKENS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))  # [B, S]
SIZES: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=40, intermediate_size=12, head_dim=12, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, sliding_window=3,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, swiglu_limit=1.5, tie_word_embeddings=False,
    attention_bias=True,
)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 8.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 4, "truncate": False}


def make_gpt_oss(path: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A random tiny gpt-oss saved with ``save_pretrained`` (fp32 safetensors; ``overrides`` replace :data:`SIZES`,
    e.g. ``vocab_size`` for a tokenizer). Weights are drawn wider than the default initialisation, and norms,
    biases and sinks away from their defaults, so every mapping, the clamps and the routing matter."""
    import transformers

    config = transformers.GptOssConfig(**{**SIZES, **overrides})
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config)  # fp32
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0.5, 1.0)
            elif p.dim() == 1 or name.endswith("_bias"):
                p.add_(torch.randn_like(p) * 0.3)
            else:
                p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt_oss")
    return {"rope": make_gpt_oss(root / "rope"),
            "yarn": make_gpt_oss(root / "yarn", rope_parameters=YARN),
            "yarn-truncate": make_gpt_oss(root / "yarn-truncate", rope_parameters={**YARN, "truncate": True})}


def hf_model(hf_dir: Path, **overrides: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                **overrides).eval()


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
    assert logits is not None
    torch.save(logits[0], out)
    parallel.destroy()


@pytest.mark.parametrize("name", ["rope", "yarn", "yarn-truncate"])
def test_megatron_logits_equal_transformers(models: dict[str, Path], tmp_path: Path, name: str) -> None:
    from nsr_megatron.convert import hf_to_mcore

    step = hf_to_mcore(models[name], tmp_path / "ckpt", progress=False)
    run_workers(_logits_worker, 1, str(step), str(tmp_path / "logits.pt"))
    got = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        ref = hf_model(models[name])(TOKENS).logits  # [B, S, V]
        unwindowed = hf_model(models[name], layer_types=["full_attention"] * 3)(TOKENS).logits
    assert got.shape == ref.shape == (*TOKENS.shape, VOCAB)
    assert ref.abs().max() > 1.0  # the logits are not all near zero
    assert (unwindowed - ref).abs().max() > 1e-2  # the window changes the logits: it is tested
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_yarn_changes_the_logits(models: dict[str, Path]) -> None:
    """The YaRN models differ from plain RoPE (same weights) and from each other (``truncate``): the logits test
    checks the frequencies and the cos/sin factor, not a no-op."""
    with torch.no_grad():
        rope, yarn, trunc = (hf_model(models[n])(TOKENS).logits for n in ("rope", "yarn", "yarn-truncate"))
    assert (rope - yarn).abs().max() > 1e-2 and (yarn - trunc).abs().max() > 1e-3


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
    grads = canonical_to_hf_state(arch, canonical_state(policy.module, grads=True))
    torch.save({"loss": float(losses[0]["loss"]), "grads": grads}, out)
    parallel.destroy()


def hf_loss_and_grads(hf_dir: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The transformers model's logits [B, S, V], next-token cross-entropy and the gradient of every weight (its
    names are the checkpoint's: the experts are fused in both)."""
    model = hf_model(hf_dir)
    logits = model(tokens).logits  # [B, S, V]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.roll(-1, dims=1).reshape(-1))
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_megatron_gradients_equal_transformers(models: dict[str, Path], tmp_path: Path) -> None:
    """One training forward and backward (cross-entropy on the next token) gives the transformers model's loss and
    the gradient of every weight, the sinks and every bias included."""
    hf = models["yarn"]
    run_workers(_grads_worker, 1, str(hf), str(tmp_path / "grads.pt"))
    got = torch.load(tmp_path / "grads.pt")
    _, loss, ref = hf_loss_and_grads(hf, TOKENS)
    assert got["loss"] == pytest.approx(float(loss), abs=1e-6)
    assert set(got["grads"]) == set(ref)
    assert all(ref[n].abs().max() > 0 for n in ref if n.endswith(("sinks", "_bias")))
    off = {n: float((got["grads"][n] - g).abs().max()) for n, g in ref.items()
           if not torch.allclose(got["grads"][n], g, atol=1e-5, rtol=1e-4)}
    assert off == {}, off  # name -> largest absolute difference


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_convert_round_trip_is_bit_exact_and_verify_passes(models: dict[str, Path], tmp_path: Path) -> None:
    hf = models["yarn"]
    r = _cli("hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "ckpt"), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = _cli("mcore-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"), "--no-progress")
    assert r.returncode == 0, r.stderr
    original, back = read_all(hf), read_all(tmp_path / "back")
    assert sorted(back) == sorted(original)
    assert original["model.layers.0.mlp.experts.gate_up_proj"].shape == (6, 40, 24)  # [E, H, 2I], fused
    for key, t in original.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
    # verify's default 16+ tokens through wide random weights (|logit| ~7): fp32 rounding reaches ~1.3e-5
    r = _cli("verify", "--hf-dir", str(hf), "--ckpt", str(tmp_path / "ckpt"), "--tol", "3e-5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout


def test_fused_experts_map_to_megatrons_gate_up_layout(models: dict[str, Path]) -> None:
    """Expert e's megatron ``linear_fc1`` rows are ``[gate; up]`` of ``x @ W``'s interleaved columns, transposed."""
    from nsr_megatron.convert.sharded import read_hf_canonical

    arch = arch_from_hf(read_hf_config(str(models["rope"])))
    canonical = read_hf_canonical(models["rope"], arch)
    hf = read_all(models["rope"])
    gate_up, bias = hf["model.layers.1.mlp.experts.gate_up_proj"], hf["model.layers.1.mlp.experts.gate_up_proj_bias"]
    fc1 = canonical["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"]  # [E, 2I, H]
    assert torch.equal(fc1[3, :12], gate_up[3, :, 0::2].T) and torch.equal(fc1[3, 12:], gate_up[3, :, 1::2].T)
    fc1_bias = canonical["decoder.layers.1.mlp.experts.experts.linear_fc1.bias"]  # [E, 2I]
    assert torch.equal(fc1_bias[2], torch.cat([bias[2, 0::2], bias[2, 1::2]]))
    fc2 = canonical["decoder.layers.1.mlp.experts.experts.linear_fc2.weight"]  # [E, H, I]
    assert torch.equal(fc2[4], hf["model.layers.1.mlp.experts.down_proj"][4].T)


def test_planner_counts_the_hf_models_parameters(models: dict[str, Path]) -> None:
    arch = arch_from_hf(read_hf_config(str(models["yarn"])))
    assert isinstance(arch, GptOssArch) and arch.sliding_layers == (True, False, True) and arch.yarn_factor == 4.0
    hf = hf_model(models["yarn"])
    assert count_parameters(arch).total == hf.num_parameters() == sum(p.numel() for p in hf.parameters())


def test_planner_counts_gpt_oss_20b() -> None:
    """The published gpt-oss-20b config (``examples/recipes/models/gpt-oss-20b``): 20.91B parameters, 3.61B active
    besides the embedding (OpenAI's model card: 20.91B total, 3.61B active)."""
    config = json.loads((REPO / "examples/recipes/models/gpt-oss-20b/config.json").read_text())
    arch = arch_from_hf(config)
    assert isinstance(arch, GptOssArch) and arch.yarn_factor == 32.0 and not arch.yarn_truncate
    assert arch.sliding_window == 128 and arch.sliding_layers[:2] == (True, False)
    counts = count_parameters(arch)
    assert 20.90e9 < counts.total < 20.92e9 and 3.60e9 < counts.active - counts.embedding < 3.62e9


def _config(**overrides: Any) -> dict[str, Any]:
    return {"model_type": "gpt_oss", **SIZES, **overrides}


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(quantization_config={"quant_method": "mxfp4"}),
     r"quant_method='mxfp4'.*Mxfp4Config\(dequantize=True\).*'-BF16'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_type='linear' is not supported"),
    (dict(rope_parameters={**YARN, "attention_factor": 1.3}), "YaRN with .*attention_factor"),
    (dict(attention_bias=False), "attention_bias=false is not supported"),
    (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]),
     "layer_types=.*unknown: \\['chunked_attention'\\]"),
    (dict(layer_types=["full_attention"]), "expected num_hidden_layers=3 entries"),
    (dict(sliding_window=None), "sliding_window=None with sliding_attention layers"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 is not supported"),
])
def test_unreproducible_configs_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        arch_from_hf(_config(**overrides))


def test_mxfp4_folders_are_refused_by_config_and_by_tensors(models: dict[str, Path], tmp_path: Path) -> None:
    """An MXFP4 folder is refused from its config (``quantization_config``); a folder whose config lost that entry
    is refused by the converter when it sees the ``*_blocks`` / ``*_scales`` tensors."""
    import shutil

    from safetensors.torch import save_file

    from nsr_megatron.convert import hf_to_mcore
    from nsr_megatron.convert.mapping import ConvertError

    quantized = tmp_path / "mxfp4"
    shutil.copytree(models["rope"], quantized)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "mxfp4"}}))
    with pytest.raises(ConfigError, match="quantized.*dequantize"):
        hf_to_mcore(quantized, tmp_path / "a", progress=False)
    (quantized / "config.json").write_text(json.dumps(config))
    tensors = read_all(quantized)
    for i in range(3):
        w = tensors.pop(f"model.layers.{i}.mlp.experts.gate_up_proj")
        tensors[f"model.layers.{i}.mlp.experts.gate_up_proj_blocks"] = torch.zeros(6, 24, 2, 16, dtype=torch.uint8)
        tensors[f"model.layers.{i}.mlp.experts.gate_up_proj_scales"] = torch.zeros(6, 24, 2, dtype=torch.uint8)
        del w
    for f in quantized.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(quantized / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"quantized tensors .*gate_up_proj_blocks.*Mxfp4Config\(dequantize=True\)"):
        hf_to_mcore(quantized, tmp_path / "b", progress=False)
