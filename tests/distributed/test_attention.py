"""The local layer spec's core attention (torch SDPA) computes what megatron-core's ``DotProductAttention``
computes: outputs and the gradients of q, k and v, with grouped-query heads, a causal mask, an explicit
boolean mask, and in bf16; where SDPA does not apply (attention dropout while training, a softmax offset) it
takes megatron's own path, bit for bit."""

from __future__ import annotations

from typing import Any

import torch

from tests.distributed._gloo import run


def _attention(heads: int, groups: int, **overrides: Any) -> tuple[Any, Any]:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nsr_megatron.models.attention import SDPAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=heads * 16, num_attention_heads=heads,
                            num_query_groups=groups, kv_channels=16, **{"attention_dropout": 0.0, **overrides})
    kw = {"layer_number": 1, "attn_mask_type": AttnMaskType.causal, "attention_type": "self"}
    return SDPAttention(cfg, **kw), DotProductAttention(cfg, **kw)


def _run(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         weight: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = module(*leaves, mask)  # [sq, b, hp]
    (out.float() * weight).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]  # type: ignore[misc]


def attention_worker(rank: int, world_size: int) -> None:
    from megatron.core.transformer.enums import AttnMaskType

    from nsr_megatron import parallel
    from nsr_megatron.config import ParallelConfig

    parallel.initialize(ParallelConfig(), seed=1)
    g = torch.Generator().manual_seed(0)
    sq, b = 7, 3
    for heads, groups in ((4, 4), (4, 2), (6, 1)):
        sdpa, ref = _attention(heads, groups)
        q = torch.randn(sq, b, heads, 16, generator=g)
        k, v = (torch.randn(sq, b, groups, 16, generator=g) for _ in range(2))
        weight = torch.randn(sq, b, heads * 16, generator=g)
        causal = torch.ones(sq, sq, dtype=torch.bool).triu(1)  # True = masked out, megatron's convention
        padded = causal | (torch.arange(sq) >= sq - 2)  # also mask the last two keys (a padded tail)
        for mask in (None, causal[None, None].expand(b, 1, sq, sq), padded[None, None]):
            got, want = _run(sdpa, q, k, v, mask, weight), _run(ref, q, k, v, mask, weight)
            for name, a, w in zip(("output", "dq", "dk", "dv"), got, want, strict=True):
                torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        # bf16 inputs: the same to bf16's rounding
        got = _run(sdpa, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, weight)
        want = _run(ref, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, weight)
        for a, w in zip(got, want, strict=True):
            torch.testing.assert_close(a.float(), w.float(), rtol=2e-2, atol=2e-2)

    # Where SDPA does not apply, megatron's own path runs: bitwise the same as DotProductAttention.
    q = torch.randn(sq, b, 4, 16, generator=g)
    k, v = (torch.randn(sq, b, 2, 16, generator=g) for _ in range(2))
    weight = torch.randn(sq, b, 64, generator=g)
    for overrides in ({"softmax_type": "off-by-one"}, {"attention_dropout": 0.5}):
        sdpa, ref = _attention(4, 2, **overrides)
        sdpa.train(), ref.train()
        assert not sdpa._sdpa_applies(q, k, None, AttnMaskType.causal, None, None), overrides
        if "attention_dropout" in overrides:
            sdpa.eval(), ref.eval()  # dropout drawn from the RNG: compare without it
            assert sdpa._sdpa_applies(q, k, None, AttnMaskType.causal, None, None)
            continue
        for a, w in zip(_run(sdpa, q, k, v, None, weight), _run(ref, q, k, v, None, weight), strict=True):
            assert torch.equal(a, w)
    # A causal mask between queries and keys of different lengths is megatron's to build.
    sdpa, _ = _attention(4, 2)
    assert not sdpa._sdpa_applies(q[:3], k, None, AttnMaskType.causal, None, None)


def test_sdpa_core_attention_matches_megatrons() -> None:
    run(attention_worker, 1)


def spec_worker(rank: int, world_size: int) -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, ParallelConfig
    from nsr_megatron.models.attention import SDPAttention
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.provider import build_model

    parallel.initialize(ParallelConfig(), seed=1)
    cfg = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
           "max_position_embeddings": 64}
    bundle = build_model(arch_from_hf(cfg), model=ModelConfig(hf_path="unused"), parallel=ParallelConfig())
    cores = [m for m in bundle.gpt.modules() if isinstance(m, DotProductAttention)]
    assert len(cores) == 2 and all(isinstance(m, SDPAttention) for m in cores)


def test_the_local_layer_spec_uses_it() -> None:
    run(spec_worker, 1)
