"""Atomic, reshardable checkpoints of the policy (and optimizer) with megatron ``dist_checkpointing``.

Layout of one checkpoint::

    <root>/step_00000010/          # complete checkpoints only (renamed into place last)
        <dist checkpoint files>    # {"model": ..., "optimizer": ...} sharded tensors
        nsr_meta.json              # step, layout it was saved under, user metadata; written last

All ranks write into ``<root>/.tmp-step_00000010/``; after a barrier rank 0 writes ``nsr_meta.json``
and renames the folder. A crash at any point leaves either the previous complete checkpoint or a
``.tmp-*`` folder that :func:`latest_checkpoint` ignores (and :func:`save_checkpoint` clears).
The optimizer state is saved in megatron's ``fully_reshardable`` format, so a checkpoint saved
under one TP / PP / EP layout loads under another, and one saved with ``optimizer.cpu_offload`` or
``precision_aware`` loads with either on or off (the format holds fp32 ``param`` / ``exp_avg`` / ``exp_avg_sq``
per parameter whichever optimizer wrote it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nsr_megatron.convert.io import META_FILE, commit_checkpoint_dir, complete_checkpoints, latest_checkpoint
from nsr_megatron.models.state import unwrap_model

__all__ = ["CheckpointError", "checkpoint_arch", "latest_checkpoint", "load_checkpoint", "read_meta", "save_checkpoint"]

_OPT_META = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _sharded_state(model: torch.nn.Module, optimizer: Any, *, is_loading: bool) -> dict[str, Any]:
    model_sd = unwrap_model(model).sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = _without_hybrid_settings(
            optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPT_META))
    return state


def _hybrid_settings() -> frozenset[str]:
    """The constructor settings megatron's ``HybridDeviceOptimizer`` (``optimizer.cpu_offload``) puts into every
    parameter group: ``offload_fraction``, ``cpu_optimizer_cls``, ``pin_cpu_grads``, ..."""
    import inspect

    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    params = inspect.signature(HybridDeviceOptimizer.__init__).parameters
    return frozenset(name for name, p in params.items() if name not in ("self", "params") and p.kind != p.VAR_KEYWORD)


def _without_hybrid_settings(state: Any) -> Any:
    """``state`` with the hybrid optimizer's settings left out of every ``param_groups`` entry. They describe how
    this run places its optimizer, not the optimizer's state, and two of them are classes, which ``torch.load``
    refuses (``weights_only``): without them a checkpoint saved with ``optimizer.cpu_offload`` on loads with it
    off and the other way round (the loading run's optimizer keeps its own settings)."""
    drop = _hybrid_settings()

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ([{g: v for g, v in group.items() if g not in drop} if isinstance(group, dict) else group
                         for group in v] if k == "param_groups" and isinstance(v, list) else clean(v))
                    for k, v in value.items()}
        return value

    return clean(state)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the folder, the reason and the fix."""


def _all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (a collective when a process group exists)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    flag = torch.tensor([1.0 if ok else 0.0], device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _first_line(exc: BaseException) -> str:
    """The innermost reason of a (possibly wrapped, multi-line) write error, on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
    return f"{type(exc).__name__}: {reason[:300]}"


