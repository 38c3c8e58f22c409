"""The one HF <-> Megatron-Core name and shard mapping (Qwen2 / Qwen2.5, Qwen3, Qwen3-MoE).

Megatron side: the *canonical* tensors, i.e. the full (unsharded) global tensors keyed by megatron's
dist-checkpoint keys (what :func:`nsr_megatron.models.state.canonical_state` gathers and what
``dist_checkpointing`` stores, whatever the TP / PP / EP layout). HF side: the hub tensor names
that ``save_pretrained`` writes.

Legend: V vocabulary, H hidden, N query heads, G query groups (kv heads), D head_dim (may differ
from H/N), F dense ffn, Fm expert ffn, E experts. No vocabulary padding: V is the config's.

=============================================================  ==========================================
HF (``model.layers.{i}.`` = ``L.``)                            canonical (``decoder.layers.{i}.`` = ``M.``)
=============================================================  ==========================================
``model.embed_tokens.weight`` [V, H]                           ``embedding.word_embeddings.weight``
``L.input_layernorm.weight`` [H]                               ``M.self_attention.linear_qkv.layer_norm_weight``
``L.self_attn.{q,k,v}_proj.weight`` [N*D|G*D, H]               ``M.self_attention.linear_qkv.weight`` [(N+2G)*D, H]
``L.self_attn.{q,k,v}_proj.bias`` (qwen2) [N*D|G*D]            ``M.self_attention.linear_qkv.bias`` [(N+2G)*D]
``L.self_attn.{q,k}_norm.weight`` (qwen3) [D]                  ``M.self_attention.{q,k}_layernorm.weight``
``L.self_attn.o_proj.weight`` [H, N*D]                         ``M.self_attention.linear_proj.weight``
``L.post_attention_layernorm.weight`` [H]                      ``M.mlp.linear_fc1.layer_norm_weight``
``L.mlp.{gate,up}_proj.weight`` [F, H] (dense)                 ``M.mlp.linear_fc1.weight`` [2F, H] = [gate; up]
``L.mlp.down_proj.weight`` [H, F] (dense)                      ``M.mlp.linear_fc2.weight``
``L.mlp.gate.weight`` [E, H] (MoE router)                      ``M.mlp.router.weight``
``L.mlp.experts.{e}.{gate,up}_proj.weight`` [Fm, H]            ``M.mlp.experts.experts.linear_fc1.weight`` [E, 2Fm, H]
``L.mlp.experts.{e}.down_proj.weight`` [H, Fm]                 ``M.mlp.experts.experts.linear_fc2.weight`` [E, H, Fm]
``model.norm.weight`` [H]                                      ``decoder.final_layernorm.weight``
``lm_head.weight`` [V, H] (absent when tied)                   ``output_layer.weight`` (absent when tied)
=============================================================  ==========================================

qkv: megatron keeps, per query group g, the group's N/G query heads then its key head then its
value head: rows ``[q_g0 (N/G*D); k_g0 (D); v_g0 (D); q_g1; ...]``. HF keeps all queries, then all
keys, then all values; query head h belongs to group ``h // (N/G)``.

Layer keys: megatron-core stacks homogeneous layers on a leading layer axis
(``decoder.layers.self_attention.linear_qkv.weight`` [L, (N+2G)*D, H], stored one chunk per layer),
but keys layers one by one (``decoder.layers.{i}.``) when the block is not homogeneous, which is
the case for every MoE model here (the provider passes ``moe_layer_freq`` as a per-layer list).
:func:`weight_rules` follows that rule by default; ``stacked_layers`` overrides it, and
:func:`uses_stacked_layers` tells which form a checkpoint holds.

Transformer Engine's MoE layer spec keys the pre-MLP norm of MoE layers
``M.pre_mlp_layernorm.weight`` instead; reading accepts either name (:attr:`TensorRule.aliases`).

Every canonical tensor is made of *pieces* (:class:`Piece`): one per layer of a stacked tensor, one
per expert of a stacked expert tensor, else the whole tensor; conversion streams piece by piece.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from nsr_megatron.models.hf_config import ArchSpec

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

Shape = tuple[int, ...]
Kind = Literal["copy", "qkv", "gate_up", "experts_gate_up", "experts_down"]

# HF tensors that carry no weights of the model and are skipped when present (older exports).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
_LAYERS = "decoder.layers."


class ConvertError(ValueError):
    """A checkpoint that does not match its config or the mapping; the message names the tensor."""


@dataclass(frozen=True, kw_only=True)
class Piece:
    """One block of a canonical tensor built from (or split into) the HF tensors ``hf_index``.

    ``offset`` / ``shape`` locate the block in the canonical tensor (same rank as the tensor);
    ``layer`` orders pieces like the model (-1 embedding, ``num_layers`` final norm and head).
    """

    offset: Shape
    shape: Shape
    hf_index: tuple[int, ...]
    layer: int


@dataclass(frozen=True, kw_only=True)
class TensorRule:
    """How one canonical tensor relates to HF tensors."""

    key: str  # canonical (dist-checkpoint) key
    shape: Shape  # canonical global shape
    kind: Kind  # how the HF tensors of one layer combine
    hf_names: tuple[str, ...]  # the HF tensors, in the order ``kind`` combines them (layer-major if stacked)
    hf_shapes: tuple[Shape, ...]
    layer: int  # the layer of a per-layer tensor; -1 before the layers, num_layers after
    stacked: bool = False  # axis 0 is the layer axis: one piece per layer
    aliases: tuple[str, ...] = ()  # other canonical keys a checkpoint may hold this tensor under
    # qkv geometry (kind == "qkv"): query heads per group, head_dim, groups
    heads_per_group: int = 0
    head_dim: int = 0
    groups: int = 0

    @property
    def inner_shape(self) -> Shape:
        """The shape of one layer's tensor (the whole shape unless stacked)."""
        return self.shape[1:] if self.stacked else self.shape

    @property
    def pieces(self) -> tuple[Piece, ...]:
        rank = len(self.shape)
        if self.stacked:
            per = len(self.hf_names) // self.shape[0]
            return tuple(
                Piece(
                    offset=(i,) + (0,) * (rank - 1),
                    shape=(1, *self.inner_shape),
                    hf_index=tuple(range(i * per, (i + 1) * per)),
                    layer=i,
                )
                for i in range(self.shape[0])
            )
        if self.kind in ("experts_gate_up", "experts_down"):
            per = 2 if self.kind == "experts_gate_up" else 1
            return tuple(
                Piece(
                    offset=(e, 0, 0),
                    shape=(1, *self.shape[1:]),
                    hf_index=tuple(range(e * per, (e + 1) * per)),
                    layer=self.layer,
                )
                for e in range(self.shape[0])
            )
        return (
            Piece(
                offset=(0,) * rank,
                shape=self.shape,
                hf_index=tuple(range(len(self.hf_names))),
                layer=self.layer,
            ),
        )


