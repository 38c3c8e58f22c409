"""The one HF <-> Megatron-Core name and shard mapping, for every model family.

Megatron side: the *canonical* tensors, i.e. the full (unsharded) global tensors keyed by megatron's
dist-checkpoint keys (what :func:`nsr_megatron.models.state.canonical_state` gathers and what
``dist_checkpointing`` stores, whatever the TP / PP / EP layout). HF side: the hub tensor names
that ``save_pretrained`` writes.

Each model family declares its rules (:mod:`nsr_megatron.models.families`, the name tables are in the family
modules); a rule's kind carries the tensor transform (:mod:`nsr_megatron.models.rules`). This module asks the
family of ``arch.model_type`` for them and names no family.

Layer keys: megatron-core stacks homogeneous layers on a leading layer axis
(``decoder.layers.self_attention.linear_qkv.weight`` [L, (N+2G)*D, H], stored one chunk per layer),
but keys layers one by one (``decoder.layers.{i}.``) when the block is not homogeneous, which is
the case for every MoE model here (the provider passes ``moe_layer_freq`` as a per-layer list).
:func:`weight_rules` follows that rule by default; ``stacked_layers`` overrides it, and
:func:`uses_stacked_layers` tells which form a checkpoint holds.

Every canonical tensor is made of *pieces* (:class:`Piece`): one per layer of a stacked tensor, one
per expert of a stacked expert tensor, else the whole tensor; conversion streams piece by piece.

Legend: L layers, H hidden, N query heads, G query groups, D head_dim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from nsr_megatron.models.arch import ArchSpec
from nsr_megatron.models.families import family
from nsr_megatron.models.rules import LAYERS as _LAYERS
from nsr_megatron.models.rules import Piece, Shape, TensorRule

__all__ = [
    "ConvertError",
    "Piece",
    "TensorRule",
    "canonical_to_hf",
    "canonical_to_hf_state",
    "check_canonical_tensors",
    "check_hf_tensors",
    "extra_state_keys",
    "hf_state_to_canonical",
    "hf_to_canonical",
    "model_order",
    "piece_from_hf",
    "piece_to_hf",
    "uses_stacked_layers",
    "weight_rules",
]

# HF tensors that carry no weights of the model and are skipped when present (older exports).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class ConvertError(ValueError):
    """A checkpoint that does not match its config or the mapping; the message names the tensor."""


# ------------------------------------------------------------------------------------------------
# The rules for an architecture
# ------------------------------------------------------------------------------------------------
def _default_stacked(arch: ArchSpec) -> bool:
    # megatron-core TransformerBlock.sharded_state_dict: a list-valued moe_layer_freq (every MoE
    # model here) makes the layers non-homogeneous, keyed one by one.
    return not arch.is_moe


def weight_rules(arch: ArchSpec, *, stacked_layers: bool | None = None) -> list[TensorRule]:
    """Every canonical tensor of ``arch`` with its HF sources, in model order (embedding, layers, head), as its
    family declares them.

    ``stacked_layers``: key the layers on a leading layer axis (``decoder.layers.X``) rather than one
    by one (``decoder.layers.{i}.X``); default: what megatron-core does for this architecture.
    """
    N, G = arch.num_heads, arch.num_kv_heads
    if N % G:
        raise ConvertError(f"num_attention_heads={N} is not a multiple of num_key_value_heads={G}.")
    stacked = _default_stacked(arch) if stacked_layers is None else stacked_layers
    if stacked and arch.is_moe:
        raise ConvertError(
            "stacked layer keys are only possible for dense models (MoE layers are keyed per layer)."
        )
    rules = family(arch.model_type).weight_rules(arch)
    return _stack_layers(rules, arch.num_layers) if stacked else rules


def _stack_layers(rules: list[TensorRule], num_layers: int) -> list[TensorRule]:
    """Per-layer rules -> one rule per layer tensor with a leading layer axis (every layer has the same rules)."""
    L = num_layers
    per_layer = [[r for r in rules if r.layer == i] for i in range(L)]
    stacked = []
    for j, first in enumerate(per_layer[0]):
        group = [layer[j] for layer in per_layer]
        stacked.append(
            replace(
                first,
                key=_LAYERS + first.key.removeprefix(f"{_LAYERS}0."),
                shape=(L, *first.shape),
                hf_names=tuple(n for r in group for n in r.hf_names),
                hf_shapes=tuple(s for r in group for s in r.hf_shapes),
                stacked=True,
                layer=0,
                aliases=(),
            )
        )
    return [r for r in rules if r.layer < 0] + stacked + [r for r in rules if r.layer >= L]


def model_order(rules: Sequence[TensorRule]) -> list[tuple[TensorRule, Piece]]:
    """Every piece of every rule, layer by layer (the order HF checkpoints list tensors in)."""
    work = [(n, r, p) for n, r in enumerate(rules) for p in r.pieces]
    work.sort(key=lambda w: (w[2].layer, w[0]))
    return [(r, p) for _, r, p in work]


def uses_stacked_layers(keys: Sequence[str] | Mapping[str, object]) -> bool:
    """Whether a checkpoint's keys put the layers on a leading axis (``decoder.layers.X``) rather
    than one key per layer (``decoder.layers.{i}.X``)."""
    return not any(k.startswith(_LAYERS) and k[len(_LAYERS) :].split(".", 1)[0].isdigit() for k in keys)


def extra_state_keys(arch: ArchSpec, *, stacked_layers: bool | None = None) -> list[str]:
    """The ``_extra_state`` objects megatron-core's local layer spec asks for at load (each linear
    layer's, stored as ``[None]``), as dist-checkpoint unique keys ``<key>/shard_<offset>_<shape>``.

    A model never trained under FP8 has nothing in them, but ``dist_checkpointing.load`` refuses a
    checkpoint that lacks them, so a converted checkpoint carries them too.
    """
    stacked = _default_stacked(arch) if stacked_layers is None else stacked_layers
    L = arch.num_layers
    keys: list[str] = []
    for r in weight_rules(arch, stacked_layers=False):
        if not r.linear:
            continue
        module = r.key.removeprefix(f"{_LAYERS}{r.layer}.").removesuffix(".weight")
        if r.kind.experts:
            E = r.shape[0]
            keys.extend(f"{_LAYERS}{r.layer}.{module}._extra_state/shard_{e}_{E}" for e in range(E))
        elif stacked:
            keys.append(f"{_LAYERS}{module}._extra_state/shard_{r.layer}_{L}")
        else:
            keys.append(f"{_LAYERS}{r.layer}.{module}._extra_state/shard_0_1")
    return keys


# ------------------------------------------------------------------------------------------------
# Tensor transforms (pure functions; dtype is kept)
# ------------------------------------------------------------------------------------------------
def piece_from_hf(rule: TensorRule, piece: Piece, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Build one piece of the canonical tensor from its HF tensors (``tensors[j]`` is
    ``rule.hf_names[piece.hf_index[j]]``). Returns a tensor of shape ``piece.shape``."""
    block = rule.kind.to_megatron(tensors)
    return block.unsqueeze(0) if rule.leading_axis else block  # the layer / expert axis


