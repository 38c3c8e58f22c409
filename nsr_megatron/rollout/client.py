"""The one client of SGLang's HTTP protocol (0.5.23), for real SGLang engines and the project's own server alike.

Standard library only (``urllib``). Requests and replies are SGLang's (``shared/SGLANG.md``):

- ``POST /generate``: ``{"input_ids": [[...], ...], "sampling_params": [{max_new_tokens, temperature, top_p,
  top_k (-1 = off), stop_token_ids, n, sampling_seed}, ... one per prompt], "return_logprob": true}``; the reply is
  prompt-major (entry ``i * n + j`` is sample j of prompt i), each with ``output_ids`` and ``meta_info``
  (``finish_reason``, ``output_token_logprobs`` = ``[[logprob, token_id, null], ...]``, ``weight_version``).
- ``GET /health_generate``, ``GET /model_info``; ``POST /flush_cache`` (400 while requests run: retried),
  ``/pause_generation``, ``/continue_generation``.
- weights: ``/begin_weight_update`` and ``/end_weight_update`` around ``/init_weights_update_group`` +
  ``/update_weights_from_distributed`` (+ ``/destroy_weights_update_group``), and ``/update_weights_from_disk``.
  Replies are ``{"success": bool, "message": str}``; a failure raises :class:`EngineError` with the message.

A sample that SGLang aborted (``finish_reason.type == "abort"``, e.g. under ``/pause_generation``) raises
:class:`EngineAborted`: the caller retries the request, so a step never trains on partial groups.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from nsr_megatron.rollout.engine import Generation, SamplingParams, prompt_seeds

if TYPE_CHECKING:
    from nsr_megatron.rollout.weight_sync import SharedLayout

__all__ = ["EngineAborted", "EngineError", "EngineUnreachable", "HttpEngine", "TOKEN_ENV"]

TOKEN_ENV = "NSR_ROLLOUT_TOKEN"


class EngineError(RuntimeError):
    """An engine answered with an error; the message carries the engine's URL, the endpoint and its reason."""


class EngineUnreachable(EngineError):
    """The engine did not answer (connection refused or reset, time-out): it may have died."""


class EngineAborted(EngineError):
    """The engine aborted a request (paused, or shutting down); the request can be sent again."""


