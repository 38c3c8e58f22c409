"""The rollout engine protocol: what the trainer asks of any generator (embedded, HTTP, SGLang, one of your own).

A rollout call takes P prompts (token ids) and returns, for each prompt, ``n`` sampled continuations with the
log-probability of every sampled token. The trainer only talks to :class:`RolloutEngine` (generation, health and
recovery, weight updates, memory release), so the in-process
:class:`~nsr_megatron.rollout.embedded.EmbeddedEngine`, a pool of HTTP engines
(:class:`~nsr_megatron.rollout.pool.EnginePool`: the project's server or SGLang) and a backend of your own
(``rollout.backend=module:Factory``, built from an :class:`EngineSetup`) are interchangeable.

Log-probability convention (what ``Generation.response_logprobs`` holds)::

    response_logprobs[t] = log softmax(logits_t / T)[y_t]

the log-probability of the sampled token ``y_t`` under the *temperature-scaled* distribution, computed *before*
top-p / top-k truncation (the truncated distribution is only used to draw ``y_t``). With ``top_p=1, top_k=0`` it is
exactly the log-probability of the behaviour policy; with truncation it is the log-probability of the untruncated
policy at temperature T, which is what the trainer recomputes as ``old_logprobs`` (SGLang and vLLM report the
same quantity).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from nsr_megatron.rollout.weight_sync import SharedLayout

__all__ = ["ROLLOUT_STREAM", "EngineSetup", "FinishReason", "Generation", "Resync", "RolloutEngine", "RolloutError",
           "SamplingParams", "prompt_seeds", "row_key"]

ROLLOUT_STREAM = 0x524F4C4C4F5554
"""Mixed into every rollout draw ("ROLLOUT" in ASCII): keeps rollout uniforms apart from the loss's draws."""


def prompt_seeds(base: int, count: int, start: int = 0) -> list[int]:
    """Seeds of prompts ``start .. start + count - 1`` of a request keyed by ``base``: non-negative 63-bit ints
    (they fit JSON integers and SGLang's ``sampling_seed``)."""
    from nsr_megatron.losses.rng import mix64_int

    head = mix64_int(base & ((1 << 64) - 1))
    return [mix64_int(head ^ (start + i)) >> 1 for i in range(count)]


def row_key(seed: int, sample: int) -> int:
    """The int64 key of sample ``sample`` of a prompt with seed ``seed``: token t's uniform is
    ``nsr_megatron.losses.rng.uniform_from_keys(key, t)``, a pure function of (seed, sample, t)."""
    from nsr_megatron.losses.rng import mix64_int

    key = mix64_int(mix64_int(mix64_int(seed & ((1 << 64) - 1)) ^ ROLLOUT_STREAM) ^ sample)
    return key - (1 << 64) if key >= 1 << 63 else key

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample one batch of continuations.

    Args:
        max_new_tokens: at most this many tokens are generated per sequence (>= 1); reaching it gives
            ``finish_reason="length"``.
        temperature: logits are divided by it before the softmax (> 0; use ``top_k=1`` for greedy decoding).
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability sums to at least
            ``top_p`` (in (0, 1]; 1 = off).
        top_k: keep only the ``top_k`` most likely tokens (>= 0; 0 = off; 1 = greedy).
        stop_token_ids: a sequence ends right after it emits one of these ids (the stop token is kept in the
            response and gets a log-prob); ``finish_reason="stop"``.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens={self.max_new_tokens!r} must be an int >= 1; "
                "set it to the longest response you want."
            )
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool):
            raise ValueError(f"SamplingParams.temperature={self.temperature!r} must be a number > 0.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"SamplingParams.temperature={self.temperature!r} must be finite and > 0; "
                "for greedy decoding use top_k=1 (with any temperature)."
            )
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p={self.top_p!r} must be in (0, 1]; use 1.0 to turn it off.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k={self.top_k!r} must be an int >= 0; use 0 to turn it off.")
        stop = self.stop_token_ids
        if not isinstance(stop, (tuple, list)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop
        ):
            raise ValueError(
                f"SamplingParams.stop_token_ids={stop!r} must be a tuple of non-negative token ids, "
                "e.g. (tokenizer.eos_token_id,)."
            )
        object.__setattr__(self, "stop_token_ids", tuple(stop))


