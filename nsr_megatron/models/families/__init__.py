"""Model families: one module each, found by HF ``model_type``.

A family module in this package defines ``FAMILY``, an instance of a :class:`ModelFamily` subclass that declares
everything the project needs of that family: the HF config read into an :class:`~nsr_megatron.models.arch.
ArchSpec` and the megatron ``TransformerConfig`` fields it decides, the layer spec, the HF <-> megatron weight
rules (:mod:`nsr_megatron.models.rules`), the memory planner's parameter and activation counts, and the HF class
the embedded engine runs (with its expert layout and router modules). The shared machinery asks :func:`family`
and names no family; adding one is adding a module here.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from nsr_megatron.config import ConfigError, ModelConfig
from nsr_megatron.models.arch import ArchSpec
from nsr_megatron.models.rules import TensorRule

__all__ = ["ModelFamily", "family", "find_family", "registry"]


class ModelFamily:
    """What the project needs of one model family (subclass it; every method below is asked for)."""

    model_type: str = ""  # the HF config's ``model_type``
    title: str = ""  # the family's name in messages, e.g. "Qwen3-MoE"
    hf_class: str = ""  # the ``transformers`` causal-LM class the embedded engine runs
    # transformers holds the experts fused (``experts.gate_up_proj`` [E, 2I, H] = cat(gate_E, up_E) along dim 1,
    # ``experts.down_proj`` [E, H, I]) while checkpoints store them one by one (``experts.{E}.{gate,up,down}_proj``)
    hf_fused_experts: bool = False
    hf_router_suffix: str = ""  # the names of the HF model's MoE router modules end with this ("" when dense)

    # ---------------------------------------------------------------- config
    def arch(self, hf: Mapping[str, Any]) -> ArchSpec:
        """Read an HF ``config.json`` dict; raise :class:`ConfigError` for what the project cannot build exactly."""
        raise NotImplementedError

    def transformer_fields(self, arch: ArchSpec) -> dict[str, Any]:
        """The megatron ``TransformerConfig`` fields the family decides (norm, activation, biases, router); sizes,
        layout, precision and the run's MoE options are the caller's."""
        raise NotImplementedError

    def transformer_config_class(self) -> Any:
        """The megatron config class :meth:`transformer_fields` fill (``MLATransformerConfig`` for multi-latent
        attention)."""
        from megatron.core.transformer import TransformerConfig

        return TransformerConfig

    def gpt_model_fields(self, arch: ArchSpec) -> dict[str, Any]:
        """The megatron ``GPTModel`` arguments the family decides beyond plain RoPE at ``rope_theta`` (e.g.
        ``rotary_percent`` for partial rotary); none by default."""
        return {}

    # ---------------------------------------------------------------- model
    def layer_spec(self, arch: ArchSpec, layer: int, *, te: bool, model: ModelConfig) -> Any:
        """The megatron layer spec of layer ``layer`` (Transformer Engine layers with ``te``)."""
        raise NotImplementedError

    def final_norm(self, arch: ArchSpec, *, te: bool) -> Any:
        """The module class of the norm after the last layer."""
        raise NotImplementedError

    # ---------------------------------------------------------------- conversion
    def weight_rules(self, arch: ArchSpec) -> list[TensorRule]:
        """Every canonical tensor with its HF sources, in model order (embedding, layers, head), the layers keyed
        one by one (``decoder.layers.{i}.``); :func:`nsr_megatron.convert.mapping.weight_rules` stacks them."""
        raise NotImplementedError

    # ---------------------------------------------------------------- memory planner (models/memory.py)
    def attention_parameters(self, arch: ArchSpec) -> int:
        """Parameters of one layer's attention (projections and their biases; not its norms)."""
        raise NotImplementedError

    def norm_parameters(self, arch: ArchSpec) -> int:
        """Parameters of one layer's norms."""
        raise NotImplementedError

    def dense_mlp_parameters(self, arch: ArchSpec) -> int:
        """Parameters of one dense MLP."""
        raise NotImplementedError

    def expert_parameters(self, arch: ArchSpec) -> int:
        """Parameters of one expert of an MoE layer (0 when dense)."""
        raise NotImplementedError

    def router_parameters(self, arch: ArchSpec) -> int:
        """Parameters of one MoE layer's router (0 when dense)."""
        raise NotImplementedError

    def layer_activations(self, arch: ArchSpec, layer: int, *, act_bytes: int, gemm_bytes: int, tp: int, sp: int,
                          etp: int, te: bool) -> float:
        """Bytes autograd keeps per token in layer ``layer``: activations of ``act_bytes``, saved GEMM inputs of
        ``gemm_bytes``; ``tp`` splits what is inside attention and the MLP, ``sp`` the sequence-parallel parts,
        ``etp`` the experts; ``te``: Transformer Engine's fused norms and SwiGLU."""
        raise NotImplementedError


def _family_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


@functools.cache
def registry() -> Mapping[str, ModelFamily]:
    """HF ``model_type`` -> family, from the ``FAMILY`` of every module of this package (read once)."""
    found: dict[str, ModelFamily] = {}
    for name in _family_modules():
        fam = getattr(importlib.import_module(f"{__name__}.{name}"), "FAMILY", None)
        if not isinstance(fam, ModelFamily):
            continue
        if fam.model_type in found:
            raise AssertionError(f"model_type {fam.model_type!r} is declared by two family modules")
        found[fam.model_type] = fam
    return dict(sorted(found.items()))


def find_family(model_type: str) -> ModelFamily | None:
    """The family of ``model_type``, or None when no module declares it."""
    return registry().get(model_type)


def family(model_type: str) -> ModelFamily:
    """The family of ``model_type``; :class:`ConfigError` naming it and the supported families when none is."""
    fam = find_family(model_type)
    if fam is None:
        known = registry()
        raise ConfigError(
            f"model_type={model_type!r} is not supported; supported architectures: {', '.join(known)} "
            f"({', '.join(f.title for f in known.values())}). A new family is one module in "
            "nsr_megatron/models/families/ (README: 'Adding a model family')."
        )
    return fam
