"""Run a test body in N CPU processes over gloo: ``torch.multiprocessing`` spawn, TCP on a free local port.

A worker that raises makes :func:`run` raise ``torch.multiprocessing.ProcessRaisedException`` carrying the
worker's traceback, so the pytest failure shows it; the other workers are terminated. Workers check their
own results (every rank can compute the single-process reference itself), so nothing is passed back.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., None], world_size: int, port: int, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run(fn: Callable[..., None], world_size: int = 2, *args: Any) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; ``fn`` must be module-level."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)
