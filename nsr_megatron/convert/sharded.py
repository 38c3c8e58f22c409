"""Sharded loading (every rank reads only the HF slices it owns) and the HF-named export of a sharded model.

A rank's model holds *shards* of the canonical tensors (:mod:`.mapping`): a block ``[offset, offset + shape)`` of
each, given by megatron's sharded state dict (tensor-parallel rows or columns, a PP stage's layers, an EP rank's
experts, the gate and up halves of SwiGLU). :func:`read_canonical_block` builds such a block from the HF tensors
through the same rules the converter uses, reading only the rows (and columns) the block needs: each rule's kind
(:mod:`nsr_megatron.models.rules`) knows which HF rows a range of its rows comes from (``[gate; up]`` halves,
``qkv`` query groups), and the leading layer axis (stacked dense layers) or expert axis picks which HF tensors are
read at all.

Replicated tensors (norms; attention under expert parallelism) are read whole by every rank that holds them. The
result equals a full load bitwise; :attr:`HFCheckpoint.bytes_read` counts what was read.

Legend: R rows of a block.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from nsr_megatron.convert.io import DistCheckpointReader, HFCheckpoint
from nsr_megatron.convert.mapping import (
    ConvertError,
    Piece,
    TensorRule,
    check_canonical_tensors,
    uses_stacked_layers,
    weight_rules,
)
from nsr_megatron.models.hf_config import ArchSpec

__all__ = ["HFExport", "load_hf_sharded", "load_mcore_sharded", "read_canonical_block", "read_hf_canonical",
           "write_canonical_block"]


def _inner_block(rule: TensorRule, piece: Piece, ckpt: HFCheckpoint, offset: tuple[int, ...],
                 shape: tuple[int, ...]) -> torch.Tensor:
    """Rows ``[offset[0], +shape[0])`` (and columns, for 2-D) of one layer's / expert's tensor of ``rule``."""
    rows = slice(offset[0], offset[0] + shape[0])
    if rule.kind.fused:  # the kind maps whole experts (rows): read them, cut the other axes here
        whole = rule.kind.read_rows(ckpt.read_block, [rule.hf_names[j] for j in piece.hf_index],
                                    [rule.hf_shapes[j] for j in piece.hf_index], rows, None)
        return whole[(slice(None), *(slice(o, o + n) for o, n in zip(offset[1:], shape[1:], strict=True)))]
    cols = slice(offset[1], offset[1] + shape[1]) if len(shape) > 1 else None
    return rule.kind.read_rows(ckpt.read_block, [rule.hf_names[j] for j in piece.hf_index],
                               [rule.hf_shapes[j] for j in piece.hf_index], rows, cols)


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
    if rule.kind.fused:  # the kind maps whole experts (rows): rewrite them with the block's part changed
        rows = slice(offset[0], offset[0] + block.shape[0])
        names = [rule.hf_names[j] for j in piece.hf_index]
        missing = [n for n in names if n not in views]
        if missing:
            raise ConvertError(f"the weights to write into lack {missing[0]} (the engine and the model disagree).")
        whole = rule.kind.to_megatron([views[n][rows] for n in names])
        whole[(slice(None), *(slice(o, o + n) for o, n in zip(offset[1:], block.shape[1:], strict=True)))] = block
        for n, t in zip(names, rule.kind.to_hf(whole), strict=True):
            views[n][rows].copy_(t)
        return
    cols = (slice(offset[1], offset[1] + block.shape[1]),) if block.dim() > 1 else ()

    def put(name: str, lo: int, hi: int, src: torch.Tensor) -> None:  # rows [lo, hi) of HF tensor ``name``
        dest = views.get(name)
        if dest is None:
            raise ConvertError(f"the weights to write into lack {name} (the engine and the model disagree).")
        dest[(slice(lo, hi), *cols)].copy_(src)

    rule.kind.write_rows(put, [rule.hf_names[j] for j in piece.hf_index], [rule.hf_shapes[j] for j in piece.hf_index],
                         slice(offset[0], offset[0] + block.shape[0]), block)


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


@torch.no_grad()
def load_mcore_sharded(model: torch.nn.Module, arch: ArchSpec, step_dir: str | os.PathLike[str]) -> int:
    """Copy this rank's shards of ``model`` (megatron, any layout) from the dist checkpoint in ``step_dir`` (saved
    under any layout, or converted), reading only the blocks they cover. The weights only: what a frozen model needs.
    Returns the number of shards written. Needs no collective."""
    from nsr_megatron.models.state import iter_sharded_tensors

    path = Path(step_dir)
    reader = DistCheckpointReader(path)
    rules = weight_rules(arch, stacked_layers=uses_stacked_layers(reader.shapes()))
    stored = check_canonical_tensors(rules, reader.shapes(), where=f"checkpoint {path}")
    for r in rules:
        stored.update(dict.fromkeys(r.aliases, stored[r.key]))
    if arch.tie_word_embeddings:  # a last pipeline stage holds its own copy of the tied embedding
        stored["output_layer.weight"] = stored["embedding.word_embeddings.weight"]
    shards = list(iter_sharded_tensors(model))
    requests = []
    for sh in shards:
        if sh.key not in stored:
            raise ConvertError(f"the model holds {sh.key}, which checkpoint {path} does not hold (its layers are keyed "
                               f"{'stacked' if uses_stacked_layers(reader.shapes()) else 'one by one'}); convert it "
                               "again with the default layer keys.")
        requests.append((stored[sh.key], tuple(sh.global_offset), (1,) * sh.prepend_axis_num + tuple(sh.local_shape)))
    unique = list(dict.fromkeys(requests))  # a tensor two modules share is one block
    blocks = dict(zip(unique, reader.load(unique), strict=True))  # one read of this rank's blocks
    for sh, request in zip(shards, requests, strict=True):
        sh.data.copy_(blocks[request].reshape(sh.data.shape))
    return len(shards)


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
