"""Weight sync, engine side of the trainer: HF-named tensors packed into flat buckets, then pushed to engines.

:func:`buckets` packs a stream of ``(name, tensor)`` into :class:`FlatBucket` s: one contiguous byte buffer of at
most ``bucket_bytes`` (a larger tensor gets a bucket of its own) plus the name, dtype, shape and offset of each
tensor in it. A bucket owns its bytes, so the producer can free each full tensor as soon as it is packed: the
sender holds at most the bucket being filled, the bucket being pushed, and one full tensor. A flat bucket is also
what the distributed update broadcasts in one collective. The producer is the trainer's group-local export
(``nsr_megatron.convert.sharded.HFExport``); nothing here imports megatron.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["FlatBucket", "buckets"]

_ALIGN = 64  # every tensor starts at a multiple of this many bytes (any dtype can view it)


@dataclass
class FlatBucket:
    """``data`` [nbytes] uint8 holds the tensors of ``entries``: (name, dtype, shape, byte offset)."""

    data: torch.Tensor
    entries: list[tuple[str, torch.dtype, tuple[int, ...], int]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` views into ``data``."""
        out = []
        for name, dtype, shape, offset in self.entries:
            n = _numel(shape) * _itemsize(dtype)
            out.append((name, self.data[offset : offset + n].view(dtype).view(shape)))
        return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[FlatBucket]:
    """Pack ``(name, tensor)`` pairs, in order, into flat buckets of at most ``bucket_bytes`` bytes (a tensor larger
    than that is packed alone). Tensors are copied (on their own device) into the bucket's buffer."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be >= 1 (e.g. rollout.update_bucket_mb=512).")
    buffer: torch.Tensor | None = None
    entries: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
    used = 0
    for name, tensor in named:
        n = tensor.numel() * tensor.element_size()
        if buffer is not None and (_align(used) + n > buffer.numel() or buffer.device != tensor.device):
            yield FlatBucket(buffer[:used], entries)
            buffer, entries, used = None, [], 0
        if buffer is None:
            buffer = torch.empty(max(bucket_bytes, n), dtype=torch.uint8, device=tensor.device)
        offset = _align(used)
        buffer[offset : offset + n].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        entries.append((name, tensor.dtype, tuple(tensor.shape), offset))
        used = offset + n
    if buffer is not None:
        yield FlatBucket(buffer[:used], entries)
