"""Sharded loading (every rank reads only the HF slices it owns) and the HF-named export of a sharded model.

A rank's model holds *shards* of the canonical tensors (:mod:`.mapping`): a block ``[offset, offset + shape)`` of
each, given by megatron's sharded state dict (tensor-parallel rows or columns, a PP stage's layers, an EP rank's
experts, the gate and up halves of SwiGLU). :func:`read_canonical_block` builds such a block from the HF tensors
through the same rules the converter uses, reading only the rows (and columns) the block needs:

- ``copy`` / ``experts_down``: the block's rows and columns of the one HF tensor;
- ``gate_up`` / ``experts_gate_up``: ``[gate; up]``, so a row range reads the part of ``gate`` and of ``up`` it covers;
- ``qkv``: megatron's rows are grouped per query group (``[q_g; k_g; v_g]``), so a row range reads the query, key
  and value rows of the groups it touches;
- the leading layer axis (stacked dense layers) or expert axis picks which HF tensors are read at all.

Replicated tensors (norms; attention under expert parallelism) are read whole by every rank that holds them. The
result equals a full load bitwise; :attr:`HFCheckpoint.bytes_read` counts what was read.

Legend: R rows, C columns of an HF tensor; G query groups, D head_dim.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from nsr_megatron.convert.io import HFCheckpoint
from nsr_megatron.convert.mapping import ConvertError, Piece, TensorRule, weight_rules
from nsr_megatron.models.hf_config import ArchSpec

__all__ = ["HFExport", "load_hf_sharded", "read_canonical_block", "read_hf_canonical", "write_canonical_block"]


def _inner_block(rule: TensorRule, piece: Piece, ckpt: HFCheckpoint, offset: tuple[int, ...],
                 shape: tuple[int, ...]) -> torch.Tensor:
    """Rows ``[offset[0], +shape[0])`` (and columns, for 2-D) of one layer's / expert's tensor of ``rule``."""
    names = [rule.hf_names[j] for j in piece.hf_index]
    r0, r1 = offset[0], offset[0] + shape[0]
    cols = slice(offset[1], offset[1] + shape[1]) if len(shape) > 1 else None
    if rule.kind in ("copy", "experts_down"):
        return ckpt.read_block(names[0], slice(r0, r1), cols)
    if rule.kind in ("gate_up", "experts_gate_up"):
        half = rule.hf_shapes[piece.hf_index[0]][0]  # F: [gate (F rows); up (F rows)]
        parts = []
        if r0 < half:
            parts.append(ckpt.read_block(names[0], slice(r0, min(r1, half)), cols))
        if r1 > half:
            parts.append(ckpt.read_block(names[1], slice(max(r0, half) - half, r1 - half), cols))
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    if rule.kind == "qkv":
        per, D = rule.heads_per_group, rule.head_dim
        size = (per + 2) * D  # rows of one query group
        g0, g1 = r0 // size, -(-r1 // size)  # the groups the rows touch
        q = ckpt.read_block(names[0], slice(g0 * per * D, g1 * per * D), cols)  # [(g1-g0)*per*D, C]
        k = ckpt.read_block(names[1], slice(g0 * D, g1 * D), cols)
        v = ckpt.read_block(names[2], slice(g0 * D, g1 * D), cols)
        rest = q.shape[1:]
        n = g1 - g0
        grouped = torch.cat([q.reshape(n, per * D, *rest), k.reshape(n, D, *rest), v.reshape(n, D, *rest)], dim=1)
        return grouped.reshape(n * size, *rest)[r0 - g0 * size : r1 - g0 * size]
    raise AssertionError(rule.kind)


def read_canonical_block(rule: TensorRule, ckpt: HFCheckpoint, offset: tuple[int, ...],
                         shape: tuple[int, ...]) -> torch.Tensor:
    """The block ``[offset, offset + shape)`` of ``rule``'s canonical tensor, read from ``ckpt`` (stored dtype)."""
    if len(offset) != len(rule.shape) or len(shape) != len(rule.shape):
        raise ConvertError(f"{rule.key}: block offset {list(offset)} / shape {list(shape)} do not match the "
                           f"tensor's rank {len(rule.shape)}.")
    pieces = rule.pieces
    if len(pieces) == 1:
        return _inner_block(rule, pieces[0], ckpt, offset, shape)
    # A leading layer or expert axis: one piece per index, each built from its own HF tensors.
    blocks = [_inner_block(rule, pieces[i], ckpt, offset[1:], shape[1:]).unsqueeze(0)
              for i in range(offset[0], offset[0] + shape[0])]
    return torch.cat(blocks)


