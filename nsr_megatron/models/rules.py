"""The words model families declare their HF <-> Megatron-Core weight conversion in.

A :class:`TensorRule` relates one *canonical* tensor (the full, unsharded megatron tensor, keyed by its
dist-checkpoint key) to the HF tensors it is made of. Its ``kind`` says how they combine, and carries that
behaviour both ways and for row ranges:

- :meth:`RuleKind.to_megatron` / :meth:`RuleKind.to_hf`: one layer's (or one expert's) HF tensors <-> its block;
- :meth:`RuleKind.read_rows` / :meth:`RuleKind.write_rows`: the same for a range of the block's rows (and columns),
  touching only the HF rows it covers: what sharded loading and export use (:mod:`nsr_megatron.convert.sharded`).

The kinds: :class:`Copy` (one HF tensor as it is), :class:`GateUp` (``[gate; up]`` of a SwiGLU MLP),
:class:`QKV` (megatron's per-group ``[q_g; k_g; v_g]`` rows) and :class:`FusedExperts` (every expert of a layer in
one HF tensor, as transformers keeps them for some families); ``experts=True`` gives the canonical tensor a
leading expert axis, one HF tensor set per expert (or, with ``fused``, the expert axis of the HF tensors too).

Legend: R rows, C columns of a block; G query groups, D head_dim, P query heads per group, F rows of ``gate``
(and of ``up``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["LAYERS", "Copy", "FusedExperts", "GateUp", "Piece", "QKV", "RuleKind", "Shape", "TensorRule", "copy_rule"]

Shape = tuple[int, ...]
LAYERS = "decoder.layers."  # megatron's key prefix of the transformer layers
# read(HF name, rows, columns or None) -> that block of the HF tensor
ReadRows = Callable[[str, slice, "slice | None"], torch.Tensor]
# put(HF name, first row, end row, rows) copies ``rows`` into rows [first, end) of the HF tensor
PutRows = Callable[[str, int, int, torch.Tensor], None]


class RuleKind:
    """How the HF tensors of one layer (or one expert) make one block of a canonical tensor.

    ``names`` / ``shapes`` are that block's HF tensors in the order the kind combines them; ``rows`` is a row
    range ``[start, stop)`` of the block and ``cols`` its columns (None: all, or a 1-D tensor).
    """

    experts: bool = False  # the canonical tensor has a leading expert axis: one piece per expert (unless fused)
    # the HF tensors hold the expert axis too (all experts in one tensor): the whole tensor is one piece, and the kind
    # maps whole rows (experts) only; sharded reads cut the other axes in memory, sharded writes rewrite whole rows
    fused: bool = False

    def to_megatron(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The block from its HF tensors."""
        raise NotImplementedError

    def to_hf(self, block: torch.Tensor) -> list[torch.Tensor]:
        """The HF tensors of ``block`` (views where possible): the inverse of :meth:`to_megatron`."""
        raise NotImplementedError

    def read_rows(self, read: ReadRows, names: Sequence[str], shapes: Sequence[Shape], rows: slice,
                  cols: slice | None) -> torch.Tensor:
        """Rows ``rows`` (and columns ``cols``) of the block, reading only the HF rows they cover."""
        raise NotImplementedError

    def write_rows(self, put: PutRows, names: Sequence[str], shapes: Sequence[Shape], rows: slice,
                   block: torch.Tensor) -> None:
        """Copy ``block``, rows ``rows`` of the whole block, into the HF rows it came from."""
        raise NotImplementedError


@dataclass(frozen=True)
class Copy(RuleKind):
    """One HF tensor, as it is (with ``experts``: one per expert)."""

    experts: bool = False

    def to_megatron(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0]

    def to_hf(self, block: torch.Tensor) -> list[torch.Tensor]:
        return [block]

    def read_rows(self, read: ReadRows, names: Sequence[str], shapes: Sequence[Shape], rows: slice,
                  cols: slice | None) -> torch.Tensor:
        return read(names[0], rows, cols)

    def write_rows(self, put: PutRows, names: Sequence[str], shapes: Sequence[Shape], rows: slice,
                   block: torch.Tensor) -> None:
        put(names[0], rows.start, rows.stop, block)