def optimizer_has_state(optimizer: Any) -> bool:
    """Whether the optimizer has taken a step (Adam state exists) on every rank; before the first step there is
    nothing to save, and megatron cannot save it."""
    inner = [getattr(opt, "optimizer", None) for opt in getattr(optimizer, "chained_optimizers", [optimizer])]
    return _all_ok(all(o is not None and len(o.state) > 0 for o in inner))


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    model: torch.nn.Module,
    optimizer: Any = None,
    *,
    meta: dict[str, Any] | None = None,
    arch: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Save ``model`` (+ ``optimizer``) as ``<root>/step_<step>`` atomically; return its path.

    Collective: every rank must call it. ``meta`` (JSON-serialisable) is stored in ``nsr_meta.json``, and so is
    ``arch`` (the model's architecture fields, checked when the checkpoint is loaded). An optimizer that has not
    stepped yet has no state: the checkpoint then holds the weights only (``has_optimizer: false``).
    ``keep_last`` deletes older complete checkpoints beyond that count.

    Raises :class:`CheckpointError` on every rank when any rank fails to write (disk full, a file-size limit,
    permissions): the half-written folder is removed and the previous checkpoints are untouched.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu

    root = Path(root)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if optimizer is not None and not optimizer_has_state(optimizer):
        optimizer = None
    reason = ""
    if _rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as exc:
            reason = _first_line(exc)
    ok = _all_ok(not reason)
    if ok:
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        try:
            dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(tmp))
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - any write failure: keep the old ones
            reason = _first_line(exc)
        ok = _all_ok(not reason)
    if ok and _rank() == 0:
        info = {
            "step": step,
            "layout": {
                "tp": mpu.get_tensor_model_parallel_world_size(),
                "pp": mpu.get_pipeline_model_parallel_world_size(),
                "ep": mpu.get_expert_model_parallel_world_size(),
                "dp": mpu.get_data_parallel_world_size(),
            },
            "has_optimizer": optimizer is not None,
            "arch": arch,
            "meta": meta or {},
        }
        try:
            commit_checkpoint_dir(tmp, final, info)
        except OSError as exc:
            reason = _first_line(exc)
    ok = _all_ok(not reason)
    if not ok:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        raise CheckpointError(
            f"could not write checkpoint {name} into {root}: {reason or 'another rank failed to write its shard'}. "
            f"{f'The previous checkpoint {previous.name} is intact' if previous else 'No earlier checkpoint exists'}"
            f"; free disk space or fix the folder's permissions and file-size limit, then rerun the same command "
            f"to resume from it.")
    if _rank() == 0 and keep_last:
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(Path(path) / META_FILE, encoding="utf-8") as f:
        return dict(json.load(f))


def checkpoint_arch(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The architecture fields of the model a checkpoint holds: recorded at save time, or read from the HF config
    a conversion kept (or the run's ``config.yaml`` names) for checkpoints that predate the record; None when
    neither exists."""
    from nsr_megatron.config import read_hf_config
    from nsr_megatron.convert import find_hf_config
    from nsr_megatron.models.hf_config import arch_from_hf

    info = read_meta(path)
    if isinstance(info.get("arch"), dict):
        return dict(info["arch"])
    try:
        return dataclasses.asdict(arch_from_hf(read_hf_config(find_hf_config(Path(path)))))
    except Exception:  # noqa: BLE001 - an old checkpoint without a findable config: nothing to compare
        return None


def _fix_torch_adam_step_on_load() -> None:
    """megatron-core 0.16 ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every
    key of the live optimizer state from the loaded tensors, but the ``fully_reshardable`` loader
    leaves torch Adam's per-parameter ``step`` out (it restores it from ``param_groups``): without
    Transformer Engine / apex (torch Adam) loading fails with ``KeyError: 'step'``. Keep the live
    ``step`` there (megatron sets it from ``param_groups`` itself). With ``optimizer.cpu_offload`` the live state
    also holds the hybrid optimizer's ``master_param`` (the host copy of the main parameter, or the main parameter
    itself), which the checkpoint stores as ``param``: it gets that value. Idempotent."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_nsr_step_fix", False):
        return

    def patched(self: Any, model_param: Any, tensors: dict[str, torch.Tensor]) -> None:
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            live = self.optimizer.state[main_param]
            if "step" not in tensors and "step" in live:
                tensors = {**tensors, "step": live["step"]}
            if "master_param" not in tensors and "master_param" in live:
                tensors = {**tensors, "master_param": tensors["param"]}
        original(self, model_param, tensors)

    patched._nsr_step_fix = True  # type: ignore[attr-defined]
    DistributedOptimizer._set_main_param_and_optimizer_states = patched  # type: ignore[method-assign]