def _write_inner(rule: TensorRule, piece: Piece, views: Mapping[str, torch.Tensor], offset: tuple[int, ...],
                 block: torch.Tensor) -> None:
    """Copy ``block`` (rows ``[offset[0], +R)``, and columns for 2-D, of one layer's / expert's canonical tensor)
    into the HF tensors of ``rule`` in ``views``: the inverse of :func:`_inner_block`."""
    names = [rule.hf_names[j] for j in piece.hf_index]
    r0, r1 = offset[0], offset[0] + block.shape[0]
    cols = (slice(offset[1], offset[1] + block.shape[1]),) if block.dim() > 1 else ()

    def put(name: str, lo: int, hi: int, src: torch.Tensor) -> None:  # rows [lo, hi) of HF tensor ``name``
        dest = views.get(name)
        if dest is None:
            raise ConvertError(f"the weights to write into lack {name} (the engine and the model disagree).")
        dest[(slice(lo, hi), *cols)].copy_(src)

    if rule.kind in ("copy", "experts_down"):
        put(names[0], r0, r1, block)
    elif rule.kind in ("gate_up", "experts_gate_up"):
        half = rule.hf_shapes[piece.hf_index[0]][0]  # F: [gate (F rows); up (F rows)]
        if r0 < half:
            put(names[0], r0, min(r1, half), block[: min(r1, half) - r0])
        if r1 > half:
            put(names[1], max(r0, half) - half, r1 - half, block[max(r0, half) - r0 :])
    elif rule.kind == "qkv":
        per, D = rule.heads_per_group, rule.head_dim
        size = (per + 2) * D  # rows of one query group: [q (per*D); k (D); v (D)]
        for g in range(r0 // size, -(-r1 // size)):
            for name, lo, hi, hf0 in ((names[0], 0, per * D, g * per * D), (names[1], per * D, (per + 1) * D, g * D),
                                      (names[2], (per + 1) * D, size, g * D)):
                a, b = max(r0, g * size + lo), min(r1, g * size + hi)  # canonical rows of this part in the block
                if a < b:
                    start = hf0 + a - (g * size + lo)
                    put(name, start, start + b - a, block[a - r0 : b - r0])
    else:
        raise AssertionError(rule.kind)


def write_canonical_block(rule: TensorRule, views: Mapping[str, torch.Tensor], offset: tuple[int, ...],
                          block: torch.Tensor) -> None:
    """Copy ``block``, the part ``[offset, offset + block.shape)`` of ``rule``'s canonical tensor, into the HF
    tensors it belongs to (``views``: HF name -> full tensor, written in place, cast to its dtype)."""
    if len(offset) != len(rule.shape) or block.dim() != len(rule.shape):
        raise ConvertError(f"{rule.key}: block offset {list(offset)} / shape {list(block.shape)} do not match the "
                           f"tensor's rank {len(rule.shape)}.")
    pieces = rule.pieces
    if len(pieces) == 1:
        _write_inner(rule, pieces[0], views, offset, block)
        return
    for i in range(block.shape[0]):  # a leading layer or expert axis: one piece per index
        _write_inner(rule, pieces[offset[0] + i], views, offset[1:], block[i])


@torch.no_grad()
def load_hf_sharded(model: torch.nn.Module, arch: ArchSpec, hf_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Copy this rank's shards of ``model`` (megatron, any layout) from the HF checkpoint in ``hf_dir``, reading
    only the slices they cover. Returns ``{"bytes_read", "shards"}``. Needs no collective."""
    from nsr_megatron.models.state import iter_sharded_tensors

    rules = weight_rules(arch)
    by_key: dict[str, TensorRule] = {}
    for r in rules:
        by_key[r.key] = r
        for alias in r.aliases:
            by_key[alias] = r
    if arch.tie_word_embeddings:  # a last pipeline stage holds its own copy of the tied embedding
        by_key["output_layer.weight"] = by_key["embedding.word_embeddings.weight"]
    ckpt = HFCheckpoint(Path(hf_dir))
    shards = 0
    try:
        for sh in iter_sharded_tensors(model):
            rule = by_key.get(sh.key)
            if rule is None:
                raise ConvertError(f"the model holds {sh.key} (global shape {list(sh.global_shape)}), which the HF "
                                   f"mapping of {arch.model_type} does not know.")
            if tuple(sh.global_shape) != rule.shape:
                raise ConvertError(f"{sh.key}: the model's global shape {list(sh.global_shape)} differs from the "
                                   f"config's {list(rule.shape)}.")
            shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            block = read_canonical_block(rule, ckpt, tuple(sh.global_offset), shape)
            sh.data.copy_(block.reshape(sh.data.shape))
            shards += 1
    finally:
        ckpt.close()
    return {"bytes_read": ckpt.bytes_read, "shards": shards}



def read_hf_canonical(hf_dir: str | os.PathLike[str], arch: ArchSpec) -> dict[str, torch.Tensor]:
    """The whole checkpoint as canonical fp32 tensors, read in full (small models and tests; runs load sharded)."""
    from nsr_megatron.convert.mapping import hf_state_to_canonical

    ckpt = HFCheckpoint(Path(hf_dir))
    try:
        tensors = {name: ckpt.read(name) for name in ckpt.tensors}
    finally:
        ckpt.close()
    return {k: v.float() for k, v in hf_state_to_canonical(arch, tensors).items()}


class HFExport:
    """The model's weights as full HF-named tensors, gathered group-locally (:class:`~nsr_megatron.models.export.
    WeightExporter`) and split by the converter's rules. ``for name, tensor in HFExport(model, arch).tensors():``
    yields on rank 0 and nothing elsewhere; every rank must run it to the end."""

    def __init__(self, model: torch.nn.Module, arch: ArchSpec) -> None:
        from nsr_megatron.models.export import WeightExporter

        self.rules = weight_rules(arch)
        aliases = {alias: r.key for r in self.rules for alias in r.aliases}
        self.exporter = WeightExporter(model, [r.key for r in self.rules], aliases)
        self._by_key = {r.key: r for r in self.rules}

    @torch.no_grad()
    def write_into(self, targets: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Copy this rank's own shards (its main replicas) into each of ``targets`` (HF name -> full tensor, e.g.
        a rollout engine's shared weights), split by the converter's rules. When every rank does so, each target
        holds exactly what :meth:`tensors` yields, and nothing moved between ranks. The first call is a
        collective (it checks that the ranks' shards cover every tensor once)."""
        self.exporter.plan()
        for key, chunks in self.exporter.local_chunks().items():
            rule = self._by_key[key]
            for (offset, shape), data in chunks:
                block = data.detach().reshape(shape)
                for views in targets:
                    write_canonical_block(rule, views, offset, block)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from nsr_megatron.convert.mapping import canonical_to_hf

        for key, full in self.exporter.export():
            yield from canonical_to_hf(self._by_key[key], full).items()
