"""Layout-independent ("canonical") views of a sharded megatron model's weights and gradients.

megatron-core's ``sharded_state_dict`` describes every local tensor as a piece of a global tensor
(key, global shape, offset, replica id). Laying the main-replica pieces into zero tensors of the
global shape and summing over all ranks gives each global tensor exactly once, whatever the TP /
PP / EP layout: transformer layers stacked on a leading layer axis, experts on an expert axis,
SwiGLU ``linear_fc1`` as ``[gate; up]``, qkv in megatron's per-group ``[q.., k, v]`` order. The same
keys are what ``dist_checkpointing`` writes, so this view is also the checkpoint's content.

Used by the layout-invariance tests and by conversion / weight sync. Every rank gets the whole
model: fine for tests and small models; large-model paths stream per tensor instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["canonical_state", "gather_grad_shards", "iter_sharded_tensors", "load_canonical_state", "train_state_tensors",
           "unwrap_model"]


def unwrap_model(module: Any) -> Any:
    """The bare GPTModel inside megatron's DDP (or any ``.module`` wrapper)."""
    while hasattr(module, "module"):
        module = module.module
    return module


def train_state_tensors(ddp: torch.nn.Module, optimizer: Any) -> Iterator[torch.Tensor]:
    """Every tensor of a policy's training state: the parameters, megatron DDP's parameter and gradient buffers
    (``main_grad`` views into them), and the optimizer's parameters (fp32 master copies) and state (Adam's moments,
    step counts), through megatron's chained optimizer when there is one. Views repeat storages; a consumer that
    works per storage (``HostOffload``) counts each once."""
    yield from ddp.parameters()
    for buffer in list(getattr(ddp, "buffers", [])) + list(getattr(ddp, "expert_parallel_buffers", [])):
        yield buffer.grad_data
        if getattr(buffer, "param_data", None) is not None:
            yield buffer.param_data
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]) if optimizer is not None else []:
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            yield from group["params"]
        for state in inner.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def _flatten(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _flatten(obj=v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _flatten(v)
    else:
        yield obj


def iter_sharded_tensors(model: torch.nn.Module, *, grads: bool = False) -> Iterator[Any]:
    """Yield the model's ``ShardedTensor`` s (factories expanded). With ``grads=True`` each one's data
    is the parameter's gradient (megatron DDP's ``main_grad`` when present, else ``.grad``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def swap(t: torch.Tensor) -> torch.Tensor | None:
        if not grads:
            return t.detach()
        g = getattr(t, "main_grad", None)
        if g is None:
            g = t.grad
        return None if g is None else g.detach().view_as(t)

    for item in _flatten(unwrap_model(model).sharded_state_dict()):
        if isinstance(item, ShardedTensorFactory):
            data = swap(item.data)
            if data is None:
                continue
            built = item.build_fn(item.key, data, item.replica_id, item.flattened_range)
            yield from (t for t in _flatten(built) if isinstance(t, ShardedTensor))
        elif isinstance(item, ShardedTensor):
            if item.key.endswith("_extra_state"):
                continue
            data = swap(item.data)
            if data is None:
                continue
            item.data = data
            yield item


def gather_grad_shards(ddp: torch.nn.Module) -> None:
    """Make every rank's ``main_grad`` hold the fully reduced gradient.

    With the distributed optimizer, megatron DDP reduce-scatters gradients: each data-parallel rank
    owns the reduced values of its shard of every bucket, and the rest of its buffer holds its own
    unreduced contribution. All-gathering the shards restores full gradients (for diagnostics and
    tests; the optimizer only reads its own shard, so this changes no update).
    """
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    if not getattr(getattr(ddp, "ddp_config", None), "use_distributed_optimizer", False):
        return
    groups = list(getattr(ddp, "bucket_groups", [])) + list(getattr(ddp, "expert_parallel_bucket_groups", []))
    for bucket_group in groups:
        size = bucket_group.intra_distributed_optimizer_instance_size
        if size == 1:
            continue
        rank = bucket_group.intra_distributed_optimizer_instance_rank
        for bucket in bucket_group.buckets:
            shards = shard_buffer(bucket.grad_data, size)
            dist.all_gather_into_tensor(
                bucket.grad_data, shards[rank].clone(), group=bucket_group.intra_distributed_optimizer_instance_group
            )


def _is_main_replica(replica_id: Any) -> bool:
    if isinstance(replica_id, int):
        return replica_id == 0
    return all(r == 0 for r in replica_id)


def canonical_state(
    model: torch.nn.Module,
    *,
    grads: bool = False,
    dtype: torch.dtype = torch.float32,
    group: Any = None,
) -> dict[str, torch.Tensor]:
    """Gather the model's weights (or gradients) into full global tensors on every rank.

    With ``grads=True`` the DDP gradient shards are all-gathered first (:func:`gather_grad_shards`).

    Collective over ``group`` (default: the world). Keys are the dist-checkpoint keys.
    """
    if grads:
        gather_grad_shards(model)
    pieces: dict[str, list[Any]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for sh in iter_sharded_tensors(model, grads=grads):
        if sh.flattened_range is not None:
            raise NotImplementedError(f"flattened sharded tensor {sh.key} is not supported here")
        shapes[sh.key] = tuple(sh.global_shape)
        if _is_main_replica(sh.replica_id):
            pieces.setdefault(sh.key, []).append(sh)
    # Every rank must reduce the same keys in the same order: agree on the key set first.
    if dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, shapes, group=group)
        for other in gathered:
            shapes.update(other)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    out: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        full = torch.zeros(shapes[key], dtype=dtype, device=device)
        for sh in pieces.get(key, []):
            index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset, _padded_shape(sh), strict=True))
            full[index] = sh.data.to(dtype).reshape(_padded_shape(sh))
        if dist.is_initialized():
            dist.all_reduce(full, group=group)
        out[key] = full.cpu()
    return out


def _padded_shape(sh: Any) -> tuple[int, ...]:
    # Prepended axes (layer, expert) have local size 1.
    return (1,) * sh.prepend_axis_num + tuple(sh.local_shape)


@torch.no_grad()
def load_canonical_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy full global tensors (keys as in :func:`canonical_state`) into this rank's shards, in place.

    The inverse of :func:`canonical_state` for any layout; every rank needs the tensors it owns (passing
    the whole dict everywhere is simplest for small models). Returns the number of shards written.
    Missing keys or shape mismatches raise ``ValueError`` naming the tensor and both shapes.
    """
    written = 0
    for sh in iter_sharded_tensors(model):
        if sh.key not in state:
            raise ValueError(f"no tensor for {sh.key} (global shape {tuple(sh.global_shape)}) in the given weights")
        full = state[sh.key]
        if tuple(full.shape) != tuple(sh.global_shape):
            raise ValueError(f"{sh.key}: weights have shape {tuple(full.shape)}, the model expects {tuple(sh.global_shape)}")
        index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset, _padded_shape(sh), strict=True))
        sh.data.copy_(full[index].reshape(sh.data.shape).to(sh.data.dtype))
        written += 1
    return written
