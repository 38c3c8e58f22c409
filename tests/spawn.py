"""Run a test body in N real processes over gloo (torch.multiprocessing, spawn)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world_size: int, init_file: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = str(rank), str(world_size), str(rank)
    fn(rank, world_size, f"file://{init_file}", *args)


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call ``fn(rank, world_size, init_method, *args)`` in ``world_size`` processes; re-raise failures.

    ``fn`` must be a module-level function. Workers return results by writing files.
    """
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        mp.spawn(_entry, args=(fn, world_size, init_file, args), nprocs=world_size, join=True)