def _fix_hybrid_master_params_on_load() -> None:
    """megatron-core 0.16 ``HybridDeviceOptimizer._update_fp32_params_by_new_state`` (run after every state load)
    copies each parameter's loaded ``master_param`` into its fp32 copy, and raises ``KeyError`` for a parameter
    that has none: every fp32 parameter (the distributed optimizer's shards of an fp32 model, or of the fp32 main
    copies). Copy it into the tensor the inner optimizer actually updates instead: the fp32 copy, the host copy of
    an offloaded parameter, or the parameter itself (nothing to do when that tensor already is the master).
    Idempotent."""
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    if getattr(HybridDeviceOptimizer._update_fp32_params_by_new_state, "_nsr_master_fix", False):
        return

    @torch.no_grad()
    def update_inner_params(self: Any) -> None:
        if not self.param_update_in_fp32:
            return
        for param, state in self.state.items():
            inner, master = self.param_to_inner_param.get(param, param), state.get("master_param")
            if isinstance(master, torch.Tensor) and inner is not master:
                inner.data.copy_(master)

    update_inner_params._nsr_master_fix = True  # type: ignore[attr-defined]
    HybridDeviceOptimizer._update_fp32_params_by_new_state = update_inner_params  # type: ignore[method-assign]


def _ensure_optimizer_state(optimizer: Any) -> None:
    """A fresh optimizer (no step taken yet) has no Adam state for a checkpoint to be loaded into: give it
    placeholder state, as megatron-LM does before loading (the values are all replaced by the load)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and len(inner.state) == 0 and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def _unshare_adam_steps(optimizer: Any) -> None:
    """megatron-core 0.16 restores torch Adam's per-parameter ``step`` as ONE tensor shared by every
    parameter (``distrib_optimizer.py``, "Native PyTorch state dict requires step"); torch Adam
    increments it in place once per parameter, so after a resume the bias correction would use a
    step count N times too large. Give every parameter its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _conform(loaded: Any, requested: Any) -> Any:
    """Shape ``loaded`` like ``requested``.

    A checkpoint saved with one optimizer (EP=1) and loaded into megatron's chained optimizer
    (dense + expert, EP>1), or the reverse, carries non-tensor common state (``param_groups``) at
    a different nesting level; the tensors themselves are matched by key. Keys the request lacks
    are dropped; keys the checkpoint lacks keep the requesting optimizer's own common state.
    """
    step = _find_step(loaded)

    def conform(got: Any, want: Any) -> Any:
        if isinstance(want, dict) and isinstance(got, dict):
            return {k: conform(got[k], v) if k in got else _with_step(v, step) for k, v in want.items()}
        return got

    return conform(loaded, requested)


def _find_step(state: Any) -> Any:
    """The optimizer step count stored in any ``param_groups`` entry (megatron keeps them equal)."""
    if isinstance(state, dict):
        for group in state.get("param_groups", []) if isinstance(state.get("param_groups"), list) else []:
            if isinstance(group, dict) and "step" in group:
                return group["step"]
        for v in state.values():
            found = _find_step(v)
            if found is not None:
                return found
    return None


def _with_step(state: Any, step: Any) -> Any:
    if step is None or not isinstance(state, dict):
        return state
    out = {k: _with_step(v, step) for k, v in state.items()}
    if isinstance(out.get("param_groups"), list):  # the checkpoint's count wins over a fresh optimizer's own
        out["param_groups"] = [dict(g, step=step) for g in out["param_groups"]]
    return out


def load_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: Any = None,
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint saved under any layout into ``model`` (+ ``optimizer``); return its meta.

    Collective. Pass ``optimizer=None`` to load weights only (e.g. into a reference model).
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete nsr-megatron checkpoint (no {META_FILE}); pass a step_* folder "
            "written by save_checkpoint, or set checkpoint.resume=auto to pick the newest complete one."
        )
    info = read_meta(path)
    if optimizer is not None and not info.get("has_optimizer", False):
        raise ValueError(f"{path} holds no optimizer state; load it with optimizer=None.")
    if optimizer is not None:
        _fix_torch_adam_step_on_load()
        _fix_hybrid_master_params_on_load()
        _ensure_optimizer_state(optimizer)
    sharded = _sharded_state(model, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(path), strict="assume_ok_unexpected")
    unwrap_model(model).load_state_dict(loaded["model"], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(_conform(loaded["optimizer"], sharded["optimizer"]))
        _unshare_adam_steps(optimizer)
        from nsr_megatron.models.provider import fuse_torch_adam

        fuse_torch_adam(optimizer)  # the loaded param_groups carry the saving run's setting

    return info