@dataclass(kw_only=True)
class Generation:
    """One sampled continuation of one prompt.

    ``response_logprobs[t]`` is ``log softmax(logits_t / T)[response_ids[t]]``: temperature-scaled, taken *before*
    top-p / top-k truncation (see the module docstring). ``response_ids`` includes the stop token when
    ``finish_reason == "stop"``.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    # With return_routed_experts: the experts of every token the engine ran, [P + R - 1, MoE layers, k] int
    # (the prompt's tokens, then each response token but the last; as SGLang's routed_experts).
    routed_experts: torch.Tensor | None = None


class RolloutError(RuntimeError):
    """The rollout tier cannot go on (say an engine failed more often than ``rollout.max_restarts``), or a weight
    update did not land (the engine then counts the replicas it missed as stale and brings them to the current
    weights in the next :meth:`RolloutEngine.ensure_healthy`); the message says why."""


Resync = Callable[[list[int]], None]
"""``resync(engines)``: bring replicas ``engines`` to the trainer's current weights. The trainer's callback: every
rank exports the weights again and the driver passes them to ``RolloutEngine.update_weights(..., engines=...)``."""


@dataclass(frozen=True, kw_only=True)
class EngineSetup:
    """What a rollout backend is built from: ``rollout.backend=module:Factory`` calls ``Factory(setup)`` on the
    driver rank (README, "Adding a rollout backend").

    Args:
        hf_path: the policy's Hugging Face folder (``config.json``, tokenizer, the starting weights); the trainer
            pushes its own weights through :meth:`RolloutEngine.update_weights` before the first rollout.
        device: the driver rank's device type, ``cuda`` or ``cpu``.
        dtype: the policy's parameter dtype (``model.params_dtype``).
        max_batch_size: ``rollout.max_batch_size``: rows (prompt x sample) per forward.
        num_engines: ``rollout.num_engines``: replicas the backend may run.
        log_dir: where the backend may write its logs (``<run_dir>/engines``; create it if needed).
    """

    hf_path: str
    device: str
    dtype: torch.dtype
    max_batch_size: int
    num_engines: int
    log_dir: Path


@runtime_checkable
class RolloutEngine(Protocol):
    """Everything the trainer asks of a generator, and all it knows of one (``trainer/loop.py`` asks nothing else).

    An engine runs one or more *replicas* of the model (the pool: one per server process); ``engines`` arguments
    name replicas by index, and an engine with one replica ignores them. Only the driver rank holds the engine.
    A method that does nothing for an engine is a no-op whose docstring says why.

    - **generation**: :meth:`generate`.
    - **health and recovery**: :meth:`ensure_healthy` before each rollout restarts what died and resyncs what
      missed the current weights; :attr:`restarts` counts restarts (``rollout/restarts``).
    - **weights**: :meth:`update_weights` (HF-named full tensors, streamed; the engine's own transport:
      ``distributed``, ``disk``, ``tensor`` or a copy in this process), or a shared-memory session
      (:meth:`open_shared_update`, :meth:`close_shared_update`) in which every trainer rank writes its own shards;
      :meth:`set_weight_sync` switches the transport (the fallback from ``shared_memory``).
    - **memory**: :meth:`release_memory` and :meth:`resume_memory` around training, for engines that share the
      training devices.
    - :meth:`close`.
    """

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        n: int = 1,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        return_routed_experts: bool = False,
    ) -> list[list[Generation]]:
        """Sample ``n`` continuations of every prompt; ``result[i][j]`` is sample ``j`` of prompt ``i``.
        ``seeds[i]`` (default: ``prompt_seeds(seed, len(prompts))``) keys prompt i's draws, so a prompt samples
        the same whichever call or engine serves it. ``return_routed_experts`` (MoE) fills
        ``Generation.routed_experts``. A replica that fails here is restarted, resynced through the ``resync`` of
        the last :meth:`ensure_healthy`, and its prompts are sent again: a call returns every group or raises."""
        ...

    @property
    def restarts(self) -> int:
        """Replica restarts over the engine's life (the trainer logs each step's new ones as ``rollout/restarts``)."""
        ...

    def ensure_healthy(self, resync: Resync) -> None:
        """Before a rollout: restart replicas whose process died or that fail their health check, and bring every
        replica that missed the current weights (restarted, or left behind by a failed update) to them through
        ``resync``. ``resync`` is kept for the replicas that fail in the following :meth:`generate` calls; a
        ``resync`` that raises leaves its replicas stale, for the next call. Raises :class:`RolloutError` past the
        engine's restart budget."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str = "", *,
                       engines: Sequence[int] | None = None) -> int:
        """Load Hugging Face-named full tensors (streamed) into replicas ``engines`` (default: all), set the weight
        version, and drop whatever the old weights cached (KV, prefixes); return how many tensors were loaded.

        An unknown name or a shape mismatch raises ``ValueError`` naming the tensor and both shapes. A transport
        failure raises :class:`RolloutError` (the replicas count as stale until :meth:`ensure_healthy`); the
        trainer goes on.
        """
        ...

    def open_shared_update(self) -> list[SharedLayout]:
        """``rollout.weight_sync=shared_memory``: open a weight update on every replica and return where each
        replica's weights sit in its shared memory; the trainer's ranks write their shards there, then
        :meth:`close_shared_update`. Raises :class:`RolloutError` when the session cannot start (the replicas are
        stale until :meth:`ensure_healthy`), ``ValueError`` from an engine without this transport (preflight lets
        only the project's server be asked)."""
        ...

    def close_shared_update(self, version: str, *, written: bool = True) -> None:
        """End the session of :meth:`open_shared_update`: with ``written`` every replica now holds weight version
        ``version``; without, a rank could not write and the replicas count as stale (:class:`RolloutError`)."""
        ...

    def set_weight_sync(self, mode: str) -> None:
        """Send the next :meth:`update_weights` over ``mode`` (``distributed``, ``disk``, ...): the trainer falls
        back from ``shared_memory`` to ``distributed`` when a rank cannot map the engines' memory."""
        ...

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Free the engine's device memory while the trainer uses the devices it shares with the engine: ``tags``
        (``weights``, ``kv_cache``) or all of it (None). Released weights come back with ``resume_memory``
        before a weight update refills them."""
        ...

    def resume_memory(self, tags: list[str]) -> None:
        """Take released memory back: ``["weights"]`` (before a weight update), ``["kv_cache"]`` (before
        generating); a tag that was not released is skipped."""
        ...

    def close(self) -> None:
        """Release what the engine holds (stop the processes it started)."""
        ...
