"""The model-family registry: unknown types are named, every family round-trips a tiny checkpoint, and a new
family is one module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nsr_megatron.config import ConfigError
from nsr_megatron.convert.io import HFCheckpoint
from nsr_megatron.convert.mapping import canonical_to_hf_state, weight_rules
from nsr_megatron.convert.sharded import read_hf_canonical
from nsr_megatron.models import families
from nsr_megatron.models.families import family, registry
from nsr_megatron.models.hf_config import arch_from_hf
from nsr_megatron.models.memory import count_parameters
from nsr_megatron.models.tiny import create_tiny_hf_checkpoint

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
# Keys a family needs beyond TINY to be more than its dense special case.
EXTRA = {"qwen2": dict(tie_word_embeddings=True),
         "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
         "deepseek_v3": dict(num_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                             n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
                             kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                             num_nextn_predict_layers=0),
         "glm4_moe": dict(num_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                          n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, use_qk_norm=True,
                          attention_bias=True, num_nextn_predict_layers=0),
         "gpt_oss": dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, sliding_window=3, attention_bias=True)}


def test_the_built_in_families_are_registered() -> None:
    assert list(registry()) == ["deepseek_v3", "glm4_moe", "gpt_oss", "qwen2", "qwen3", "qwen3_moe"]
    assert all(registry()[t].model_type == t for t in registry())


def test_an_unknown_model_type_is_named_with_the_supported_ones() -> None:
    with pytest.raises(ConfigError, match=r"model_type='llama' is not supported; supported architectures: "
                                          r"deepseek_v3, glm4_moe, gpt_oss, qwen2, qwen3, qwen3_moe \(DeepSeek-V3, "
                                          r"GLM-4-MoE, gpt-oss, Qwen2 / Qwen2.5, Qwen3, Qwen3-MoE\)"):
        family("llama")
    with pytest.raises(ConfigError, match="model_type='' is not supported"):
        arch_from_hf({"hidden_size": 8})


@pytest.mark.parametrize("model_type", sorted(registry()))
def test_each_family_round_trips_a_tiny_checkpoint(model_type: str, tmp_path: Path) -> None:
    config = dict(TINY, model_type=model_type, architectures=[family(model_type).hf_class], **EXTRA.get(model_type, {}))
    hf_dir = create_tiny_hf_checkpoint(tmp_path / model_type, seed=1, **config)
    arch = arch_from_hf(config)
    assert arch.model_type == model_type and arch.is_moe == ("num_experts" in EXTRA.get(model_type, {}))
    ckpt = HFCheckpoint(hf_dir)
    try:
        original = {name: ckpt.read(name) for name in ckpt.tensors}
    finally:
        ckpt.close()
    back = canonical_to_hf_state(arch, read_hf_canonical(hf_dir, arch))  # HF -> megatron -> HF
    assert set(back) == set(original)
    assert all(torch.equal(back[n], original[n].float()) for n in original)
    # The planner's counts are the family's tensors, element for element.
    # (a router's expert bias, DeepSeek-V3's ``e_score_correction_bias``, is a buffer, not a parameter)
    hf_elements = sum(torch.Size(s).numel() for r in weight_rules(arch) for s in r.hf_shapes
                      if not r.key.endswith("router.expert_bias"))
    assert count_parameters(arch).total == hf_elements


NEW_FAMILY = '''
from nsr_megatron.models.families.qwen3 import Qwen3Family


class TinyTestFamily(Qwen3Family):
    model_type = "tiny_test"
    title = "Tiny-Test"


FAMILY = TinyTestFamily()
'''


@pytest.fixture
def extra_family_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder searched as part of the families package, and a registry read afresh around the test."""
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    registry.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    sys.modules.pop(f"{families.__name__}.tiny_test_family", None)
    registry.cache_clear()


def test_a_new_family_is_one_module(extra_family_dir: Path) -> None:
    (extra_family_dir / "tiny_test_family.py").write_text(NEW_FAMILY, encoding="utf-8")
    assert family("tiny_test").title == "Tiny-Test"
    arch = arch_from_hf(dict(TINY, model_type="tiny_test"))
    assert arch.model_type == "tiny_test" and arch.qk_norm
    qwen3 = arch_from_hf(dict(TINY, model_type="qwen3"))
    assert [r.key for r in weight_rules(arch)] == [r.key for r in weight_rules(qwen3)]
    assert count_parameters(arch).total > 0
    listed = r"supported architectures: deepseek_v3, glm4_moe, gpt_oss, qwen2, qwen3, qwen3_moe, tiny_test \(.*Tiny-Test\)"
    with pytest.raises(ConfigError, match=listed):
        family("llama")
