"""The driver hands each data-parallel rank its own share of a step's samples (one scatter over the world): with
DP=2 each rank receives only its half; with TP=2 (DP=1) both ranks receive the same, whole share."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.spawn import run_workers


def _worker(rank: int, world: int, init: str, out: str, layout: dict[str, Any]) -> None:
    from nsr_megatron import parallel
    from nsr_megatron.config import ParallelConfig
    from nsr_megatron.trainer.experience import Sample, dp_shard
    from nsr_megatron.trainer.loop import _hand_out

    state = parallel.initialize(ParallelConfig(**layout), seed=1, rank=rank, world_size=world, init_method=init)
    samples = [Sample(uid=i, prompt_ids=[1, 2], response_ids=[3] * (i + 1), rollout_logprobs=[0.0] * (i + 1),
                      reward=float(i % 2), advantage=0.5) for i in range(6)]
    shares = [dp_shard(samples, d, state.dp_size) for d in range(state.dp_size)] if rank == 0 else None
    rt = SimpleNamespace(state=state, dp_ranks=None)
    got = [s.uid for s in _hand_out(rt, shares)]  # type: ignore[arg-type]
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"dp_rank": state.dp_rank, "uids": got}, f)
    parallel.destroy()


@pytest.mark.parametrize("layout,expected", [({}, [[0, 2, 4], [1, 3, 5]]),
                                             ({"tp": 2}, [[0, 1, 2, 3, 4, 5]] * 2)], ids=["dp2", "tp2"])
def test_each_rank_receives_its_share(tmp_path: Path, layout: dict[str, Any], expected: list[list[int]]) -> None:
    run_workers(_worker, 2, str(tmp_path), layout)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text())["uids"] for r in range(2)]
    assert got == expected