@dataclass(frozen=True)
class GateUp(RuleKind):
    """``[gate; up]``: a SwiGLU MLP's gate [F, ...] and up [F, ...] projections stacked row-wise, [2F, ...]."""

    experts: bool = False

    def to_megatron(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(tensors), dim=0)  # [2F, H] = [gate; up]

    def to_hf(self, block: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.chunk(block, 2, dim=0))

    def read_rows(self, read: ReadRows, names: Sequence[str], shapes: Sequence[Shape], rows: slice,
                  cols: slice | None) -> torch.Tensor:
        half, r0, r1 = shapes[0][0], rows.start, rows.stop  # F: [gate (F rows); up (F rows)]
        parts = []
        if r0 < half:
            parts.append(read(names[0], slice(r0, min(r1, half)), cols))
        if r1 > half:
            parts.append(read(names[1], slice(max(r0, half) - half, r1 - half), cols))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def write_rows(self, put: PutRows, names: Sequence[str], shapes: Sequence[Shape], rows: slice,
                   block: torch.Tensor) -> None:
        half, r0, r1 = shapes[0][0], rows.start, rows.stop
        if r0 < half:
            put(names[0], r0, min(r1, half), block[: min(r1, half) - r0])
        if r1 > half:
            put(names[1], max(r0, half) - half, r1 - half, block[max(r0, half) - r0 :])


