"""Host offload of tensor storages: free a set of tensors' device memory and give it back, bit for bit.

Each distinct storage (the views of one buffer share it) is copied into a host buffer and then resized to 0 bytes:
every tensor and view over it keeps its shape, strides and identity (parameters stay parameters, optimizer state
stays keyed by them, megatron's bucket views stay views), but holds no memory. :meth:`HostOffload.onload` gives
each storage its bytes back and copies them in. Host buffers are allocated once per storage (pinned when the
storage is on CUDA, so the copies run at full speed) and reused by every later offload.

Used for the training state while colocated rollout engines generate (``rollout.offload_train``), for the frozen
reference model between uses (``model.offload_reference``, ``frozen=True``: its values never change, so the copy
is made once and later offloads only free) and for the embedded engine's weights while the trainer trains.

Nothing here knows megatron: callers pass the tensors (``models.state.train_state_tensors`` lists a policy's).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["HostOffload"]


@dataclass
class _Held:
    """One storage: a uint8 tensor over all of it (``whole``; the handle that keeps the storage addressable) and
    its host copy."""

    whole: Tensor  # [nbytes] uint8 over the storage
    nbytes: int
    host: Tensor  # [nbytes] uint8 in host memory
    copied: bool = False  # the host copy holds the values (frozen storages are copied once)


class HostOffload:
    """Moves the storages of tensors on ``device`` to host memory (:meth:`offload`) and back (:meth:`onload`).

    Tensors on another device (already in host memory, e.g. a CPU-offloaded optimizer's state on a GPU run), storages
    that are already empty (freed by someone else) and storages that cannot be resized (memory mapped from a file
    or shared with another process) are left alone.
    """

    def __init__(self, device: torch.device | str, *, frozen: bool = False) -> None:
        self.device = torch.device(device)
        self.frozen = frozen
        self._buffers: dict[int, _Held] = {}  # storage id -> its host copy (kept across offloads)
        self._out: list[_Held] = []  # the storages the last offload freed

    @property
    def offloaded(self) -> bool:
        """True while the last :meth:`offload`'s storages are in host memory only."""
        return bool(self._out)

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory held by the copies."""
        return sum(h.nbytes for h in self._buffers.values())

    def _held(self, t: Tensor, buffers: dict[int, _Held]) -> _Held | None:
        """The storage of ``t`` with its host buffer (made on first sight, else the one kept), or None to skip it."""
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if t.device != self.device or nbytes == 0 or not storage.resizable():
            return None
        key = storage._cdata  # the storage object itself: every view of it has the same one, also after a resize
        held = buffers.get(key) or self._buffers.get(key)
        if held is None or held.nbytes != nbytes:
            whole = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage, 0, (nbytes,), (1,))
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            held = _Held(whole=whole, nbytes=nbytes, host=host)
        buffers[key] = held
        return held

    @torch.no_grad()
    def offload(self, tensors: Iterable[Tensor]) -> int:
        """Copy the storages of ``tensors`` to host memory and free them on the device; returns the bytes freed.
        Collective-free and idempotent: storages already freed are skipped."""
        if self._out:
            raise RuntimeError("HostOffload.offload: the last offload was not onloaded yet; call onload() first.")
        buffers: dict[int, _Held] = {}  # this offload's storages (those no longer listed drop their host copy)
        out: list[_Held] = []
        for t in tensors:
            count = len(buffers)
            held = self._held(t, buffers)
            if held is None or len(buffers) == count:
                continue  # skipped, or a storage already seen in this call
            out.append(held)
            if not (self.frozen and held.copied):
                held.host.copy_(held.whole, non_blocking=True)
                held.copied = True
        self._buffers = buffers
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the copies finish before the memory is freed
        for held in out:
            held.whole.untyped_storage().resize_(0)
        self._out = out
        return sum(h.nbytes for h in out)

    @torch.no_grad()
    def onload(self) -> int:
        """Give every storage the last offload freed its bytes back and copy its values in; returns the bytes."""
        out, self._out = self._out, []
        for held in out:
            held.whole.untyped_storage().resize_(held.nbytes)
            held.whole.copy_(held.host, non_blocking=True)
        if out and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return sum(h.nbytes for h in out)
