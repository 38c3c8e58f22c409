"""Atomic, reshardable checkpoints of the policy (and optimizer) with megatron ``dist_checkpointing``.

Layout of one checkpoint::

    <root>/step_00000010/          # complete checkpoints only (renamed into place last)
        <dist checkpoint files>    # {"model": ..., "optimizer": ...} sharded tensors
        nsr_meta.json              # step, layout it was saved under, user metadata; written last

All ranks write into ``<root>/.tmp-step_00000010/``; after a barrier rank 0 writes ``nsr_meta.json``
and renames the folder. A crash at any point leaves either the previous complete checkpoint or a
``.tmp-*`` folder that :func:`latest_checkpoint` ignores (and :func:`save_checkpoint` clears).
The optimizer state is saved in megatron's ``fully_reshardable`` format, so a checkpoint saved
under one TP / PP / EP layout loads under another.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nsr_megatron.convert.io import META_FILE, commit_checkpoint_dir
from nsr_megatron.models.state import unwrap_model

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

_STEP_DIR = re.compile(r"^step_(\d{8})$")
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
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPT_META)
    return state


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    model: torch.nn.Module,
    optimizer: Any = None,
    *,
    meta: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Save ``model`` (+ ``optimizer``) as ``<root>/step_<step>`` atomically; return its path.

    Collective: every rank must call it. ``meta`` (JSON-serialisable) is stored in ``nsr_meta.json``.
    ``keep_last`` deletes older complete checkpoints beyond that count.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu

    root = Path(root)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(tmp))
    _barrier()
    if _rank() == 0:
        info = {
            "step": step,
            "layout": {
                "tp": mpu.get_tensor_model_parallel_world_size(),
                "pp": mpu.get_pipeline_model_parallel_world_size(),
                "ep": mpu.get_expert_model_parallel_world_size(),
                "dp": mpu.get_data_parallel_world_size(),
            },
            "has_optimizer": optimizer is not None,
            "meta": meta or {},
        }
        commit_checkpoint_dir(tmp, final, info)
        if keep_last:
            for old in _complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root`` (half-written ``.tmp-*`` folders never count)."""
    found = _complete_checkpoints(Path(root))
    return found[-1] if found else None


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(Path(path) / META_FILE, encoding="utf-8") as f:
        return dict(json.load(f))


def _fix_torch_adam_step_on_load() -> None:
    """megatron-core 0.16 ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every
    key of the live optimizer state from the loaded tensors, but the ``fully_reshardable`` loader
    leaves torch Adam's per-parameter ``step`` out (it restores it from ``param_groups``): without
    Transformer Engine / apex (torch Adam) loading fails with ``KeyError: 'step'``. Keep the live
    ``step`` there (megatron sets it from ``param_groups`` itself). Idempotent."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_nsr_step_fix", False):
        return

    def patched(self: Any, model_param: Any, tensors: dict[str, torch.Tensor]) -> None:
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            live = self.optimizer.state[main_param]
            if "step" in live:
                tensors = {**tensors, "step": live["step"]}
        original(self, model_param, tensors)

    patched._nsr_step_fix = True  # type: ignore[attr-defined]
    DistributedOptimizer._set_main_param_and_optimizer_states = patched  # type: ignore[method-assign]


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
    if isinstance(out.get("param_groups"), list):
        out["param_groups"] = [dict(g, step=g.get("step", step)) for g in out["param_groups"]]
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
            "written by save_checkpoint, or use --resume auto to pick the newest complete one."
        )
    info = read_meta(path)
    if optimizer is not None and not info.get("has_optimizer", False):
        raise ValueError(f"{path} holds no optimizer state; load it with optimizer=None.")
    if optimizer is not None:
        _fix_torch_adam_step_on_load()
        _ensure_optimizer_state(optimizer)
    sharded = _sharded_state(model, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(path), strict="assume_ok_unexpected")
    unwrap_model(model).load_state_dict(loaded["model"], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(_conform(loaded["optimizer"], sharded["optimizer"]))
        _unshare_adam_steps(optimizer)

    return info
