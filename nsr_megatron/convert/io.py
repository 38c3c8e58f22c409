"""Streamed checkpoint I/O: HF safetensors shards in and out, megatron dist checkpoints in and out.

Memory stays bounded by one *piece* (a canonical tensor, or one expert of a stacked expert tensor,
see :mod:`nsr_megatron.convert.mapping`), never the whole model:

- HF safetensors are read tensor by tensor with positional reads located by the headers (no mmap,
  so the resident set does not grow with the files), and written by a streaming writer that lays
  out the header first and then appends one tensor at a time.
- Dist checkpoints are megatron-core's ``torch_dist`` format: a ``torch.distributed.checkpoint``
  (DCP) folder (``.metadata`` + ``__0_*.distcp``) keyed by the canonical keys, plus
  ``metadata.json`` (the backend) and ``common.pt`` (the non-tensor state, empty for weights).
  Writing goes through DCP with a planner whose pieces a background thread produces a bounded
  number of bytes ahead of the writer (reading overlaps serialisation); stacked layers and experts
  are stored one chunk per layer / expert, as a PP- or EP-sharded training run stores them too. Reading asks DCP for one group of pieces at a time, whatever chunking the
  checkpoint was saved with (any TP / PP / EP layout).

This module needs no process group and no megatron model.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import queue
import re
import shutil
import struct
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nsr_megatron.convert.mapping import ConvertError
from nsr_megatron.models.rules import Piece, Shape, TensorRule

__all__ = [
    "DistCheckpointReader",
    "HFCheckpoint",
    "SafetensorsWriter",
    "commit_checkpoint_dir",
    "copy_hf_side_files",
    "complete_checkpoints",
    "fsync_files",
    "latest_checkpoint",
    "read_safetensors_header",
    "write_dist_checkpoint",
    "write_hf_index",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
META_FILE = "nsr_meta.json"  # same name as nsr_megatron.trainer.checkpoint.META_FILE
# megatron-core's torch_dist backend descriptor (dist_checkpointing/core.py CheckpointingConfig).
MCORE_CONFIG_FILE = "metadata.json"
MCORE_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
MCORE_COMMON_FILE = "common.pt"

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")


# ------------------------------------------------------------------------------------------------
# safetensors, read side
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class HFTensor:
    """Where one tensor's bytes live: ``file`` bytes ``[start, end)``."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: Shape
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> dict[str, HFTensor]:
    """Parse a safetensors file's header (the first 8 + N bytes) into name -> :class:`HFTensor`."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConvertError(f"{path} is not a safetensors file (shorter than 8 bytes).")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ConvertError(f"{path} is not a safetensors file (header length {n}).")
        header = json.loads(f.read(n))
    base = 8 + n
    out: dict[str, HFTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ConvertError(
                f"{path}: tensor {name} has dtype {info['dtype']}, which this converter cannot read."
            )
        start, end = info["data_offsets"]
        out[name] = HFTensor(
            name=name,
            file=path,
            dtype=_ST_DTYPES[info["dtype"]],
            shape=tuple(info["shape"]),
            start=base + start,
            end=base + end,
        )
    return out


class HFCheckpoint:
    """A Hugging Face checkpoint folder: ``config.json`` + ``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``. Only headers are read up front."""

    def __init__(self, hf_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ConvertError(
                f"--hf-dir {self.dir} is not a directory; pass a Hugging Face checkpoint folder."
            )
        index = self.dir / INDEX_FILE
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                weight_map: dict[str, str] = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.dir / name).is_file():
                    users = sorted(k for k, v in weight_map.items() if v == name)
                    raise ConvertError(
                        f"shard file {name} listed in {index} is missing from {self.dir} (it holds "
                        f"{len(users)} tensor(s), e.g. {users[0]}); download it again or fix the index."
                    )
        elif (self.dir / SINGLE_FILE).is_file():
            files, weight_map = [SINGLE_FILE], {}
        else:
            other = sorted(p.name for p in self.dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
            hint = f" (found {', '.join(other)}: only safetensors are supported)" if other else ""
            raise ConvertError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir}{hint}.")
        self.shards = [self.dir / name for name in files]
        self.tensors: dict[str, HFTensor] = {}
        for shard in self.shards:
            for name, t in read_safetensors_header(shard).items():
                if weight_map and weight_map.get(name, shard.name) != shard.name:
                    continue  # the index is authoritative when a name appears twice
                self.tensors[name] = t
        for name, file in weight_map.items():
            if name not in self.tensors:
                raise ConvertError(
                    f"{INDEX_FILE} lists tensor {name} in {file}, but that file does not contain it."
                )
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0  # tensor bytes read so far (headers not counted)

    def shapes(self) -> dict[str, Shape]:
        return {name: t.shape for name, t in self.tensors.items()}

    def _fd(self, t: HFTensor) -> int:
        with self._lock:
            fd = self._fds.get(t.file)
            if fd is None:
                fd = self._fds[t.file] = os.open(t.file, os.O_RDONLY)
            return fd

    def _pread(self, t: HFTensor, view: memoryview, offset: int) -> None:
        """Fill ``view`` from the file at ``offset`` (bytes from the tensor's start); counts ``bytes_read``."""
        fd, done, size = self._fd(t), 0, len(view)
        while done < size:
            got = os.preadv(fd, [view[done:]], t.start + offset + done)
            if got == 0:
                raise ConvertError(
                    f"{t.file}: tensor {t.name} is truncated at byte {offset + done} of {t.nbytes}; the file is "
                    "damaged."
                )
            done += got
        with self._lock:
            self.bytes_read += size

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory (positional reads, safe from several threads)."""
        t = self.tensors[name]
        buf = torch.empty(t.nbytes, dtype=torch.uint8)
        self._pread(t, buf.numpy().data, 0)
        return buf.view(t.dtype).reshape(t.shape)

    def read_block(self, name: str, rows: slice, cols: slice | None = None) -> torch.Tensor:
        """Read only rows ``rows`` (and, for a 2-D tensor, columns ``cols``) of one tensor: one positional read
        of the rows, or one per row when the columns are a part of each row. Steps must be 1."""
        t = self.tensors[name]
        r0, r1, _ = rows.indices(t.shape[0])
        row_elems = _numel(t.shape[1:])
        item = _itemsize(t.dtype)
        if cols is None or (len(t.shape) == 2 and cols.indices(t.shape[1])[:2] == (0, t.shape[1])):
            buf = torch.empty((r1 - r0) * row_elems * item, dtype=torch.uint8)
            self._pread(t, buf.numpy().data, r0 * row_elems * item)
            return buf.view(t.dtype).reshape(r1 - r0, *t.shape[1:])
        if len(t.shape) != 2:
            raise ConvertError(f"read_block({name}): a column slice needs a 2-D tensor, not shape {list(t.shape)}.")
        c0, c1, _ = cols.indices(t.shape[1])
        width = (c1 - c0) * item
        buf = torch.empty((r1 - r0) * width, dtype=torch.uint8)
        view = buf.numpy().data
        for i, r in enumerate(range(r0, r1)):
            self._pread(t, view[i * width : (i + 1) * width], (r * t.shape[1] + c0) * item)
        return buf.view(t.dtype).reshape(r1 - r0, c1 - c0)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


# ------------------------------------------------------------------------------------------------
# safetensors, write side
# ------------------------------------------------------------------------------------------------
class SafetensorsWriter:
    """Write one safetensors file tensor by tensor: the header is laid out from the declared
    ``(name, dtype, shape)`` entries, then :meth:`write` appends each tensor in that order."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, Shape]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._order: list[tuple[str, torch.dtype, Shape, int]] = []
        for name, dtype, shape in entries:
            nbytes = _numel(shape) * _itemsize(dtype)
            header[name] = {
                "dtype": _ST_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._order.append((name, dtype, shape, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> int:
        expect, dtype, shape, nbytes = self._order[self._next]
        assert name == expect, f"{self.path}: wrote {name} where {expect} was declared next"
        assert tensor.dtype == dtype and tuple(tensor.shape) == shape, (name, tensor.dtype, tensor.shape)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._f.write(data.numpy().data)
        self._next += 1
        return nbytes

    def close(self, *, sync: bool = True) -> None:
        """Close the file; ``sync=False`` leaves the fsync to the caller (see :func:`fsync_files`)."""
        self._f.flush()
        if sync:
            os.fsync(self._f.fileno())
        self._f.close()
        assert self._next == len(self._order), (
            f"{self.path}: {len(self._order) - self._next} tensors never written"
        )


def fsync_files(paths: Iterable[Path]) -> None:
    """Flush written files to disk (once at the end, so writing never waits on one file's flush)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_hf_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    with open(out_dir / INDEX_FILE, "w", encoding="utf-8") as f:
        json.dump(
            {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
            f,
            indent=2,
        )
        f.write("\n")


def copy_hf_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config and tokenizer files (every top-level file that is not a weight
    file or the weight index) from ``src`` to ``dst``; return their names."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.endswith(".index.json"):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------
# dist checkpoints (megatron-core torch_dist format), write side
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PieceJob:
    """One piece to write: ``produce()`` returns it (shape ``piece.shape``, dtype ``dtype``)."""

    rule: TensorRule
    piece: Piece
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return _numel(self.piece.shape) * _itemsize(self.dtype)


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process.*")
        yield


@functools.cache
def _planner_classes() -> tuple[type, type, type]:
    """DCP planner and reader classes, defined once (``torch.distributed.checkpoint`` imports slowly, so
    lazily). Their state lives on instances: a class created per call would sit in a reference cycle
    and keep its buffers alive until the cyclic garbage collector happens to run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import (
        LoadPlan,
        LoadPlanner,
        ReadItem,
        SavePlan,
        WriteItem,
        WriteItemType,
    )

    class PieceSavePlanner(DefaultSavePlanner):  # type: ignore[misc]
        """The plan is given up front; each piece is produced only when the writer resolves it."""

        def __init__(self, items: list[WriteItem], jobs: dict[Any, PieceJob], prefetch: _Prefetcher):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.items, self.jobs, self.prefetch = items, jobs, prefetch

        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(self.items)
            return self.plan

        def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
            if write_item.type == WriteItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save([None], buf)  # what megatron stores for a layer without FP8 state
                return buf
            job = self.jobs[write_item.index]
            tensor = self.prefetch.take(job)
            assert tensor.dtype == job.dtype and tuple(tensor.shape) == job.piece.shape, (
                job.rule.key,
                tensor.shape,
            )
            return tensor.contiguous()

    class BlockLoadPlanner(LoadPlanner):  # type: ignore[misc]
        """Fills ``targets[(key, offset)]`` with the requested blocks; ``items`` come precomputed."""

        def __init__(self, items: list[ReadItem], targets: dict[tuple[str, Any], torch.Tensor]):
            self.items, self.targets = items, targets

        def set_up_planner(self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False) -> None:
            pass

        def create_local_plan(self) -> LoadPlan:
            return LoadPlan(self.items)

        def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
            return global_plan

        def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
            return central_plan

        def load_bytes(self, read_item: ReadItem, value: Any) -> None:
            raise AssertionError(f"unexpected non-tensor read {read_item.dest_index.fqn}")

        def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
            buf = self.targets[(read_item.dest_index.fqn, read_item.dest_index.offset)]
            region = tuple(
                slice(o, o + n) for o, n in zip(read_item.dest_offsets, read_item.lengths, strict=True)
            )
            return buf[region]

        def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
            pass  # resolve_tensor handed out a view of the buffer; DCP copied into it

    class CachedReader(dcp.FileSystemReader):  # type: ignore[misc]
        """Reads the checkpoint's ``.metadata`` once for many loads."""

        def __init__(self, path: str) -> None:
            super().__init__(path)
            self._cached: Any = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if self._cached is None:
                self._cached = super().read_metadata(*args, **kwargs)
            return self._cached

        def _slice_file(self, file: Any, sinfo: Any) -> Any:
            # One read per stored chunk instead of torch.load's many small reads through a file view.
            file.seek(sinfo.offset)
            return io.BytesIO(file.read(sinfo.length))

    return PieceSavePlanner, BlockLoadPlanner, CachedReader


class _Prefetcher:
    """Produces the pieces in ``jobs`` order on a background thread, at most ``budget_bytes`` ahead
    (always at least one piece), so reading and reshaping overlap with the writer's serialisation.

    :meth:`take` hands out the next piece; a piece asked for out of order is produced directly.
    """

    def __init__(
        self, jobs: Sequence[PieceJob], budget_bytes: int, on_written: Callable[[int], None]
    ) -> None:
        self.jobs, self.budget, self.on_written = list(jobs), budget_bytes, on_written
        self.ready: dict[int, torch.Tensor | BaseException] = {}
        self.pending = 0  # bytes produced and not yet taken
        self.next_take = 0
        self.cond = threading.Condition()
        self.stopped = False
        self.thread: threading.Thread | None = None

    def _run(self) -> None:
        for i, job in enumerate(self.jobs):
            room = functools.partial(self._room, job.nbytes)
            with self.cond:
                self.cond.wait_for(room)
                if self.stopped:
                    return
            try:
                item: torch.Tensor | BaseException = job.produce().contiguous()
            except BaseException as e:  # handed to the writer thread, which re-raises it
                item = e
            with self.cond:
                self.ready[i] = item
                self.pending += job.nbytes
                self.cond.notify_all()
            if isinstance(item, BaseException):
                return

    def _room(self, nbytes: int) -> bool:
        return self.stopped or self.pending == 0 or self.pending + nbytes <= self.budget

    def take(self, job: PieceJob) -> torch.Tensor:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="convert-prefetch", daemon=True)
            self.thread.start()
        i = self.next_take
        if i >= len(self.jobs) or self.jobs[i] is not job:  # the writer changed the order: no prefetch
            self.on_written(job.nbytes)
            return job.produce()
        with self.cond:
            self.cond.wait_for(lambda: i in self.ready)
            item = self.ready.pop(i)
            self.pending -= job.nbytes
            self.next_take += 1
            self.cond.notify_all()
        if isinstance(item, BaseException):
            raise item
        self.on_written(job.nbytes)
        return item

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()


def _piece_save_planner(jobs: Sequence[PieceJob], objects: Sequence[str], prefetch: _Prefetcher) -> Any:
    """A DCP save planner for ``jobs`` plus ``objects`` (megatron ``ShardedObject`` unique keys,
    stored as ``[None]``)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    by_index = {}
    items = [WriteItem(index=MetadataIndex(fqn=key), type=WriteItemType.BYTE_IO) for key in objects]
    for job in jobs:
        index = MetadataIndex(fqn=job.rule.key, offset=torch.Size(job.piece.offset))
        by_index[index] = job
        items.append(
            WriteItem(
                index=index,
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(
                        offsets=torch.Size(job.piece.offset), sizes=torch.Size(job.piece.shape)
                    ),
                    properties=TensorProperties(dtype=job.dtype),
                    size=torch.Size(job.rule.shape),
                ),
            )
        )
    return _planner_classes()[0](items, by_index, prefetch)


def write_dist_checkpoint(
    directory: Path,
    jobs: Sequence[PieceJob],
    objects: Sequence[str],
    on_written: Callable[[int], None],
    *,
    prefetch_bytes: int = 64 * 2**20,
) -> None:
    """Write ``jobs`` (and the empty ``objects``) into ``directory`` as a megatron-core
    ``torch_dist`` checkpoint, from a single process.

    Pieces are written in ``jobs`` order; a background thread produces them at most
    ``prefetch_bytes`` ahead of the writer (memory: that plus one piece). The keys are the canonical
    keys at the top level, exactly as ``dist_checkpointing.save({"model": ...})`` stores model
    weights; ``load_checkpoint`` reshards them at load into any layout.
    """
    import torch.distributed.checkpoint as dcp

    directory.mkdir(parents=True, exist_ok=True)
    writer = dcp.FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=1, sync_files=True)
    prefetch = _Prefetcher(jobs, prefetch_bytes, on_written)
    try:
        with _single_process():
            dcp.save(
                {}, storage_writer=writer, planner=_piece_save_planner(jobs, objects, prefetch), no_dist=True
            )
    finally:
        prefetch.stop()
    torch.save({}, directory / MCORE_COMMON_FILE)
    with open(directory / MCORE_CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(MCORE_CONFIG, f)


_STEP_DIR = re.compile(r"^step_(\d{8})$")


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete ``step_*`` folders under ``root`` (with their ``nsr_meta.json``), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root`` (half-written ``.tmp-*`` folders never count)."""
    found = complete_checkpoints(Path(root))
    return found[-1] if found else None


def commit_checkpoint_dir(tmp: Path, final: Path, info: dict[str, Any]) -> Path:
    """Finish a checkpoint folder like ``save_checkpoint`` does: write ``nsr_meta.json`` (fsynced)
    last, then rename ``tmp`` onto ``final`` atomically (replacing an existing ``final``)."""
    with open(tmp / META_FILE, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# ------------------------------------------------------------------------------------------------
# dist checkpoints, read side
# ------------------------------------------------------------------------------------------------
class DistCheckpointReader:
    """Read pieces of a dist checkpoint's tensors (saved under any layout) without a process group.

    The DCP metadata is read once; each :meth:`load` asks DCP for the requested blocks only, so a
    checkpoint whose experts are chunked per expert is read one group of experts at a time.
    """

    def __init__(self, path: Path) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        if not (path / ".metadata").is_file():
            raise ConvertError(f"{path} is not a dist checkpoint (no .metadata file).")
        self.path = path
        self._reader = _planner_classes()[2](str(path))
        meta = self._reader.read_metadata()
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }

    def shapes(self) -> dict[str, Shape]:
        return {k: tuple(v.size) for k, v in self.tensors.items()}

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def load(self, requests: Sequence[tuple[str, Shape, Shape]]) -> list[torch.Tensor]:
        """Blocks ``(key, offset, shape)`` of stored tensors, in the stored dtype."""
        import torch.distributed.checkpoint as dcp

        buffers = [torch.empty(shape, dtype=self.dtype(key)) for key, _, shape in requests]
        with _single_process():
            dcp.load(
                {},
                storage_reader=self._reader,
                planner=_block_load_planner(self.tensors, requests, buffers),
                no_dist=True,
            )
        return buffers

    def iter_pieces(
        self, work: Iterable[tuple[str, Piece]], budget_bytes: int
    ) -> Iterator[tuple[str, Piece, torch.Tensor]]:
        """Yield ``(stored key, piece, block)`` for ``work`` in order, loaded in groups of at most
        ``budget_bytes`` (or one piece) on a background thread one group ahead of the consumer, so
        reading overlaps the consumer's writing (memory: about three groups)."""
        ready: queue.Queue[Any] = queue.Queue(maxsize=1)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def load_all() -> None:
            try:
                for group in self._groups(work, budget_bytes):
                    blocks = self.load([(key, p.offset, p.shape) for key, p in group])
                    if not put((group, blocks)):
                        return
                    del blocks
                put(None)
            except BaseException as e:  # handed to the consumer, which re-raises it
                put(e)

        thread = threading.Thread(target=load_all, name="convert-read-ahead", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                group, blocks = item
                del item
                for (key, piece), block in zip(group, blocks, strict=True):
                    yield key, piece, block
                del blocks
        finally:
            stop.set()
            while not ready.empty():
                ready.get_nowait()
            thread.join()

    def _groups(
        self, work: Iterable[tuple[str, Piece]], budget_bytes: int
    ) -> Iterator[list[tuple[str, Piece]]]:
        group: list[tuple[str, Piece]] = []
        size = 0
        for key, piece in work:
            nbytes = _numel(piece.shape) * _itemsize(self.dtype(key))
            if group and size + nbytes > budget_bytes:
                yield group
                group, size = [], 0
            group.append((key, piece))
            size += nbytes
        if group:
            yield group


def _block_load_planner(
    metadata: dict[str, Any], requests: Sequence[tuple[str, Shape, Shape]], buffers: Sequence[torch.Tensor]
) -> Any:
    """A DCP load planner that fills ``buffers[i]`` with block ``requests[i]`` of a stored tensor."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    targets: dict[tuple[str, Any], torch.Tensor] = {}
    items = []
    for (key, offset, shape), buf in zip(requests, buffers, strict=True):
        chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=torch.Size(shape))
        if (key, chunk.offsets) in targets:
            raise AssertionError(f"block {key} at {list(offset)} requested twice in one load")
        targets[(key, chunk.offsets)] = buf
        items.extend(create_read_items_for_chunk_list(key, metadata[key], [chunk]))
    return _planner_classes()[1](items, targets)