def piece_to_hf(rule: TensorRule, piece: Piece, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Split one piece of the canonical tensor back into its HF tensors (inverse of
    :func:`piece_from_hf`; returns views where possible, in ``piece.hf_index`` order)."""
    if tuple(tensor.shape) != piece.shape:
        raise ConvertError(
            f"{rule.key}: block at offset {list(piece.offset)} has shape {list(tensor.shape)}, "
            f"expected {list(piece.shape)}."
        )
    return rule.kind.to_hf(tensor[0] if rule.leading_axis else tensor)  # without the layer / expert axis


def hf_to_canonical(rule: TensorRule, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The whole canonical tensor of ``rule`` from a name -> tensor mapping of its HF tensors."""
    pieces = rule.pieces
    if len(pieces) == 1:
        return piece_from_hf(rule, pieces[0], [tensors[rule.hf_names[j]] for j in pieces[0].hf_index])
    return torch.cat(
        [piece_from_hf(rule, p, [tensors[rule.hf_names[j]] for j in p.hf_index]) for p in pieces]
    )


def canonical_to_hf(rule: TensorRule, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """HF name -> tensor for the whole canonical tensor of ``rule`` (used by conversion and weight sync)."""
    if tuple(tensor.shape) != rule.shape:
        raise ConvertError(
            f"{rule.key}: shape {list(tensor.shape)} does not match the config's {list(rule.shape)}."
        )
    out: dict[str, torch.Tensor] = {}
    for p in rule.pieces:
        block = tensor[tuple(slice(o, o + n) for o, n in zip(p.offset, p.shape, strict=True))]
        for j, t in zip(p.hf_index, piece_to_hf(rule, p, block), strict=True):
            out[rule.hf_names[j]] = t
    return out


def hf_state_to_canonical(
    arch: ArchSpec, hf: Mapping[str, torch.Tensor], *, stacked_layers: bool | None = None
) -> dict[str, torch.Tensor]:
    """A whole in-memory HF state dict -> canonical tensors (small models, tests, weight loading)."""
    rules = weight_rules(arch, stacked_layers=stacked_layers)
    check_hf_tensors(
        rules,
        {k: tuple(v.shape) for k, v in hf.items()},
        tied=arch.tie_word_embeddings,
        where="the given HF state dict",
    )
    return {r.key: hf_to_canonical(r, hf) for r in rules}


def canonical_to_hf_state(arch: ArchSpec, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical tensors (e.g. :func:`nsr_megatron.models.state.canonical_state`) -> HF state dict;
    the layer key form is read from the keys."""
    rules = weight_rules(arch, stacked_layers=uses_stacked_layers(state))
    stored = check_canonical_tensors(
        rules, {k: tuple(v.shape) for k, v in state.items()}, where="the given canonical state"
    )
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        out.update(canonical_to_hf(r, state[stored[r.key]]))
    return out


# ------------------------------------------------------------------------------------------------
# Checks: every tensor accounted for, every shape as the config says
# ------------------------------------------------------------------------------------------------
def _listing(items: list[str], limit: int = 8) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")


def check_hf_tensors(
    rules: Sequence[TensorRule], found: Mapping[str, Shape], *, tied: bool, where: str
) -> None:
    """Raise :class:`ConvertError` unless ``found`` (HF name -> shape) holds exactly the tensors the
    rules need, with the shapes the config implies. A rule's ``tied_hf_name`` (the output layer's HF name) is
    tolerated (and ignored) when the embeddings are tied."""
    expected = {name: shape for r in rules for name, shape in zip(r.hf_names, r.hf_shapes, strict=True)}
    problems: list[str] = []
    missing = [f"{n} (expected shape {list(s)})" for n, s in expected.items() if n not in found]
    if missing:
        problems.append(f"missing tensor(s): {_listing(missing)}")
    tied_names = {r.tied_hf_name: r.hf_shapes[0] for r in rules if r.tied_hf_name} if tied else {}
    unexpected = [
        f"{n} (shape {list(s)})"
        for n, s in found.items()
        if n not in expected and n not in tied_names and not n.endswith(IGNORED_HF_SUFFIXES)
    ]
    if unexpected:
        problems.append(f"unexpected tensor(s) the mapping does not know: {_listing(unexpected)}")
    quantized = [n for n in found if n.endswith(("_blocks", "_scales"))]
    if quantized:
        raise ConvertError(
            f"{where} holds quantized tensors ({_listing(quantized, 3)}): (MXFP4) blocks and scales, in which some "
            "published checkpoints ship their experts. Training needs bf16/fp32 weights: dequantize first (load with "
            "transformers' Mxfp4Config(dequantize=True) and save_pretrained, then drop quantization_config from "
            "config.json) or start from a bf16 export of the model (e.g. a '-BF16' checkpoint).")
    mismatched = [
        f"{n}: checkpoint shape {list(found[n])} but config.json implies {list(s)}"
        for n, s in expected.items()
        if n in found and tuple(found[n]) != tuple(s)
    ]
    mismatched += [
        f"{n}: checkpoint shape {list(found[n])} but config.json implies {list(s)}"
        for n, s in tied_names.items()
        if n in found and tuple(found[n]) != tuple(s)
    ]
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched)}")
    if problems:
        raise ConvertError(
            f"{where} does not match its config.json: "
            + " | ".join(problems)
            + ". Check that config.json belongs to these weights (model_type, sizes, tie_word_embeddings)."
        )


def check_canonical_tensors(
    rules: Sequence[TensorRule], found: Mapping[str, Shape], *, where: str
) -> dict[str, str]:
    """Match a checkpoint's model tensors (key -> global shape) against the rules.

    Returns canonical key -> the key the checkpoint stores it under (the key itself or an alias).
    Keys outside the model (``optimizer.*`` and other non-model state) are ignored.
    """
    resolved: dict[str, str] = {}
    problems: list[str] = []
    missing: list[str] = []
    mismatched: list[str] = []
    for r in rules:
        stored = next((k for k in (r.key, *r.aliases) if k in found), None)
        if stored is None:
            missing.append(f"{r.key} (expected shape {list(r.shape)})")
            continue
        resolved[r.key] = stored
        if tuple(found[stored]) != r.shape:
            mismatched.append(
                f"{stored}: checkpoint shape {list(found[stored])} but the HF config implies {list(r.shape)}"
            )
    known = {k for r in rules for k in (r.key, *r.aliases)}
    model_prefixes = ("embedding.", "decoder.", "output_layer.")
    unexpected = [
        f"{k} (shape {list(s)})"
        for k, s in found.items()
        if k.startswith(model_prefixes) and k not in known and "_extra_state" not in k
    ]
    if missing:
        problems.append(f"missing tensor(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s) the mapping does not know: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched)}")
    if problems:
        raise ConvertError(
            f"{where} does not match the HF config: "
            + " | ".join(problems)
            + ". Pass the config.json of the model this checkpoint was trained from (--hf-config)."
        )
    return resolved
