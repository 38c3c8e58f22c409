"""Device and backend selection, and the CPU compatibility layer for megatron-core.

On a machine with CUDA this module does nothing but pick ``cuda`` + NCCL. Without CUDA,
megatron-core 0.16 still runs forward, backward, the distributed optimizer and
``dist_checkpointing`` on CPU over gloo once the CUDA-only calls it makes are answered.
:func:`install_cpu_compat` answers exactly those, and nothing else. Each part names the
megatron-core code it addresses:

1. ``torch.cuda.current_device()`` is used as a ``device=`` argument in tensor factories all
   over megatron-core (``tensor_parallel/layers.py``, ``tensor_parallel/mappings.py``,
   ``distributed/param_and_grad_buffer.py``, ``transformer/moe/router.py``,
   ``transformer/moe/experts.py``, ``optimizer/distrib_optimizer.py``): it returns the CPU device.
2. Literal ``device="cuda"`` factories and ``Tensor.cuda()`` calls
   (``transformer/utils.py`` attention masks, ``pipeline_parallel/schedules.py`` token counts,
   ``optimizer/clip_grads.py``, ``models/common/language_module/language_module.py``,
   ``tensor_parallel/data.py``): a :class:`torch.overrides.TorchFunctionMode` maps the CUDA device
   to the CPU. The same mode answers ``Tensor.type()`` with the CUDA type names that
   ``optimizer/optimizer.py``, ``optimizer/distrib_optimizer.py`` and ``optimizer/clip_grads.py``
   compare against (``'torch.cuda.FloatTensor'``), and makes ``Tensor.record_stream`` a no-op
   (``transformer/moe/moe_utils.py``).
3. Streams and events: ``torch.cuda.Stream`` / ``Event`` / ``current_stream`` / ``stream`` / ``synchronize``
   (``transformer/moe/token_dispatcher.py`` alltoall dispatcher, ``transformer/moe/shared_experts.py``,
   ``distributed/distributed_data_parallel.py``) become no-op stand-ins: CPU ops are synchronous.
4. RNG: the CUDA RNG tracker of ``tensor_parallel/random.py`` (``model_parallel_cuda_manual_seed``,
   ``CudaRNGStatesTracker.add`` / ``fork``) reads and writes the CPU generator instead; its warning
   "CPU RNG state changed within GPU RNG context" is expected here (the two are one generator) and
   is filtered.
5. ``transformer/moe/moe_utils.py`` refers to ``te_general_gemm`` in the router's fp32 GEMM, but only
   defines it when Transformer Engine imports (NameError otherwise): it is set to ``None`` so the
   torch path runs.
6. ``transformer/moe/token_dispatcher.py`` (alltoall dispatcher) turns its split sizes into numpy
   arrays through ``moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True)``, which only converts
   tensors that are on the GPU; on CPU they stay tensors and ``all_to_all_single`` rejects them.
   The dispatcher's reference is replaced by one that also converts CPU tensors.
7. Activation recompute (``tensor_parallel/random.py`` ``CheckpointFunction.backward``,
   ``CheckpointWithoutOutput._recompute``) reruns layers inside ``torch.autograd.backward``, which part 2's
   mode handles, and a mode is off while its own handler runs: these two run under a fresh instance of it.
8. ``distributed/param_and_grad_buffer.py`` reduce-scatters the gradient buffer and all-gathers the parameter
   buffer in place (each rank's shard is a view into the whole buffer) on every optimizer step. In a group of
   one rank the shard is the whole buffer and there is nothing to move, but gloo copies it anyway (NCCL does
   not): three copies of the whole buffer per step here. Those calls return at once when the group has one member
   and the shard is the buffer itself (an exact no-op: the values stay the same bits).
9. ``optimizer/cpu_offloading/hybrid_optimizer.py`` (``optimizer.cpu_offload``) offloads the parameters that are
   ``is_cuda`` and makes their host copies with ``.cpu().pin_memory()``. On CPU no parameter is a device one:
   nothing would be offloaded, and ``step`` then looks up host copies that were never made (``KeyError``).
   ``_get_sub_optimizer_param_groups`` is replaced by the same split with the CPU as the device: the first
   ``offload_fraction`` of the elements, in parameter order, get a host copy of their own storage (unpinned:
   pinning needs an accelerator), updated by the host optimizer and copied back after each step, exactly the
   path a GPU takes, minus the transfer.

The sequence-parallel-capable RMSNorm that ``WrappedTorchNorm`` lacks is a model component and
lives in :mod:`nsr_megatron.models.norm`, not here.

The overhead of part 2 is one Python-level dispatch per torch call; ``bench/bench_platform.py``
measures it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "DeviceInfo",
    "SUPPORTED_MCORE",
    "check_mcore_version",
    "cpu_compat_installed",
    "device_info",
    "install_cpu_compat",
    "outside_cpu_compat",
]

# megatron-core releases this layer was written and tested for (major, minor).
SUPPORTED_MCORE: tuple[tuple[int, int], ...] = ((0, 16),)
_CPU_RNG_WARNING = "CPU RNG state changed within GPU RNG context"


@dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    """Where tensors live and which collective backend torch.distributed uses."""

    device: torch.device
    backend: str  # "nccl" | "gloo"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def device_info(local_rank: int | None = None) -> DeviceInfo:
    """CUDA + NCCL when a GPU is visible, else CPU + gloo.

    ``NSR_FORCE_CPU=1`` forces the CPU path on a GPU machine (useful for debugging).
    """
    if torch.cuda.is_available() and os.environ.get("NSR_FORCE_CPU", "0") != "1":
        rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
        return DeviceInfo(device=torch.device("cuda", rank % torch.cuda.device_count()), backend="nccl")
    return DeviceInfo(device=torch.device("cpu"), backend="gloo")


def check_mcore_version() -> str:
    """Return megatron-core's version; raise if it is older than this layer supports."""
    import megatron.core

    version = str(getattr(megatron.core, "__version__", "0.0.0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if len(parts) < 2 or parts < SUPPORTED_MCORE[0]:
        raise RuntimeError(
            f"megatron-core {version} is too old: nsr-megatron needs megatron-core >= 0.16.1. "
            "Fix: pip install 'megatron-core>=0.16.1,<0.17'."
        )
    if parts not in SUPPORTED_MCORE:
        logging.getLogger(__name__).warning(
            "megatron-core %s is newer than the versions the CPU compatibility layer was written for "
            "(%s); it may need updating if a CUDA-only call is hit.",
            version,
            ", ".join(f"{a}.{b}" for a, b in SUPPORTED_MCORE),
        )
    return version


# --------------------------------------------------------------------------------------------
# Part 2: the device-mapping TorchFunctionMode.
# --------------------------------------------------------------------------------------------
_CPU = torch.device("cpu")


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Runs CUDA-addressed torch calls on the CPU (see the module docstring, part 2)."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda") else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Part 3: stream stand-ins.
# --------------------------------------------------------------------------------------------
class _NullEvent:
    """A CUDA event stand-in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullStream:
    """A CUDA stream stand-in: every CPU op is already synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _NullEvent()

    def query(self) -> bool:
        return True


_NULL_STREAM = _NullStream()


class _RngWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _CPU_RNG_WARNING not in record.getMessage()


_INSTALLED: dict[str, Any] = {}


def _skip_in_place_single(collective: Callable[..., Any]) -> Callable[..., Any]:
    """``collective(output, input, group=..., async_op=...)`` (all-gather or reduce-scatter into a tensor),
    skipped when ``group`` has one rank and ``input`` is ``output`` itself (same memory, same size): the
    result would be the input, bit for bit. Anything else, and asynchronous calls, go to ``collective``
    (looked up as ``__wrapped__`` at each call)."""
    import torch.distributed as dist

    def call(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if ("group" in kwargs and not args and not kwargs.get("async_op", False)  # megatron's keyword calls only
                and output.data_ptr() == input.data_ptr()
                and output.numel() == input.numel() and output.dtype == input.dtype
                and dist.get_world_size(kwargs["group"]) == 1):
            return None
        return call.__wrapped__(output, input, *args, **kwargs)  # type: ignore[attr-defined]

    call.__wrapped__ = collective  # type: ignore[attr-defined]
    return call


# --------------------------------------------------------------------------------------------
# Part 9: the hybrid-device optimizer's host copies.
# --------------------------------------------------------------------------------------------
def _host_split(self: Any, offload_fraction: float) -> tuple[Any, ...]:
    """megatron-core 0.16 ``HybridDeviceOptimizer._get_sub_optimizer_param_groups`` with the CPU standing for the
    device (see the module docstring, part 9). Returns what the original returns: the host and device parameter
    groups, the maps between each offloaded parameter and its host copy, and the fp32 copies made for 16-bit
    parameters when ``param_update_in_fp32``."""
    params = [p for group in self.param_groups for p in group["params"]]
    threshold = sum(p.numel() for p in params) * offload_fraction
    offloaded = 0
    host_groups: list[dict[str, Any]] = []
    device_groups: list[dict[str, Any]] = []
    to_host: dict[torch.Tensor, torch.Tensor] = {}
    from_host: dict[torch.Tensor, torch.Tensor] = {}
    to_fp32: dict[torch.Tensor, torch.Tensor] = {}
    for group in self.param_groups:
        host_group, device_group = dict(group, params=[]), dict(group, params=[])
        for orig in group["params"]:
            param, on_host = orig, offloaded < threshold
            if on_host:
                param = orig.detach().clone()  # its own storage, as a GPU parameter's host copy has
                offloaded += param.numel()
            if self.param_update_in_fp32 and param.dtype != torch.float32:
                param = param.detach().clone().float()
                to_fp32[orig] = param
            if on_host:
                to_host[orig], from_host[param] = param, orig
            (host_group if on_host else device_group)["params"].append(param)
        host_groups += [host_group] if host_group["params"] else []
        device_groups += [device_group] if device_group["params"] else []
    return host_groups, device_groups, to_host, from_host, to_fp32


def cpu_compat_installed() -> bool:
    return bool(_INSTALLED)


@contextlib.contextmanager
def outside_cpu_compat() -> Any:
    """Torch calls in the block skip part 2's mode: for code that never addresses CUDA (the Hugging Face model of
    the embedded rollout engine), which would otherwise pay the mode's Python-level dispatch on every call. A no-op
    when the layer is not installed (CUDA machines) or when another mode is on top of it."""
    mode = _INSTALLED.get("mode")
    stack = torch.overrides._get_current_function_mode_stack()  # type: ignore[attr-defined]
    if mode is None or not stack or stack[-1] is not mode:
        yield
        return
    with torch.overrides._pop_mode_temporarily():  # type: ignore[attr-defined]
        yield


def install_cpu_compat() -> bool:
    """Make megatron-core run on CPU + gloo. No-op (returns False) when CUDA is available.

    Idempotent. Call before building megatron models (``parallel.initialize`` does).
    """
    if torch.cuda.is_available() and os.environ.get("NSR_FORCE_CPU", "0") != "1":
        return False
    if _INSTALLED:
        return True
    check_mcore_version()

    # Part 1 and 3 and 4: answers for torch.cuda functions that fail without CUDA.
    cuda = torch.cuda
    def _seed(seed: int) -> None:  # torch.manual_seed itself calls torch.cuda.manual_seed_all
        torch.default_generator.manual_seed(int(seed))

    replacements: dict[str, Any] = {
        "current_device": lambda: _CPU,
        "Stream": _NullStream,
        "Event": _NullEvent,
        "current_stream": lambda device=None: _NULL_STREAM,
        "stream": lambda stream=None: contextlib.nullcontext(),
        "synchronize": lambda device=None: None,
        "get_rng_state": lambda device="cuda": torch.get_rng_state(),
        "set_rng_state": lambda new_state, device="cuda": torch.set_rng_state(new_state),
        "manual_seed": _seed,
        "manual_seed_all": _seed,
    }
    _INSTALLED["torch.cuda"] = {name: getattr(cuda, name) for name in replacements}
    for name, value in replacements.items():
        setattr(cuda, name, value)

    # Part 4: megatron-core's RNG tracker.
    from megatron.core.tensor_parallel import random as mcore_random

    _INSTALLED["random"] = (mcore_random._get_cuda_rng_state, mcore_random._set_cuda_rng_state)

    def _get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def _set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mcore_random._get_cuda_rng_state = _get_state
    mcore_random._set_cuda_rng_state = _set_state
    logging.getLogger(mcore_random.__name__).addFilter(_RngWarningFilter())

    # Part 5: the router GEMM's optional Transformer Engine kernel.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # type: ignore[attr-defined]

    # Part 6: the alltoall dispatcher's split sizes.
    from megatron.core.transformer.moe import token_dispatcher

    _INSTALLED["maybe_move_tensor_to_cpu"] = token_dispatcher.maybe_move_tensor_to_cpu

    def _to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = _to_host

    # Part 7: activation recompute. A mode is off while its handler runs, and ``torch.autograd.backward`` goes
    # through the handler, so the layers recomputed in the backward pass run without part 2: they get it back.
    from megatron.core.tensor_parallel.random import CheckpointFunction, CheckpointWithoutOutput

    def _with_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with _CudaToCpuMode():
                return fn(*args, **kwargs)
        return wrapped

    _INSTALLED["recompute"] = (CheckpointFunction.backward, CheckpointWithoutOutput._recompute)
    CheckpointFunction.backward = staticmethod(_with_mode(CheckpointFunction.backward))  # type: ignore[method-assign]
    CheckpointWithoutOutput._recompute = _with_mode(CheckpointWithoutOutput._recompute)  # type: ignore[method-assign]

    # Part 8: the DDP buffers' in-place collectives in a group of one rank.
    from megatron.core.distributed import param_and_grad_buffer as buffers

    _INSTALLED["buffer_collectives"] = (buffers.dist_all_gather_func, buffers.dist_reduce_scatter_func)
    buffers.dist_all_gather_func = _skip_in_place_single(buffers.dist_all_gather_func)
    buffers.dist_reduce_scatter_func = _skip_in_place_single(buffers.dist_reduce_scatter_func)

    # Part 9: the hybrid-device optimizer's split between the device and the host.
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    _INSTALLED["hybrid_split"] = HybridDeviceOptimizer._get_sub_optimizer_param_groups
    HybridDeviceOptimizer._get_sub_optimizer_param_groups = _host_split  # type: ignore[method-assign]

    # Part 2: device mapping for literal "cuda" factories, .cuda(), .type() names.
    mode = _CudaToCpuMode()
    mode.__enter__()
    _INSTALLED["mode"] = mode
    return True
