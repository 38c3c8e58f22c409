"""Rollout: the engine protocol, the in-process engine, SGLang's HTTP protocol (one client, the project's own
server), and the multi-engine tier (launch under a supervisor, spread prompts, push weights, restart).

>>> from nsr_megatron.rollout import EmbeddedEngine, SamplingParams
>>> engine = EmbeddedEngine("path/to/hf_model")
>>> groups = engine.generate([[1, 5, 7]], SamplingParams(max_new_tokens=16, stop_token_ids=(2,)), n=8, seed=0)
>>> groups[0][3].response_ids, groups[0][3].response_logprobs, groups[0][3].finish_reason

Nothing here imports megatron; the trainer pushes HF-named tensors.
"""

from typing import TYPE_CHECKING, Any

from nsr_megatron.rollout.client import EngineError, HttpEngine
from nsr_megatron.rollout.embedded import EmbeddedEngine, sample_tokens
from nsr_megatron.rollout.engine import (
    EngineSetup,
    Generation,
    Resync,
    RolloutEngine,
    RolloutError,
    SamplingParams,
    prompt_seeds,
)

if TYPE_CHECKING:
    from nsr_megatron.rollout.server import RolloutServer


def __getattr__(name: str) -> Any:
    # server.py is imported lazily so that `python -m nsr_megatron.rollout.server` runs without runpy's warning.
    if name == "RolloutServer":
        from nsr_megatron.rollout import server

        return server.RolloutServer
    raise AttributeError(f"module 'nsr_megatron.rollout' has no attribute {name!r}")


__all__ = [
    "EmbeddedEngine",
    "EngineError",
    "EngineSetup",
    "Generation",
    "HttpEngine",
    "Resync",
    "RolloutEngine",
    "RolloutError",
    "RolloutServer",
    "SamplingParams",
    "prompt_seeds",
    "sample_tokens",
]
