"""Group-local export of a sharded megatron model's weights as full canonical tensors, one tensor at a time.

Every rank holds shards of the canonical tensors (see :mod:`nsr_megatron.models.state`). To push weights to a
rollout engine, the sync rank (global rank 0) needs each full tensor once, in model order. :class:`WeightExporter`
moves each tensor only from the ranks that hold its main replica to rank 0:

- a tensor-parallel tensor comes from the ranks of its TP group (or, for experts, its expert-TP x EP group) on the
  pipeline stage that owns it, from data-parallel rank 0 only; each sends its shard straight to rank 0, which
  receives it into place in the full tensor (a gather onto the sync rank, without an intermediate hop);
- a replicated tensor (norms, a router under TP) comes from the one rank that holds its main replica;
- what rank 0 holds itself is copied into place (or, when it holds the whole tensor, used as it is).

Nothing is reduced over the whole world; rank 0 holds one full tensor at a time beyond what the consumer keeps.
The plan (who holds which blocks of which tensor, dtypes) is built once per model with one ``all_gather_object``;
later exports only move tensor data. Every rank must run the export to its end.

Shape legend: K chunks a rank holds of one tensor (e.g. its experts, or the gate and up halves of SwiGLU).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nsr_megatron.models.state import iter_sharded_tensors

__all__ = ["WeightExporter"]

Chunk = tuple[tuple[int, ...], tuple[int, ...]]  # (global offset, padded local shape) of one block


def _main(replica_id: Any) -> bool:
    return replica_id == 0 if isinstance(replica_id, int) else all(r == 0 for r in replica_id)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class _Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    holders: dict[int, list[Chunk]]  # global rank -> its main-replica chunks (sorted by offset)


class WeightExporter:
    """``for key, tensor in WeightExporter(model, order).export(): ...`` (see the module docstring).

    ``order`` lists the canonical keys in the order they are wanted (the HF mapping's rule order); ``aliases`` maps
    other keys a model may use (Transformer Engine's) onto them. Model keys outside ``order`` (the copy of a tied
    embedding on the last pipeline stage) are not exported.
    """

    def __init__(self, model: torch.nn.Module, order: Sequence[str], aliases: dict[str, str] | None = None) -> None:
        self.model = model
        self.order = list(order)
        self.aliases = aliases or {}
        self._wanted = set(self.order)
        self._plan: list[_Entry] | None = None

    def local_chunks(self) -> dict[str, list[tuple[Chunk, torch.Tensor]]]:
        """This rank's main-replica chunks per canonical key, sorted by offset (the ranks' chunks together cover
        every tensor of ``order`` once: :meth:`plan` checks it)."""
        out: dict[str, list[tuple[Chunk, torch.Tensor]]] = {}
        for sh in iter_sharded_tensors(self.model):
            key = self.aliases.get(sh.key, sh.key)
            if key in self._wanted and _main(sh.replica_id):
                shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
                out.setdefault(key, []).append(((tuple(sh.global_offset), shape), sh.data))
        for chunks in out.values():
            chunks.sort(key=lambda c: c[0][0])
        return out

    def _build_plan(self, local: dict[str, list[tuple[Chunk, torch.Tensor]]]) -> list[_Entry]:
        shapes = {sh.key: tuple(sh.global_shape) for sh in iter_sharded_tensors(self.model)}
        mine = {k: ([c for c, _ in v], shapes[_first_key(self.aliases, k, shapes)], v[0][1].dtype)
                for k, v in local.items()}
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        plan = []
        for key in self.order:
            holders = {r: info[key][0] for r, info in enumerate(everyone) if key in info}
            if not holders:
                raise RuntimeError(f"no rank holds the main replica of {key}: the model and the mapping disagree.")
            _, shape, dtype = everyone[min(holders)][key]
            covered = sum(_numel(s) for chunks in holders.values() for _, s in chunks)
            if covered != _numel(shape):
                raise RuntimeError(f"{key}: the ranks' main replicas cover {covered} of {_numel(shape)} elements.")
            plan.append(_Entry(key=key, shape=shape, dtype=dtype, holders=holders))
        return plan

    def plan(self, local: dict[str, list[tuple[Chunk, torch.Tensor]]] | None = None) -> list[_Entry]:
        """Build, once, the plan of who holds which blocks (a collective: every rank calls it), checking that the
        ranks' main replicas cover every tensor exactly."""
        if self._plan is None:
            self._plan = self._build_plan(self.local_chunks() if local is None else local)
        return self._plan

    def export(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(canonical key, full tensor)`` on rank 0, in ``order``; other ranks yield nothing but must run
        the iterator to its end (they send their shards). A yielded tensor is valid until the next one is produced
        (it lives in a scratch buffer reused for every tensor, or is a view of rank 0's own parameter): copy what
        must outlive it."""
        local = self.local_chunks()
        plan = self.plan(local)
        rank = dist.get_rank()
        self._scratch: torch.Tensor | None = None
        for entry in plan:
            if rank == 0:
                yield entry.key, self._receive(entry, local.get(entry.key, []))
            elif rank in entry.holders:
                mine = [data for _, data in local[entry.key]]
                flat = mine[0].reshape(-1) if len(mine) == 1 else torch.cat([d.reshape(-1) for d in mine])
                dist.send(flat.contiguous(), dst=0)

    def _receive(self, e: _Entry, mine: list[tuple[Chunk, torch.Tensor]]) -> torch.Tensor:
        if list(e.holders) == [0] and len(mine) == 1 and mine[0][0][1] == e.shape:
            return mine[0][1].detach().reshape(e.shape)  # rank 0 holds the whole tensor
        full = self._buffer(e)
        for chunk, data in mine:
            full[_index(chunk)] = data.reshape(chunk[1])
        for r, chunks in sorted(e.holders.items()):
            if r == 0:
                continue
            region = _contiguous_region(chunks, e.shape)
            if region is not None:  # the sender's blocks are one contiguous run of the full tensor: receive in place
                dist.recv(full.view(-1)[region[0] : region[1]], src=r)
                continue
            got = torch.empty(sum(_numel(s) for _, s in chunks), dtype=e.dtype, device=full.device)
            dist.recv(got, src=r)
            start = 0
            for chunk in chunks:
                n = _numel(chunk[1])
                full[_index(chunk)] = got[start : start + n].view(chunk[1])
                start += n
        return full

    def _buffer(self, e: _Entry) -> torch.Tensor:
        """A tensor of ``e``'s shape in the scratch buffer (grown to the largest tensor; its pages stay mapped)."""
        nbytes = _numel(e.shape) * torch.empty((), dtype=e.dtype).element_size()
        if self._scratch is None or self._scratch.numel() < nbytes:
            largest = max(_numel(x.shape) * torch.empty((), dtype=x.dtype).element_size() for x in self._plan or [e])
            self._scratch = torch.empty(largest, dtype=torch.uint8, device=self._device())
        return self._scratch[:nbytes].view(e.dtype).view(e.shape)

    @staticmethod
    def _device() -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _first_key(aliases: dict[str, str], key: str, shapes: dict[str, tuple[int, ...]]) -> str:
    """The model's own key for canonical ``key`` (itself, or an alias of it)."""
    if key in shapes:
        return key
    return next(k for k, v in aliases.items() if v == key and k in shapes)


def _index(chunk: Chunk) -> tuple[slice, ...]:
    offset, shape = chunk
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def _contiguous_region(chunks: list[Chunk], shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(start, end)`` in the flattened full tensor when ``chunks``, in order, form one contiguous run of it (as
    an expert-parallel rank's experts or a column-parallel rank's rows do); None otherwise."""
    start = end = None
    for offset, size in chunks:
        first = next((i for i, n in enumerate(size) if n != 1), len(size))  # dims before it have size 1
        if any(size[i] != shape[i] for i in range(first + 1, len(shape))):  # ... and all dims after it are whole
            return None
        begin = sum(o * _numel(shape[i + 1 :]) for i, o in enumerate(offset))
        if end is not None and begin != end:
            return None
        start = begin if start is None else start
        end = begin + _numel(size)
    return None if start is None or end is None else (start, end)
