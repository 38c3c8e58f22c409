"""Weight sync: HF-named tensors packed into flat buckets, and the process group that broadcasts them to engines.

:func:`buckets` packs a stream of ``(name, tensor)`` into :class:`FlatBucket` s in SGLang's ``flattened_bucket``
layout: one contiguous uint8 buffer holding each tensor's raw bytes in order, without padding, and the names,
dtypes and shapes that describe it. A bucket holds at most ``bucket_bytes`` (a larger tensor gets a bucket of its
own) and one dtype (so every tensor starts at a multiple of its element size, as SGLang requires). A bucket owns its
bytes: the producer can free each full tensor as soon as it is packed, so the sender holds at most the bucket being
filled, the bucket being pushed, and one full tensor.

:class:`WeightUpdateGroup` is the trainer's side of SGLang's ``/init_weights_update_group``: the trainer is rank 0
of a process group of its own (not the training world) that the engines' ranks join, built from
``torch.distributed``'s exported classes with the store key layout torch's group helper uses, so real SGLang
(another torch version) and the project's server (:func:`join_weight_update_group`) both join it. gloo on CPU, NCCL
on GPUs. The producer of the tensors is the trainer's group-local export; nothing here imports megatron.

Shared memory (``rollout.weight_sync=shared_memory``, engines of the project's server on the trainer's host):
:func:`share_parameters` moves an engine's parameters into one anonymous shared-memory file (``memfd``) that lives
as long as the engine; its :class:`SharedLayout` says where each HF-named weight sits in it (dtype, shape, stride,
offset). Every trainer rank maps that file (:class:`SharedMappings`, kept between syncs: mapping pages is what
costs) and copies its own shards straight into the engine's weights: no gather on a sync rank, no buckets, no
transport, one copy per byte.
"""

from __future__ import annotations

import datetime
import os
import socket
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["FlatBucket", "SharedLayout", "SharedMappings", "WeightUpdateGroup", "buckets",
           "join_weight_update_group", "share_parameters"]


