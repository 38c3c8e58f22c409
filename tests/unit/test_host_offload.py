"""HostOffload: a set of tensors' storages leave the device and come back bit for bit, views and identities kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nsr_megatron.host_offload import HostOffload


def test_storages_are_freed_and_come_back_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    buffer = torch.randn(1000, generator=g)  # a flat buffer with views into it (megatron's DDP buffers)
    views = [buffer[:300].view(10, 30), buffer[300:]]
    param = torch.nn.Parameter(torch.randn(7, 5, generator=g))
    half = torch.randn(33, generator=g).to(torch.bfloat16)
    before = [t.clone() for t in (buffer, param.detach(), half)]
    off = HostOffload("cpu")
    freed = off.offload([*views, buffer, param, half, param])  # repeats and views count once
    assert freed == 1000 * 4 + 35 * 4 + 33 * 2
    assert off.offloaded and all(t.untyped_storage().nbytes() == 0 for t in (buffer, param, half, *views))
    assert views[0].shape == (10, 30) and isinstance(param, torch.nn.Parameter)
    assert off.onload() == freed and not off.offloaded
    for t, b in zip((buffer, param.detach(), half), before, strict=True):
        assert torch.equal(t.view(torch.uint8), b.view(torch.uint8))  # bit for bit
    assert views[0].data_ptr() == buffer.data_ptr()  # views see the restored storage
    views[1].add_(1.0)  # and still alias it
    assert torch.equal(buffer[300:], before[0][300:] + 1.0)


def test_values_changed_between_offloads_are_copied_again_unless_frozen() -> None:
    t = torch.zeros(16)
    off = HostOffload("cpu")
    off.offload([t])
    off.onload()
    t.fill_(3.0)  # the training step changes the state between rollouts
    off.offload([t])
    off.onload()
    assert torch.equal(t, torch.full((16,), 3.0))
    frozen = HostOffload("cpu", frozen=True)  # a reference model: copied once, later offloads only free
    frozen.offload([t])
    frozen.onload()
    hosts = frozen.host_bytes
    frozen.offload([t])
    assert frozen.host_bytes == hosts and t.untyped_storage().nbytes() == 0
    frozen.onload()
    assert torch.equal(t, torch.full((16,), 3.0))


def test_what_cannot_or_need_not_move_is_left_alone() -> None:
    mapped = torch.from_numpy(np.arange(8, dtype=np.float32))  # memory it does not own: not resizable
    empty = torch.ones(4)
    empty.untyped_storage().resize_(0)  # already freed by someone else (an offloaded reference)
    off = HostOffload("cpu")
    assert off.offload([mapped, empty]) == 0
    assert mapped.untyped_storage().nbytes() == 32 and empty.untyped_storage().nbytes() == 0
    off.onload()
    assert empty.untyped_storage().nbytes() == 0  # not ours to restore


def test_offloading_twice_without_onload_is_refused() -> None:
    t = torch.ones(4)
    off = HostOffload("cpu")
    off.offload([t])
    with pytest.raises(RuntimeError, match="onload"):
        off.offload([t])
    off.onload()
    assert torch.equal(t, torch.ones(4))