# ------------------------------------------------------------------------------------------------
# The rules for an architecture
# ------------------------------------------------------------------------------------------------
def _default_stacked(arch: ArchSpec) -> bool:
    # megatron-core TransformerBlock.sharded_state_dict: a list-valued moe_layer_freq (every MoE
    # model here) makes the layers non-homogeneous, keyed one by one.
    return not arch.is_moe


def weight_rules(arch: ArchSpec, *, stacked_layers: bool | None = None) -> list[TensorRule]:
    """Every canonical tensor of ``arch`` with its HF sources, in model order (embedding, layers, head).

    ``stacked_layers``: key the layers on a leading layer axis (``decoder.layers.X``) rather than one
    by one (``decoder.layers.{i}.X``); default: what megatron-core does for this architecture.
    """
    V, H, N, G = arch.vocab_size, arch.hidden_size, arch.num_heads, arch.num_kv_heads
    if N % G:
        raise ConvertError(f"num_attention_heads={N} is not a multiple of num_key_value_heads={G}.")
    stacked = _default_stacked(arch) if stacked_layers is None else stacked_layers
    if stacked and arch.is_moe:
        raise ConvertError(
            "stacked layer keys are only possible for dense models (MoE layers are keyed per layer)."
        )
    L = arch.num_layers
    rules = [_copy("embedding.word_embeddings.weight", "model.embed_tokens.weight", (V, H), layer=-1)]
    per_layer = [_layer_rules(arch, i) for i in range(L)]
    if stacked:
        for j, first in enumerate(per_layer[0]):
            group = [layer[j] for layer in per_layer]
            rules.append(
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
    else:
        rules.extend(r for layer in per_layer for r in layer)
    rules.append(_copy("decoder.final_layernorm.weight", "model.norm.weight", (H,), layer=L))
    if not arch.tie_word_embeddings:
        rules.append(_copy("output_layer.weight", "lm_head.weight", (V, H), layer=L))
    return rules


def _layer_rules(arch: ArchSpec, i: int) -> list[TensorRule]:
    H, N, G, D = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
    L, M = f"model.layers.{i}.", f"{_LAYERS}{i}."
    rules = [
        _copy(f"{M}self_attention.linear_qkv.layer_norm_weight", f"{L}input_layernorm.weight", (H,), layer=i)
    ]
    qkv = dict(heads_per_group=N // G, head_dim=D, groups=G, layer=i, kind="qkv")
    rules.append(
        TensorRule(
            key=f"{M}self_attention.linear_qkv.weight",
            shape=((N + 2 * G) * D, H),
            hf_names=tuple(f"{L}self_attn.{p}_proj.weight" for p in "qkv"),
            hf_shapes=((N * D, H), (G * D, H), (G * D, H)),
            **qkv,  # type: ignore[arg-type]
        )
    )
    if arch.qkv_bias:
        rules.append(
            TensorRule(
                key=f"{M}self_attention.linear_qkv.bias",
                shape=((N + 2 * G) * D,),
                hf_names=tuple(f"{L}self_attn.{p}_proj.bias" for p in "qkv"),
                hf_shapes=((N * D,), (G * D,), (G * D,)),
                **qkv,  # type: ignore[arg-type]
            )
        )
    if arch.qk_norm:
        rules.append(
            _copy(f"{M}self_attention.q_layernorm.weight", f"{L}self_attn.q_norm.weight", (D,), layer=i)
        )
        rules.append(
            _copy(f"{M}self_attention.k_layernorm.weight", f"{L}self_attn.k_norm.weight", (D,), layer=i)
        )
    rules.append(
        _copy(f"{M}self_attention.linear_proj.weight", f"{L}self_attn.o_proj.weight", (H, N * D), layer=i)
    )
    moe = arch.is_moe and arch.moe_layers[i]
    rules.append(
        _copy(
            f"{M}mlp.linear_fc1.layer_norm_weight",
            f"{L}post_attention_layernorm.weight",
            (H,),
            layer=i,
            aliases=(f"{M}pre_mlp_layernorm.weight",) if moe else (),
        )
    )
    if moe:
        rules.extend(_expert_rules(arch, i, L, M))
    else:
        F = arch.ffn_hidden_size
        rules.append(
            TensorRule(
                key=f"{M}mlp.linear_fc1.weight",
                shape=(2 * F, H),
                kind="gate_up",
                hf_names=(f"{L}mlp.gate_proj.weight", f"{L}mlp.up_proj.weight"),
                hf_shapes=((F, H), (F, H)),
                layer=i,
            )
        )
        rules.append(_copy(f"{M}mlp.linear_fc2.weight", f"{L}mlp.down_proj.weight", (H, F), layer=i))
    return rules


def _copy(key: str, hf_name: str, shape: Shape, *, layer: int, aliases: tuple[str, ...] = ()) -> TensorRule:
    return TensorRule(
        key=key,
        shape=shape,
        kind="copy",
        hf_names=(hf_name,),
        hf_shapes=(shape,),
        layer=layer,
        aliases=aliases,
    )


def _expert_rules(arch: ArchSpec, i: int, L: str, M: str) -> list[TensorRule]:
    E, H, Fm = arch.num_experts, arch.hidden_size, arch.moe_ffn_hidden_size
    fc1_names = tuple(f"{L}mlp.experts.{e}.{p}_proj.weight" for e in range(E) for p in ("gate", "up"))
    return [
        _copy(f"{M}mlp.router.weight", f"{L}mlp.gate.weight", (E, H), layer=i),
        TensorRule(
            key=f"{M}mlp.experts.experts.linear_fc1.weight",
            shape=(E, 2 * Fm, H),
            kind="experts_gate_up",
            hf_names=fc1_names,
            hf_shapes=((Fm, H),) * (2 * E),
            layer=i,
        ),
        TensorRule(
            key=f"{M}mlp.experts.experts.linear_fc2.weight",
            shape=(E, H, Fm),
            kind="experts_down",
            hf_names=tuple(f"{L}mlp.experts.{e}.down_proj.weight" for e in range(E)),
            hf_shapes=((H, Fm),) * E,
            layer=i,
        ),
    ]


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
    L, E = arch.num_layers, arch.num_experts
    keys: list[str] = []
    for i in range(L):
        moe = arch.is_moe and arch.moe_layers[i]
        modules = ["self_attention.linear_qkv", "self_attention.linear_proj"]
        if not moe:
            modules += ["mlp.linear_fc1", "mlp.linear_fc2"]
        for mod in modules:
            keys.append(
                f"{_LAYERS}{mod}._extra_state/shard_{i}_{L}"
                if stacked
                else f"{_LAYERS}{i}.{mod}._extra_state/shard_0_1"
            )
        if moe:
            for mod in ("linear_fc1", "linear_fc2"):
                keys.extend(
                    f"{_LAYERS}{i}.mlp.experts.experts.{mod}._extra_state/shard_{e}_{E}" for e in range(E)
                )
    return keys


# ------------------------------------------------------------------------------------------------
# Tensor transforms (pure functions; dtype is kept)
# ------------------------------------------------------------------------------------------------
def piece_from_hf(rule: TensorRule, piece: Piece, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Build one piece of the canonical tensor from its HF tensors (``tensors[j]`` is
    ``rule.hf_names[piece.hf_index[j]]``). Returns a tensor of shape ``piece.shape``."""
    if rule.kind == "copy":
        block = tensors[0]
    elif rule.kind == "qkv":
        q, k, v = tensors  # [N*D, ...], [G*D, ...], [G*D, ...]
        rest = q.shape[1:]
        G, D = rule.groups, rule.head_dim
        grouped = [
            q.reshape(G, rule.heads_per_group * D, *rest),
            k.reshape(G, D, *rest),
            v.reshape(G, D, *rest),
        ]
        block = torch.cat(grouped, dim=1).reshape(rule.inner_shape)  # [G, (N/G+2)*D, ...] -> [(N+2G)*D, ...]
    elif rule.kind in ("gate_up", "experts_gate_up"):
        block = torch.cat(list(tensors), dim=0)  # [2F, H] = [gate; up]
    elif rule.kind == "experts_down":
        block = tensors[0]  # [H, Fm]
    else:
        raise AssertionError(rule.kind)
    if rule.stacked or rule.kind in ("experts_gate_up", "experts_down"):
        block = block.unsqueeze(0)  # the layer / expert axis
    return block


def piece_to_hf(rule: TensorRule, piece: Piece, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Split one piece of the canonical tensor back into its HF tensors (inverse of
    :func:`piece_from_hf`; returns views where possible, in ``piece.hf_index`` order)."""
    if tuple(tensor.shape) != piece.shape:
        raise ConvertError(
            f"{rule.key}: block at offset {list(piece.offset)} has shape {list(tensor.shape)}, "
            f"expected {list(piece.shape)}."
        )
    if rule.stacked or rule.kind in ("experts_gate_up", "experts_down"):
        tensor = tensor[0]  # drop the layer / expert axis
    if rule.kind in ("copy", "experts_down"):
        return [tensor]
    if rule.kind == "qkv":
        G, D, per = rule.groups, rule.head_dim, rule.heads_per_group
        rest = tensor.shape[1:]
        q, k, v = torch.split(tensor.reshape(G, (per + 2) * D, *rest), [per * D, D, D], dim=1)
        return [q.reshape(G * per * D, *rest), k.reshape(G * D, *rest), v.reshape(G * D, *rest)]
    if rule.kind in ("gate_up", "experts_gate_up"):
        return list(torch.chunk(tensor, 2, dim=0))  # [gate; up]
    raise AssertionError(rule.kind)


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
    rules need, with the shapes the config implies. ``lm_head.weight`` is tolerated (and ignored)
    when the embeddings are tied."""
    expected = {name: shape for r in rules for name, shape in zip(r.hf_names, r.hf_shapes, strict=True)}
    problems: list[str] = []
    missing = [f"{n} (expected shape {list(s)})" for n, s in expected.items() if n not in found]
    if missing:
        problems.append(f"missing tensor(s): {_listing(missing)}")
    ignorable = {"lm_head.weight"} if tied else set()
    unexpected = [
        f"{n} (shape {list(s)})"
        for n, s in found.items()
        if n not in expected and n not in ignorable and not n.endswith(IGNORED_HF_SUFFIXES)
    ]
    if unexpected:
        problems.append(f"unexpected tensor(s) the mapping does not know: {_listing(unexpected)}")
    mismatched = [
        f"{n}: checkpoint shape {list(found[n])} but config.json implies {list(s)}"
        for n, s in expected.items()
        if n in found and tuple(found[n]) != tuple(s)
    ]
    if tied and "lm_head.weight" in found and "model.embed_tokens.weight" in expected:
        if tuple(found["lm_head.weight"]) != tuple(expected["model.embed_tokens.weight"]):
            mismatched.append(
                f"lm_head.weight: checkpoint shape {list(found['lm_head.weight'])} but config.json implies "
                f"{list(expected['model.embed_tokens.weight'])}"
            )
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