@dataclass
class FlatBucket:
    """``data`` [nbytes] uint8 holds the tensors of ``names`` / ``dtypes`` / ``shapes`` back to back."""

    data: torch.Tensor
    names: list[str] = field(default_factory=list)
    dtypes: list[torch.dtype] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` views into ``data``."""
        return unpack(self.data, self.names, self.dtypes, self.shapes)

    def dtype_names(self) -> list[str]:
        return [str(d).removeprefix("torch.") for d in self.dtypes]


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def unpack(data: torch.Tensor, names: list[str], dtypes: list[torch.dtype],
           shapes: list[tuple[int, ...]]) -> list[tuple[str, torch.Tensor]]:
    """Views of the tensors packed back to back in the uint8 buffer ``data`` (the flattened-bucket layout)."""
    out, start = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        n = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if start % torch.empty((), dtype=dtype).element_size():
            raise ValueError(f"flattened bucket: {name} ({dtype}) starts at byte {start}, not a multiple of its "
                             "element size; put one dtype per bucket.")
        out.append((name, data[start : start + n].view(dtype).view(shape)))
        start += n
    if start != data.numel():
        raise ValueError(f"flattened bucket: the tensors take {start} bytes but the buffer holds {data.numel()}.")
    return out


def buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[FlatBucket]:
    """Pack ``(name, tensor)`` pairs, in order, into flat buckets of at most ``bucket_bytes`` bytes and one dtype
    (a tensor larger than that is packed alone). Tensors are copied, on their device, into the bucket.

    Two buffers take turns (their pages stay mapped, which matters more than the copy itself): a yielded bucket
    stays valid until the one after it has been yielded too, so consume each bucket before asking for the next
    but one."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be >= 1 (e.g. rollout.update_bucket_mb=512).")
    spare: list[torch.Tensor] = []  # buffers free to fill again

    def take(n: int, device: torch.device) -> torch.Tensor:
        while spare:
            got = spare.pop()
            if got.numel() >= n and got.device == device:
                return got
        return torch.empty(max(bucket_bytes, n), dtype=torch.uint8, device=device)

    held: list[torch.Tensor] = []  # the buffers of the last two yielded buckets
    buffer: torch.Tensor | None = None
    bucket = FlatBucket(torch.empty(0, dtype=torch.uint8))
    used = 0
    for name, tensor in named:
        n = tensor.numel() * tensor.element_size()
        if buffer is not None and (used + n > max(bucket_bytes, used) or tensor.dtype != bucket.dtypes[0]
                                   or buffer.device != tensor.device):
            bucket.data = buffer[:used]
            yield bucket
            held.append(buffer)
            if len(held) > 1:
                spare.append(held.pop(0))
            buffer, bucket, used = None, FlatBucket(torch.empty(0, dtype=torch.uint8)), 0
        if buffer is None:
            buffer = take(n, tensor.device)
        buffer[used : used + n].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        bucket.names.append(name)
        bucket.dtypes.append(tensor.dtype)
        bucket.shapes.append(tuple(tensor.shape))
        used += n
    if buffer is not None:
        bucket.data = buffer[:used]
        yield bucket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _group(store: Any, rank: int, world_size: int, group_name: str, backend: str,
           timeout: datetime.timedelta) -> Any:
    """The process group on ``store`` with torch's key layout for a named group (so that a peer creating it with
    ``torch.distributed``'s group helper, as SGLang does, meets the same keys)."""
    device = "cpu" if backend == "gloo" else "cuda"
    prefixed = dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, store)))
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, world_size, dist.ProcessGroupNCCL.Options())
    raise ValueError(f"weight update backend {backend!r} is not one of gloo, nccl.")


def _broadcast(pg: Any, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    pg.broadcast([tensor], opts).wait()


class WeightUpdateGroup:
    """The trainer's end (rank 0) of a weight-update group that ``world_size - 1`` engine ranks join.

    Create it, then ask every engine to join (``/init_weights_update_group``, sent from threads, with
    :attr:`address`, :attr:`port`, :attr:`name`, :attr:`backend`), then call :meth:`open`, which blocks until they
    have; then :meth:`broadcast` sends a tensor to every engine rank.
    """

    def __init__(self, world_size: int, *, name: str, backend: str | None = None, host: str = "127.0.0.1",
                 timeout_s: float = 600.0) -> None:
        self.world_size = world_size
        self.name = name
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.address = host
        self.port = free_port(host)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._store: Any = None
        self._pg: Any = None

    def open(self) -> None:
        self._store = dist.TCPStore(self.address, self.port, self.world_size, is_master=True, timeout=self.timeout)
        self._pg = _group(self._store, 0, self.world_size, self.name, self.backend, self.timeout)

    def broadcast(self, tensor: torch.Tensor) -> None:
        if self._pg is None:
            raise RuntimeError("WeightUpdateGroup.broadcast before open().")
        _broadcast(self._pg, tensor)

    def close(self) -> None:
        pg, self._pg, self._store = self._pg, None, None
        if pg is not None and hasattr(pg, "shutdown"):
            pg.shutdown()


class JoinedGroup:
    """An engine's end of a weight-update group (:func:`join_weight_update_group`)."""

    def __init__(self, store: Any, pg: Any) -> None:
        self._store, self._pg = store, pg

    def receive(self, tensor: torch.Tensor) -> None:
        """Fill ``tensor`` with what rank 0 broadcasts."""
        _broadcast(self._pg, tensor)

    def close(self) -> None:
        if hasattr(self._pg, "shutdown"):
            self._pg.shutdown()


def join_weight_update_group(*, master_address: str, master_port: int, rank: int, world_size: int,
                             group_name: str, backend: str, timeout_s: float = 600.0) -> JoinedGroup:
    """Join the group a trainer's :class:`WeightUpdateGroup` opens (the project's server calls this for
    ``/init_weights_update_group``)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, is_master=False, timeout=timeout)
    return JoinedGroup(store, _group(store, rank, world_size, group_name, backend, timeout))


# ---------------------------------------------------------------------------------------------- shared memory
@dataclass(frozen=True)
class SharedLayout:
    """Where an engine's weights sit in its shared-memory file (the reply of the project's ``/shared_weights``).

    ``path`` opens the file from another process of the same user (``/proc/<pid>/fd/<fd>``); ``id`` is new for
    every engine process; ``tensors`` maps each HF name to ``(dtype, shape, stride, offset)``, the offset and
    strides in elements of that dtype."""

    id: str
    path: str
    nbytes: int
    host: str
    tensors: dict[str, tuple[str, tuple[int, ...], tuple[int, ...], int]]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "nbytes": self.nbytes, "host": self.host,
                "tensors": {n: {"dtype": d, "shape": list(s), "stride": list(st), "offset": o}
                            for n, (d, s, st, o) in self.tensors.items()}}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SharedLayout:
        try:
            tensors = {str(n): (str(t["dtype"]), tuple(int(x) for x in t["shape"]),
                                tuple(int(x) for x in t["stride"]), int(t["offset"]))
                       for n, t in body["tensors"].items()}
            bad = sorted({d for d, _, _, _ in tensors.values() if not isinstance(getattr(torch, d, None), torch.dtype)})
            if bad:
                raise ValueError(f"dtype(s) {bad} are not torch dtype names")
            return cls(id=str(body["id"]), path=str(body["path"]), nbytes=int(body["nbytes"]), host=str(body["host"]),
                       tensors=tensors)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"a shared-weights layout needs id, path, nbytes, host and tensors "
                             f"{{name: {{dtype, shape, stride, offset}}}}: {exc!r}") from None


_ALIGN = 64  # bytes: every parameter starts on a cache line; the file's first 64 bytes are its header


def _header(layout_id: str) -> bytes:
    """The first bytes of an engine's shared-weights file: a writer checks them before it maps the file."""
    return f"nsr-megatron shared weights {layout_id}".encode().ljust(_ALIGN, b"\0")


def share_parameters(params: Iterable[torch.Tensor],
                     named: Iterable[tuple[str, torch.Tensor]]) -> tuple[SharedLayout, torch.Tensor]:
    """Move ``params`` (CPU tensors: parameters, buffers; each once) into one new shared-memory file and describe
    the views ``named`` (views of those tensors, by HF name) in it. Returns the layout and the file's uint8
    mapping, which the caller keeps alive (the tensors now live in it). Linux only (``memfd_create``)."""
    if not hasattr(os, "memfd_create"):
        raise RuntimeError("shared-memory weights need Linux (os.memfd_create); use rollout.weight_sync=distributed.")
    unique = list({id(p): p for p in params}.values())
    offsets, total = [], _ALIGN
    for p in unique:
        if p.device.type != "cpu":
            raise RuntimeError(f"shared-memory weights are for CPU engines; a parameter lives on {p.device}.")
        offsets.append(total)
        total += -(-p.numel() * p.element_size() // _ALIGN) * _ALIGN
    layout_id = uuid.uuid4().hex
    fd = os.memfd_create("nsr-engine-weights", 0)  # freed with the engine process (and the last mapping)
    os.ftruncate(fd, total)
    memory = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=total, dtype=torch.uint8)
    memory[:_ALIGN].copy_(torch.frombuffer(bytearray(_header(layout_id)), dtype=torch.uint8))
    with torch.no_grad():
        for p, start in zip(unique, offsets, strict=True):
            n = p.numel() * p.element_size()
            region = memory[start : start + n].view(p.dtype).view(p.shape)
            region.copy_(p.data)
            p.data = region
    base = memory.untyped_storage().data_ptr()
    tensors = {}
    for name, t in named:
        if t.untyped_storage().data_ptr() != base:
            raise RuntimeError(f"shared-memory weights: {name} is not a view of the engine's parameters.")
        tensors[name] = (str(t.dtype).removeprefix("torch."), tuple(t.shape), tuple(t.stride()), int(t.storage_offset()))
    layout = SharedLayout(id=layout_id, path=f"/proc/{os.getpid()}/fd/{fd}", nbytes=total,
                          host=socket.gethostname(), tensors=tensors)
    return layout, memory


class SharedMappings:
    """A trainer rank's mappings of engines' shared weights, by layout id, kept between syncs (mapping the pages
    costs about five copies of them; a kept mapping is written at memory-copy speed)."""

    def __init__(self) -> None:
        self._maps: dict[str, dict[str, torch.Tensor]] = {}

    def views(self, layouts: list[SharedLayout]) -> list[dict[str, torch.Tensor]]:
        """Each layout's HF name -> writable view of the engine's weight. Mappings of engines no longer listed
        (restarted, gone) are dropped. Raises ``RuntimeError`` naming the engine's file and host when this
        process cannot open it (another host or container: use ``rollout.weight_sync=distributed``)."""
        wanted = {lay.id for lay in layouts}
        for stale in [k for k in self._maps if k not in wanted]:
            del self._maps[stale]
        return [self._maps.get(lay.id) or self._map(lay) for lay in layouts]

    def _map(self, layout: SharedLayout) -> dict[str, torch.Tensor]:
        # The path names a process's file descriptor: in another host's or PID namespace's view it may be another
        # file, so the size and header are checked before anything is mapped (mapping could grow a file).
        try:
            with open(layout.path, "rb") as f:
                size, head = os.fstat(f.fileno()).st_size, f.read(_ALIGN)
            problem = ("" if size == layout.nbytes and head == _header(layout.id) else
                       f"it is not that engine's weights file ({size} bytes, header {head[:40]!r})")
            memory = (torch.from_file(layout.path, shared=True, size=layout.nbytes, dtype=torch.uint8)
                      if not problem else None)
        except (RuntimeError, OSError) as exc:
            problem, memory = str(exc), None
        if memory is None:
            raise RuntimeError(
                f"cannot map the rollout engine's shared weights {layout.path} (engine host {layout.host}, this "
                f"host {socket.gethostname()}): {problem}. rollout.weight_sync=shared_memory needs every trainer "
                "rank on the engines' host and in its process namespace, as the same user; use "
                "rollout.weight_sync=distributed otherwise.")
        views = {}
        for name, (dtype, shape, stride, offset) in layout.tensors.items():
            typed = memory.view(getattr(torch, dtype))
            views[name] = torch.as_strided(typed, shape, stride, offset)
        self._maps[layout.id] = views
        return views
