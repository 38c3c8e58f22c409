"""HF <-> Megatron checkpoint conversion without building megatron models.

Tiny random HF models (Qwen2 tied / untied, Qwen3 with head_dim != hidden/heads, Qwen3-MoE with and
without a dense layer) go HF -> dist checkpoint -> HF and must come back bit for bit, loadable by
``transformers``. Broken inputs fail with messages that name the tensor, both shapes, or the file.
The logits of the converted megatron models under TP / PP / EP are in
``tests/distributed/test_convert_layouts.py``.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nsr_megatron.config import ConfigError
from nsr_megatron.convert import ConvertError, hf_to_mcore, mcore_to_hf, weight_rules
from nsr_megatron.convert.mapping import Piece, canonical_to_hf, hf_to_canonical, piece_from_hf, piece_to_hf
from nsr_megatron.models.hf_config import arch_from_hf

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert.py"

# Sizes divide by 2 everywhere (heads, kv heads, vocab, layers, experts) so every layout of the
# distributed test fits; head_dim 16 != hidden 32 / heads 4 exercises the qkv grouping.
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2-tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2-untied": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=False)),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            moe_intermediate_size=16,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3-moe-mixed": (
        "Qwen3MoeConfig",
        dict(
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            moe_intermediate_size=16,
            mlp_only_layers=[1],
            tie_word_embeddings=False,
        ),
    ),
}


def make_tiny_hf(path: Path, name: str, seed: int = 0, *, shard: str = "24KB") -> Path:
    """A random tiny HF model saved in fp32 with ``save_pretrained`` (several shards + index)."""
    import transformers

    cls_name, extra = TINY[name]
    config = getattr(transformers, cls_name)(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4 if "mixed" in name else 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        max_position_embeddings=128,
        **extra,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 and biases at 0: randomise them so the mapping is tested
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, max_shard_size=shard)
    return path


def read_all(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                out[k] = st.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: make_tiny_hf(root / name, name) for name in TINY}


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TINY))
def test_hf_to_mcore_to_hf_is_bit_exact(models: dict[str, Path], tmp_path: Path, name: str) -> None:
    from transformers import AutoModelForCausalLM

    hf = models[name]
    step = hf_to_mcore(hf, tmp_path / "ckpt", progress=False)
    assert step == tmp_path / "ckpt" / "step_00000000"
    assert (step / "nsr_meta.json").is_file() and (step / "hf_config" / "config.json").is_file()
    out = mcore_to_hf(step, tmp_path / "back", max_shard_bytes=20_000, progress=False)

    original, back = read_all(hf), read_all(out)
    assert sorted(back) == sorted(original)
    for key, t in original.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(original)
    assert len(set(index["weight_map"].values())) > 1  # several output shards
    for side_file in ("config.json", "generation_config.json"):
        assert (out / side_file).is_file()

    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(ref(tokens).logits, got(tokens).logits)


def test_checkpoint_keys_follow_megatron(models: dict[str, Path], tmp_path: Path) -> None:
    """Dense layers stacked on a layer axis, MoE layers keyed one by one, one chunk per expert."""
    dense = hf_to_mcore(models["qwen3"], tmp_path / "dense", progress=False)
    moe = hf_to_mcore(models["qwen3-moe"], tmp_path / "moe", progress=False)
    meta_dense = pickle.loads((dense / ".metadata").read_bytes()).state_dict_metadata
    meta_moe = pickle.loads((moe / ".metadata").read_bytes()).state_dict_metadata
    assert tuple(meta_dense["decoder.layers.self_attention.linear_qkv.weight"].size) == (
        2,
        (4 + 2 * 2) * 16,
        32,
    )
    assert len(meta_dense["decoder.layers.mlp.linear_fc1.weight"].chunks) == 2  # one per layer
    assert "output_layer.weight" in meta_dense
    fc1 = meta_moe["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"]
    assert tuple(fc1.size) == (4, 32, 32) and len(fc1.chunks) == 4
    assert "decoder.layers.0.self_attention.linear_qkv._extra_state/shard_0_1" in meta_moe
    tied = hf_to_mcore(models["qwen2-tied"], tmp_path / "tied", progress=False)
    assert "output_layer.weight" not in pickle.loads((tied / ".metadata").read_bytes()).state_dict_metadata
    info = json.loads((moe / "nsr_meta.json").read_text())
    assert info["step"] == 0 and info["has_optimizer"] is False


def test_qkv_grouping_matches_megatron_order() -> None:
    """Rows per query group g: its N/G query heads, then k_g, then v_g (head_dim 16 != 32 / 4)."""
    arch = arch_from_hf(
        {
            "model_type": "qwen3",
            "vocab_size": 8,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 8,
        }
    )
    rule = next(r for r in weight_rules(arch, stacked_layers=False) if r.key.endswith("linear_qkv.weight"))
    D, H = 16, 32
    q = torch.arange(4)[:, None, None].expand(4, D, H).reshape(4 * D, H).float()  # head index
    k = 10 + torch.arange(2)[:, None, None].expand(2, D, H).reshape(2 * D, H).float()
    v = 20 + torch.arange(2)[:, None, None].expand(2, D, H).reshape(2 * D, H).float()
    qkv = hf_to_canonical(rule, dict(zip(rule.hf_names, (q, k, v), strict=True)))
    assert qkv.shape == (8 * D, H)
    assert qkv[::D, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    back = canonical_to_hf(rule, qkv)
    assert all(torch.equal(back[n], t) for n, t in zip(rule.hf_names, (q, k, v), strict=True))


def test_expert_pieces_stack_gate_and_up() -> None:
    arch = arch_from_hf(
        {
            "model_type": "qwen3_moe",
            "vocab_size": 8,
            "hidden_size": 4,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 2,
            "moe_intermediate_size": 3,
            "num_experts": 2,
            "num_experts_per_tok": 1,
        }
    )
    rule = next(r for r in weight_rules(arch) if r.key.endswith("experts.linear_fc1.weight"))
    assert [p.offset for p in rule.pieces] == [(0, 0, 0), (1, 0, 0)]
    gate, up = torch.randn(3, 4), torch.randn(3, 4)
    piece: Piece = rule.pieces[1]
    block = piece_from_hf(rule, piece, [gate, up])
    assert block.shape == (1, 6, 4) and torch.equal(block[0, :3], gate) and torch.equal(block[0, 3:], up)
    g2, u2 = piece_to_hf(rule, piece, block)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_dtype_options(models: dict[str, Path], tmp_path: Path) -> None:
    hf = models["qwen3"]
    step = hf_to_mcore(hf, tmp_path / "ckpt", dtype=torch.bfloat16, progress=False)
    meta = pickle.loads((step / ".metadata").read_bytes()).state_dict_metadata
    assert meta["embedding.word_embeddings.weight"].properties.dtype == torch.bfloat16
    original = read_all(hf)
    auto = read_all(mcore_to_hf(step, tmp_path / "auto", progress=False))  # config.json says float32
    for key, t in original.items():
        assert auto[key].dtype == torch.float32 and torch.equal(auto[key], t.to(torch.bfloat16).float()), key
    bf16_dir = mcore_to_hf(step, tmp_path / "bf16", dtype=torch.bfloat16, progress=False)
    assert json.loads((bf16_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in read_all(bf16_dir).values())


def test_refuses_to_overwrite_without_force(models: dict[str, Path], tmp_path: Path) -> None:
    hf_to_mcore(models["qwen2-tied"], tmp_path / "ckpt", progress=False)
    with pytest.raises(ConvertError, match="already exists; pass --force"):
        hf_to_mcore(models["qwen2-tied"], tmp_path / "ckpt", progress=False)
    hf_to_mcore(models["qwen2-tied"], tmp_path / "ckpt", progress=False, overwrite=True)


# ------------------------------------------------------------------------------------------------
# broken inputs
# ------------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shard_of(hf: Path, tensor: str) -> Path:
    return hf / json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def test_missing_shard_file_is_named(models: dict[str, Path], tmp_path: Path) -> None:
    hf = _copy(models["qwen3"], tmp_path / "hf")
    shard = _shard_of(hf, "model.layers.1.mlp.down_proj.weight")
    shard.unlink()
    with pytest.raises(ConvertError, match=f"shard file {shard.name} listed in .* is missing"):
        hf_to_mcore(hf, tmp_path / "ckpt", progress=False)


def _rewrite_shard(hf: Path, tensor: str, new_name: str, new_value: torch.Tensor | None = None) -> None:
    shard = _shard_of(hf, tensor)
    tensors = {k: v for k, v in read_all_file(shard).items()}
    value = tensors.pop(tensor)
    tensors[new_name] = value if new_value is None else new_value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path = hf / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][new_name] = index["weight_map"].pop(tensor)
    index_path.write_text(json.dumps(index))


def read_all_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as st:
        return {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118


def test_renamed_tensor_is_named_as_missing_and_unexpected(models: dict[str, Path], tmp_path: Path) -> None:
    hf = _copy(models["qwen3-moe"], tmp_path / "hf")
    _rewrite_shard(
        hf, "model.layers.1.mlp.experts.2.up_proj.weight", "model.layers.1.mlp.experts.2.upp_proj.weight"
    )
    with pytest.raises(ConvertError) as err:
        hf_to_mcore(hf, tmp_path / "ckpt", progress=False)
    msg = str(err.value)
    assert "missing tensor(s): model.layers.1.mlp.experts.2.up_proj.weight (expected shape [16, 32])" in msg
    assert (
        "unexpected tensor(s)" in msg
        and "model.layers.1.mlp.experts.2.upp_proj.weight (shape [16, 32])" in msg
    )


def test_wrong_shape_names_tensor_and_both_shapes(models: dict[str, Path], tmp_path: Path) -> None:
    hf = _copy(models["qwen2-untied"], tmp_path / "hf")
    name = "model.layers.0.self_attn.k_proj.bias"
    _rewrite_shard(hf, name, name, torch.zeros(8))
    with pytest.raises(
        ConvertError,
        match=r"model\.layers\.0\.self_attn\.k_proj\.bias: checkpoint shape \[8\] but "
        r"config\.json implies \[16\]",
    ):
        hf_to_mcore(hf, tmp_path / "ckpt", progress=False)


def test_unsupported_model_type_names_supported_ones(models: dict[str, Path], tmp_path: Path) -> None:
    hf = _copy(models["qwen3"], tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(
        ConfigError,
        match="model_type='llama' is not supported; supported architectures: deepseek_v3, glm4_moe, gpt_oss, qwen2, qwen3, qwen3_moe",
    ):
        hf_to_mcore(hf, tmp_path / "ckpt", progress=False)


def test_checkpoint_against_the_wrong_config_names_both_shapes(
    models: dict[str, Path], tmp_path: Path
) -> None:
    step = hf_to_mcore(models["qwen3"], tmp_path / "ckpt", progress=False)
    other = _copy(models["qwen3"], tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(
        ConvertError,
        match=r"decoder\.layers\.mlp\.linear_fc1\.weight: checkpoint shape \[2, 96, 32\] "
        r"but the HF config implies \[2, 80, 32\]",
    ):
        mcore_to_hf(step, tmp_path / "out", hf_config=other, progress=False)


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_cli_round_trip_from_checkpoint_root(models: dict[str, Path], tmp_path: Path) -> None:
    hf = models["qwen3-moe"]
    r = _cli("hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "ckpt"), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = _cli(
        "mcore-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"), "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    assert "step_00000000" in r.stdout
    original, back = read_all(hf), read_all(tmp_path / "back")
    assert sorted(back) == sorted(original) and all(torch.equal(back[k], v) for k, v in original.items())
    r = _cli(
        "mcore-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"), "--no-progress"
    )
    assert r.returncode == 2 and "already holds weights; pass --force" in r.stderr


def test_cli_errors_are_one_line_without_traceback(models: dict[str, Path], tmp_path: Path) -> None:
    hf = _copy(models["qwen2-tied"], tmp_path / "hf")
    shard = _shard_of(hf, "model.norm.weight")
    shard.unlink()
    r = _cli("hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "ckpt"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"convert.py hf-to-mcore: error: shard file {shard.name}" in r.stderr
    r = _cli("mcore-to-hf", "--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["qwen2-tied", "qwen3-moe-mixed"])
def test_in_memory_state_dict_helpers_round_trip(models: dict[str, Path], name: str) -> None:
    from nsr_megatron.config import read_hf_config
    from nsr_megatron.convert import canonical_to_hf_state, hf_state_to_canonical

    arch = arch_from_hf(read_hf_config(models[name]))
    hf = read_all(models[name])
    canonical = hf_state_to_canonical(arch, hf)
    assert ("decoder.layers.mlp.linear_fc1.weight" in canonical) is (
        name == "qwen2-tied"
    )  # stacked when dense
    back = canonical_to_hf_state(arch, canonical)
    assert sorted(back) == sorted(hf) and all(torch.equal(back[k], v) for k, v in hf.items())


def test_te_moe_norm_alias_and_tied_lm_head_are_accepted(models: dict[str, Path]) -> None:
    """A Transformer Engine MoE layer stores its pre-MLP norm as ``pre_mlp_layernorm.weight``; a tied
    HF checkpoint may still carry ``lm_head.weight`` (ignored)."""
    from nsr_megatron.config import read_hf_config
    from nsr_megatron.convert import canonical_to_hf_state, hf_state_to_canonical

    arch = arch_from_hf(read_hf_config(models["qwen3-moe"]))
    hf = read_all(models["qwen3-moe"])
    canonical = hf_state_to_canonical(arch, hf)
    canonical["decoder.layers.1.pre_mlp_layernorm.weight"] = canonical.pop(
        "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"
    )
    back = canonical_to_hf_state(arch, canonical)
    assert torch.equal(
        back["model.layers.1.post_attention_layernorm.weight"],
        hf["model.layers.1.post_attention_layernorm.weight"],
    )

    tied = arch_from_hf(read_hf_config(models["qwen2-tied"]))
    hf_tied = read_all(models["qwen2-tied"])
    with_head = {**hf_tied, "lm_head.weight": hf_tied["model.embed_tokens.weight"]}
    assert "output_layer.weight" not in hf_state_to_canonical(tied, with_head)


@pytest.mark.parametrize("name", ["qwen2-tied", "qwen3-moe-mixed"])
def test_writing_blocks_into_hf_tensors_inverts_the_mapping(models: dict[str, Path], name: str) -> None:
    """Every canonical tensor, cut into blocks that straddle qkv groups, the gate/up halves and columns (as
    shards of any layout may), written block by block into HF tensors (the shared-memory weight sync): the result
    is exactly canonical_to_hf of the whole tensor."""
    import itertools

    from nsr_megatron.config import read_hf_config
    from nsr_megatron.convert import hf_state_to_canonical
    from nsr_megatron.convert.sharded import write_canonical_block

    arch = arch_from_hf(read_hf_config(models[name]))
    canonical = hf_state_to_canonical(arch, read_all(models[name]))
    for rule in weight_rules(arch):
        full = canonical[rule.key]
        want = canonical_to_hf(rule, full)
        views = {n: torch.zeros_like(t) for n, t in want.items()}
        cuts = [[0, max(1, n * 2 // 5), n] if n > 1 else [0, n] for n in full.shape]
        spans = [list(itertools.pairwise(c)) for c in cuts]
        for block_spans in itertools.product(*spans):
            index = tuple(slice(a, b) for a, b in block_spans)
            write_canonical_block(rule, views, tuple(a for a, _ in block_spans), full[index])
        for n, t in want.items():
            assert torch.equal(views[n], t), f"{rule.key} -> {n}"
    with pytest.raises(ConvertError, match="lack"):
        rule = weight_rules(arch)[0]
        write_canonical_block(rule, {}, (0,) * len(rule.shape), canonical[rule.key])