class HttpEngine:
    """A client of one engine at ``base_url`` (e.g. ``http://127.0.0.1:30000``).

    Args:
        base_url: the engine's address.
        api_token: sent as ``Authorization: Bearer <token>`` (default: env ``NSR_ROLLOUT_TOKEN``).
        timeout_s: per-request time limit.
    """

    def __init__(self, base_url: str, *, api_token: str | None = None, timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_token = api_token if api_token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"HttpEngine({self.base_url!r})"

    # ------------------------------------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        n: int = 1,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        return_routed_experts: bool = False,
        topk: int = 0,
    ) -> list[list[Generation]]:
        """``return_routed_experts`` asks for each token's experts (``topk`` per token, the model's k)."""
        keyed = list(seeds) if seeds is not None else prompt_seeds(seed, len(prompts))
        if len(keyed) != len(prompts):
            raise ValueError(f"generate: {len(keyed)} seeds for {len(prompts)} prompts; pass one per prompt.")
        body = {
            "input_ids": [list(p) for p in prompts],
            "sampling_params": [_sampling_params(params, n, s) for s in keyed],
            "return_logprob": True,
        }
        if return_routed_experts:
            if topk < 1:
                raise ValueError("generate(return_routed_experts=True) needs topk, the model's experts per token.")
            body["return_routed_experts"] = True
        out = self._json("POST", "/generate", body)
        if isinstance(out, dict):
            out = [out]
        if not isinstance(out, list) or len(out) != len(prompts) * n:
            raise EngineError(f"{self.base_url}/generate returned {type(out).__name__} of length "
                              f"{len(out) if isinstance(out, list) else '-'}, expected a list of {len(prompts) * n}.")
        groups: list[list[Generation]] = []
        for i, prompt in enumerate(prompts):
            group = []
            for item in out[i * n : (i + 1) * n]:
                meta = item["meta_info"]
                finish = meta.get("finish_reason") or {}
                if finish.get("type") == "abort":
                    raise EngineAborted(f"{self.base_url}/generate: a request was aborted ({finish.get('message')}).")
                logprobs = meta.get("output_token_logprobs") or []
                group.append(Generation(
                    prompt_ids=list(prompt),
                    response_ids=list(item["output_ids"]),
                    response_logprobs=[float(lp) if lp is not None else math.nan for lp, *_ in logprobs],
                    finish_reason="stop" if finish.get("type") == "stop" else "length",
                    routed_experts=_routed(meta, topk) if return_routed_experts else None,
                ))
            groups.append(group)
        return groups

    # ------------------------------------------------------------------------------------------------ state
    def healthy(self, timeout_s: float = 5.0) -> bool:
        """``GET /health_generate`` answered 200 within ``timeout_s``."""
        try:
            self._request("GET", "/health_generate", timeout_s=timeout_s)
        except EngineError:
            return False
        return True

    def wait_healthy(self, timeout_s: float, *, alive: Any = None) -> None:
        """Poll ``/health_generate`` until it answers; ``alive()`` (optional) says whether to keep waiting."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.healthy(timeout_s=5.0):
                return
            if alive is not None and not alive():
                raise EngineUnreachable(f"{self.base_url}: the engine process exited before it became healthy.")
            time.sleep(0.5)
        raise EngineUnreachable(f"{self.base_url}: not healthy within {timeout_s:.0f} s.")

    def model_info(self) -> dict[str, Any]:
        return dict(self._json("GET", "/model_info"))

    def weight_version(self) -> str:
        return str(self.model_info().get("weight_version"))

    def flush_cache(self, *, retries: int = 50, wait_s: float = 0.1) -> None:
        """``POST /flush_cache``; SGLang answers 400 while requests run, so it is retried."""
        for attempt in range(retries):
            try:
                self._request("POST", "/flush_cache", b"", "text/plain")
                return
            except EngineError as exc:
                if "HTTP 400" not in str(exc) or attempt == retries - 1:
                    raise
                time.sleep(wait_s)

    def pause(self, mode: str = "abort") -> None:
        self._json("POST", "/pause_generation", {"mode": mode})

    def resume(self) -> None:
        self._json("POST", "/continue_generation", {})

    # ------------------------------------------------------------------------------------------------ weights
    def begin_weight_update(self) -> None:
        self._weights("/begin_weight_update", {})

    def end_weight_update(self) -> None:
        self._weights("/end_weight_update", {})

    def init_weights_update_group(self, *, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str) -> None:
        self._weights("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend})

    def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str, weight_version: str, flattened: bool) -> None:
        self._weights("/update_weights_from_distributed", {
            "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name, "flush_cache": False,
            "weight_version": weight_version, "load_format": "flattened_bucket" if flattened else None})

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._weights("/destroy_weights_update_group", {"group_name": group_name})

    def update_weights_from_disk(self, model_path: str, weight_version: str) -> None:
        self._weights("/update_weights_from_disk",
                      {"model_path": model_path, "weight_version": weight_version, "flush_cache": True})

    def shared_weights(self) -> SharedLayout:
        """The project's server only: its weights moved into shared memory, and where each tensor sits there
        (a :class:`~nsr_megatron.rollout.weight_sync.SharedLayout`)."""
        from nsr_megatron.rollout.weight_sync import SharedLayout

        reply = self._json("POST", "/shared_weights", {})
        if not isinstance(reply, dict) or not reply.get("success", False):
            raise EngineError(f"{self.base_url}/shared_weights: {reply!r:.300}")
        try:
            return SharedLayout.from_json(reply)
        except ValueError as exc:
            raise EngineError(f"{self.base_url}/shared_weights: {exc}") from None

    def update_weights_from_shared_memory(self, weight_version: str) -> None:
        """The project's server only: the trainer ranks wrote new weights into its shared memory."""
        self._weights("/update_weights_from_shared_memory", {"weight_version": weight_version, "flush_cache": True})

    def update_weights_from_tensor(self, bucket: Any, weight_version: str, *, tp_size: int = 1) -> None:
        """Colocated CUDA engines: hand a flat bucket over as CUDA IPC handles (SGLang's
        ``MultiprocessingSerializer`` and ``FlattenedTensorBucket``, so sglang must be importable here: the ``gpu``
        extra). One serialized copy per engine TP rank. Not for CPU tensors or the project's server."""
        try:
            from sglang.srt.utils import MultiprocessingSerializer  # type: ignore[import-not-found]
            from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket  # type: ignore[import-not-found]
        except ImportError as exc:
            raise EngineError("the colocated tensor update needs sglang in the trainer's environment (pip install "
                              "'nsr-megatron[gpu]'); use rollout.weight_sync=distributed otherwise.") from exc
        if not bucket.data.is_cuda:
            raise EngineError("the colocated tensor update sends CUDA IPC handles; these tensors are on the CPU.")
        flat = FlattenedTensorBucket(named_tensors=bucket.tensors())
        payload = {"flattened_tensor": flat.get_flattened_tensor(), "metadata": flat.get_metadata()}
        serialized = MultiprocessingSerializer.serialize(payload, output_str=True)
        self._weights("/update_weights_from_tensor", {
            "serialized_named_tensors": [serialized] * tp_size, "load_format": "flattened_bucket",
            "flush_cache": False, "weight_version": weight_version})

    def release_memory(self, tags: list[str] | None = None) -> None:
        """``/release_memory_occupation``: a colocated engine frees its GPU memory (weights, KV cache) for training."""
        self._json("POST", "/release_memory_occupation", {"tags": tags})

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """``/resume_memory_occupation``: take the released memory back (``["weights"]`` first, then the rest)."""
        self._json("POST", "/resume_memory_occupation", {"tags": tags})

    def weights_checksums(self) -> dict[str, str]:
        """``POST /weights_checker {"action": "checksum"}``: parameter name -> 16-hex digit checksum (of the first
        engine rank; SGLang names its own, fused parameters)."""
        out = self._json("POST", "/weights_checker", {"action": "checksum"})
        return dict(out["ranks"][0]["checksums"])

    def _weights(self, path: str, body: dict[str, Any]) -> None:
        out = self._json("POST", path, body)
        if isinstance(out, dict) and out.get("success") is False:
            raise EngineError(f"{self.base_url}{path}: {out.get('message')}")

    # ------------------------------------------------------------------------------------------------ transport
    def _json(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        raw = self._request(method, path, data, "application/json" if data is not None else None)
        return json.loads(raw) if raw.strip() else None

    def _request(self, method: str, path: str, data: bytes | None = None, content_type: str | None = None,
                 timeout_s: float | None = None) -> bytes:
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        if self.api_token:
            req.add_header("Authorization", f"Bearer {self.api_token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            raise EngineError(f"{method} {self.base_url}{path} -> HTTP {exc.code}: {_reason(exc.read())}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            raise EngineUnreachable(f"{method} {self.base_url}{path}: {exc}") from None


def _routed(meta: dict[str, Any], topk: int) -> torch.Tensor:
    """SGLang's ``routed_experts`` (base64 of int32 [prompt + completion - 1, layers, k]) as an int16 tensor."""
    raw = meta.get("routed_experts")
    if not raw:
        raise EngineError("the engine returned no routed_experts (SGLang needs --enable-return-routed-experts).")
    flat = torch.frombuffer(bytearray(base64.b64decode(raw)), dtype=torch.int32)
    tokens = int(meta["prompt_tokens"]) + int(meta["completion_tokens"]) - 1
    return flat.view(tokens, -1, topk).to(torch.int16)


def _sampling_params(params: SamplingParams, n: int, seed: int) -> dict[str, Any]:
    return {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "stop_token_ids": list(params.stop_token_ids),
        "n": n,
        "sampling_seed": seed,
    }


def _reason(raw: bytes) -> str:
    """The message of an error body: SGLang's ``{"error": "..."}`` / ``{"error": {"message"}}`` /
    ``{"success": false, "message"}`` / plain text."""
    text = raw.decode(errors="replace")
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))[:500]
        if err is not None:
            return str(err)[:500]
        if "message" in body:
            return str(body["message"])[:500]
        if "detail" in body:
            return str(body["detail"])[:500]
    return text.strip()[:500]
