"""Process groups: torch.distributed (NCCL on CUDA, gloo on CPU) and megatron-core's parallel state."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nsr_megatron.config import ParallelConfig
from nsr_megatron.platform import DeviceInfo, device_info, install_cpu_compat

__all__ = ["ParallelState", "destroy", "initialize"]


@dataclass(frozen=True, kw_only=True)
class ParallelState:
    rank: int
    world_size: int
    device: torch.device
    backend: str
    tp_rank: int
    pp_rank: int
    ep_rank: int
    dp_rank: int
    dp_size: int


def initialize(
    parallel: ParallelConfig,
    *,
    seed: int = 1234,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    timeout_minutes: int = 30,
) -> ParallelState:
    """Start torch.distributed (from torchrun's environment unless given) and megatron's groups.

    On CPU this first installs :mod:`nsr_megatron.platform`'s compatibility layer.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    info: DeviceInfo = device_info()
    if not info.is_cuda:
        install_cpu_compat()
    else:
        torch.cuda.set_device(info.device)
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
        if init_method is None and "MASTER_ADDR" not in os.environ:
            if world_size != 1:
                raise RuntimeError(
                    f"world size {world_size} without MASTER_ADDR/MASTER_PORT: launch with torchrun "
                    "(e.g. torchrun --nproc_per_node 2 -m nsr_megatron.cli ...)."
                )
            init_method = f"tcp://127.0.0.1:{_free_port()}"  # a single process: any free loopback port
        dist.init_process_group(
            backend=info.backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            context_parallel_size=parallel.cp,
            expert_model_parallel_size=parallel.ep,
            expert_tensor_parallel_size=parallel.etp,
            create_gloo_process_groups=info.is_cuda,  # on CPU the default groups already are gloo
            distributed_timeout_minutes=timeout_minutes,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return ParallelState(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=info.device,
        backend=info.backend,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        ep_rank=mpu.get_expert_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        dp_size=mpu.get_data_parallel_world_size(),
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def destroy() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