@dataclass(frozen=True)
class QKV(RuleKind):
    """Fused attention input projection: HF keeps all queries [G*P*D, ...], then all keys [G*D, ...], then all
    values [G*D, ...]; megatron keeps, per query group g, its P query heads, its key head and its value head:
    rows ``[q_g0 (P*D); k_g0 (D); v_g0 (D); q_g1; ...]``, [G*(P+2)*D, ...]. Query head h is in group ``h // P``."""

    heads_per_group: int  # P
    head_dim: int  # D
    groups: int  # G

    def to_megatron(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        q, k, v = tensors  # [G*P*D, ...], [G*D, ...], [G*D, ...]
        rest = q.shape[1:]
        G, D = self.groups, self.head_dim
        grouped = [q.reshape(G, self.heads_per_group * D, *rest), k.reshape(G, D, *rest), v.reshape(G, D, *rest)]
        return torch.cat(grouped, dim=1).reshape(G * (self.heads_per_group + 2) * D, *rest)  # [G*(P+2)*D, ...]

    def to_hf(self, block: torch.Tensor) -> list[torch.Tensor]:
        G, D, per = self.groups, self.head_dim, self.heads_per_group
        rest = block.shape[1:]
        q, k, v = torch.split(block.reshape(G, (per + 2) * D, *rest), [per * D, D, D], dim=1)
        return [q.reshape(G * per * D, *rest), k.reshape(G * D, *rest), v.reshape(G * D, *rest)]

    def read_rows(self, read: ReadRows, names: Sequence[str], shapes: Sequence[Shape], rows: slice,
                  cols: slice | None) -> torch.Tensor:
        per, D, r0, r1 = self.heads_per_group, self.head_dim, rows.start, rows.stop
        size = (per + 2) * D  # rows of one query group
        g0, g1 = r0 // size, -(-r1 // size)  # the groups the rows touch
        q = read(names[0], slice(g0 * per * D, g1 * per * D), cols)  # [(g1-g0)*P*D, C]
        k = read(names[1], slice(g0 * D, g1 * D), cols)
        v = read(names[2], slice(g0 * D, g1 * D), cols)
        rest = q.shape[1:]
        n = g1 - g0
        grouped = torch.cat([q.reshape(n, per * D, *rest), k.reshape(n, D, *rest), v.reshape(n, D, *rest)], dim=1)
        return grouped.reshape(n * size, *rest)[r0 - g0 * size : r1 - g0 * size]

    def write_rows(self, put: PutRows, names: Sequence[str], shapes: Sequence[Shape], rows: slice,
                   block: torch.Tensor) -> None:
        per, D, r0, r1 = self.heads_per_group, self.head_dim, rows.start, rows.stop
        size = (per + 2) * D  # rows of one query group: [q (P*D); k (D); v (D)]
        for g in range(r0 // size, -(-r1 // size)):
            for name, lo, hi, hf0 in ((names[0], 0, per * D, g * per * D), (names[1], per * D, (per + 1) * D, g * D),
                                      (names[2], (per + 1) * D, size, g * D)):
                a, b = max(r0, g * size + lo), min(r1, g * size + hi)  # canonical rows of this part in the block
                if a < b:
                    start = hf0 + a - (g * size + lo)
                    put(name, start, start + b - a, block[a - r0 : b - r0])


@dataclass(frozen=True)
class FusedExperts(RuleKind):
    """Every expert of one layer in one HF tensor (axis 0 = experts, as in the canonical tensor), HF [E, A, B] or
    [E, B] -> canonical [E, ...]. ``transpose``: the HF tensor holds ``x @ W`` weights, [E, in, out], where megatron
    (like ``nn.Linear``) keeps [E, out, in]: the last two axes swap. ``interleaved``: HF's output axis alternates
    gate and up (``gate_j`` at ``2j``, ``up_j`` at ``2j + 1``, 2F wide) where megatron keeps ``[gate (F); up (F)]``.
    Rows are experts: :meth:`read_rows` reads whole experts (and cuts ``cols`` in memory), :meth:`write_rows`
    writes whole experts."""

    transpose: bool = False
    interleaved: bool = False
    experts: bool = True
    fused: bool = True

    def to_megatron(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        t = tensors[0]  # [E, in, out] or [E, out]
        if self.interleaved:
            t = torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)  # [..., gate (F) | up (F)]
        return (t.transpose(-1, -2) if self.transpose else t).contiguous()  # [E, out, in] or [E, out]

    def to_hf(self, block: torch.Tensor) -> list[torch.Tensor]:
        t = block.transpose(-1, -2) if self.transpose else block  # [E, in, out] or [E, out]
        if self.interleaved:
            gate, up = t.chunk(2, dim=-1)
            t = torch.stack([gate, up], dim=-1).flatten(-2)  # gate_j, up_j side by side
        return [t.contiguous()]

    def read_rows(self, read: ReadRows, names: Sequence[str], shapes: Sequence[Shape], rows: slice,
                  cols: slice | None) -> torch.Tensor:
        block = self.to_megatron([read(names[0], rows, None)])  # whole experts
        return block if cols is None else block[:, cols]

    def write_rows(self, put: PutRows, names: Sequence[str], shapes: Sequence[Shape], rows: slice,
                   block: torch.Tensor) -> None:
        put(names[0], rows.start, rows.stop, self.to_hf(block)[0])  # whole experts


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
    kind: RuleKind  # how the HF tensors of one layer (or expert) combine
    hf_names: tuple[str, ...]  # the HF tensors, in the order ``kind`` combines them (layer-major if stacked)
    hf_shapes: tuple[Shape, ...]
    layer: int  # the layer of a per-layer tensor; -1 before the layers, num_layers after
    stacked: bool = False  # axis 0 is the layer axis: one piece per layer
    aliases: tuple[str, ...] = ()  # other canonical keys a checkpoint may hold this tensor under
    linear: bool = False  # the weight of a linear layer: megatron keeps an ``_extra_state`` beside it
    tied_hf_name: str = ""  # an HF tensor equal to this one when the embeddings are tied (tolerated, ignored)

    @property
    def leading_axis(self) -> bool:
        """Whether axis 0 indexes layers (stacked) or experts held one by one in HF: one piece per index."""
        return self.stacked or (self.kind.experts and not self.kind.fused)

    @property
    def inner_shape(self) -> Shape:
        """The shape of one layer's tensor (the whole shape unless stacked)."""
        return self.shape[1:] if self.stacked else self.shape

    @property
    def pieces(self) -> tuple[Piece, ...]:
        rank = len(self.shape)
        if self.leading_axis:
            per = len(self.hf_names) // self.shape[0]
            return tuple(
                Piece(
                    offset=(i,) + (0,) * (rank - 1),
                    shape=(1, *self.shape[1:]),
                    hf_index=tuple(range(i * per, (i + 1) * per)),
                    layer=i if self.stacked else self.layer,
                )
                for i in range(self.shape[0])
            )
        return (Piece(offset=(0,) * rank, shape=self.shape, hf_index=tuple(range(len(self.hf_names))),
                      layer=self.layer),)


def copy_rule(key: str, hf_name: str, shape: Shape, *, layer: int, aliases: tuple[str, ...] = (),
              linear: bool = False, tied_hf_name: str = "") -> TensorRule:
    """A canonical tensor that is one HF tensor as it is."""
    return TensorRule(key=key, shape=shape, kind=Copy(), hf_names=(hf_name,), hf_shapes=(shape,), layer=layer,
                      aliases=aliases, linear=linear, tied_hf_name=tied_hf_name)
