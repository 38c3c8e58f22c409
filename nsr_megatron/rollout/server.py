"""The project's rollout server: SGLang's HTTP protocol (the subset an RL trainer uses) over an
:class:`~nsr_megatron.rollout.embedded.EmbeddedEngine`, so one client (:class:`~nsr_megatron.rollout.client.HttpEngine`)
drives it and real SGLang alike, and CPU machines get a multi-engine rollout tier.

Standard library HTTP (``ThreadingHTTPServer``); generation and weight copies take turns on one lock.

Endpoints (shapes as SGLang 0.5.23 answers them; ``shared/SGLANG.md``):

- ``GET /health``, ``GET /health_generate``: 200, empty body. ``GET /model_info``: ``model_path``,
  ``weight_version``, ``is_generation``. ``GET /server_info``.
- ``POST /generate``: ``input_ids`` (one prompt or a list), ``sampling_params`` (a dict, or one per prompt:
  ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``top_k`` (-1 or 0 = off), ``stop_token_ids``, ``n``,
  ``sampling_seed``), ``return_logprob``, ``stream`` (false). Reply: one object per (prompt, sample), prompt-major,
  an object for a single prompt with n = 1: ``output_ids`` and ``meta_info`` (``id``, ``prompt_tokens``,
  ``completion_tokens``, ``cached_tokens``, ``weight_version``, ``finish_reason`` ``{"type": "stop", "matched"}`` /
  ``{"type": "length", "length"}``, and with ``return_logprob`` ``output_token_logprobs`` =
  ``[[logprob, token_id, null], ...]``; with ``return_routed_experts`` ``routed_experts``, base64 of int32
  [prompt + completion - 1, MoE layers, k]). A sample's draws are keyed by its prompt's ``sampling_seed``, so it does
  not depend on which engine serves it (SGLang's ``sampling_seed`` acts only in its deterministic mode).
- ``POST /flush_cache``; ``POST /pause_generation`` (new requests wait) and ``/continue_generation``.
- weights, each answering ``{"success": bool, "message": str}`` (400 on failure):
  ``/begin_weight_update`` and ``/end_weight_update`` enclose ``/update_weights_from_distributed``;
  ``/init_weights_update_group`` (join the trainer's group, gloo or NCCL) and ``/destroy_weights_update_group``;
  ``/update_weights_from_distributed`` (``names``, ``dtypes``, ``shapes``, ``load_format`` null or
  ``flattened_bucket``: one uint8 broadcast of the tensors back to back); ``/update_weights_from_disk``
  (``model_path`` of a safetensors folder; checked completely before anything is copied, so a bad folder changes
  nothing); ``/update_weight_version``. ``/update_weights_from_tensor`` is refused: this server never unpickles.
- this server's own shared-memory path (``rollout.weight_sync=shared_memory``; not in SGLang): ``/shared_weights``
  moves the weights into an anonymous shared-memory file once and answers where each HF-named tensor sits in it
  (``id``, ``path``, ``nbytes``, ``host``, ``tensors``: ``{name: {dtype, shape, stride, offset}}``); trainer ranks on
  this host, as the same user, map it and write their shards in place between ``/begin_weight_update`` and
  ``/end_weight_update``; ``/update_weights_from_shared_memory`` (``weight_version``, ``flush_cache``) then marks
  the new version.
- ``POST /weights_checker {"action": "checksum"}`` (sha256 of each tensor's bytes, under the checkpoint's names)
  and ``POST /get_weights_by_name {"name", "truncate_size"}``.

Unknown fields are refused with 400 (inside ``sampling_params`` with SGLang's own message; SGLang ignores unknown
top-level fields, this server refuses them so that a client bug shows). Errors are JSON ``{"error": ...}``.

Security: it binds to 127.0.0.1 by default and refuses any other address without an API key. With a key
(``--api-key`` or env ``NSR_ROLLOUT_TOKEN``) every endpoint but ``/health*`` needs ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from nsr_megatron.rollout.client import TOKEN_ENV
from nsr_megatron.rollout.engine import Generation, SamplingParams
from nsr_megatron.rollout.weight_sync import JoinedGroup, join_weight_update_group, unpack

__all__ = ["RolloutServer", "main"]

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# SGLang 0.5.23's sampling parameters; this server implements the first seven and refuses the rest by name.
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "n", "sampling_seed")
SGLANG_SAMPLING_KEYS = SAMPLING_KEYS[:5] + ("stop", "stop_regex", "min_p", "frequency_penalty", "presence_penalty",
                                             "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
                                             "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
                                             "spaces_between_special_tokens", "no_stop_trim", "stream_interval",
                                             "logit_bias", "sampling_seed", "custom_params")
GENERATE_KEYS = frozenset({"input_ids", "sampling_params", "return_logprob", "stream", "rid", "logprob_start_len",
                           "return_routed_experts"})
OPEN_PATHS = frozenset({"/health", "/health_generate"})


class RequestError(ValueError):
    """A bad request: answered with ``status`` and ``{"error": ...}`` (``payload`` when given)."""

    def __init__(self, message: str, *, status: int = 400, payload: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.payload = payload


class WeightError(RequestError):
    """A failed weight request: answered ``{"success": false, "message"}``."""


class RolloutServer:
    """Serves ``engine`` on ``host:port`` (``port=0`` picks a free port; see :attr:`url`).

    Args:
        engine: an :class:`~nsr_megatron.rollout.embedded.EmbeddedEngine`.
        host: bind address; loopback by default. Any other address needs ``api_token``.
        port: TCP port (0 = any free port).
        api_token: the bearer token every endpoint but ``/health*`` then needs (default: env ``NSR_ROLLOUT_TOKEN``).
        model_path: reported by ``/model_info``.
        max_body_bytes: larger request bodies are refused with 413.
    """

    def __init__(self, engine: Any, *, host: str = "127.0.0.1", port: int = 30000, api_token: str | None = None,
                 model_path: str = "", max_body_bytes: int = 64 << 20) -> None:
        token = api_token if api_token is not None else os.environ.get(TOKEN_ENV) or None
        if host not in LOOPBACK_HOSTS and not token:
            raise ValueError(
                f"RolloutServer(host={host!r}): binding beyond loopback exposes the weight endpoints; set an API key "
                f"(--api-key or the {TOKEN_ENV} environment variable), or bind to 127.0.0.1.")
        self.engine = engine
        self.model_path = model_path
        self.max_body_bytes = max_body_bytes
        self.weight_version = "default"
        self._token = token
        self._lock = threading.Lock()  # generation and weight copies take turns
        self._resumed = threading.Event()
        self._resumed.set()
        self._session = False
        self._groups: dict[str, JoinedGroup] = {}
        self._inbox: torch.Tensor | None = None  # receive buffer of flattened buckets
        self._thread: threading.Thread | None = None
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self.httpd.server_address[0])
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self) -> RolloutServer:
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="rollout-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()
        for group in self._groups.values():
            group.close()
        self._groups.clear()

    def __enter__(self) -> RolloutServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def authorized(self, path: str, header: str | None) -> bool:
        if self._token is None or path in OPEN_PATHS:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), self._token.encode())

    # ------------------------------------------------------------------------------------------------ read-only
    def model_info(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "tokenizer_path": None, "is_generation": True,
                "weight_version": self.weight_version}

    def server_info(self) -> dict[str, Any]:
        from nsr_megatron import __version__

        return {"version": f"nsr-megatron {__version__}", "status": "ready", **self.model_info()}

    # ------------------------------------------------------------------------------------------------ generation
    def generate(self, body: Any) -> Any:
        prompts, flat, requests, return_logprob = parse_generate_request(body)
        routed = bool(body.get("return_routed_experts", False))
        self._resumed.wait()  # paused: new requests wait, as SGLang's do
        out: list[Any] = [None] * len(prompts)
        with self._lock:
            version = self.weight_version
            # One engine call per distinct (params, n); each prompt keyed by its own seed.
            by_params: dict[tuple[SamplingParams, int], list[int]] = {}
            for i, (params, n, _) in enumerate(requests):
                by_params.setdefault((params, n), []).append(i)
            for (params, n), idx in by_params.items():
                try:
                    groups = self.engine.generate([prompts[i] for i in idx], params, n=n,
                                                  seeds=[requests[i][2] for i in idx], return_routed_experts=routed)
                except ValueError as exc:  # the engine's checks against the model (vocabulary size)
                    raise RequestError(str(exc)) from exc
                for i, group in zip(idx, groups, strict=True):
                    out[i] = [_sglang_output(g, params, return_logprob, version) for g in group]
        items = [item for group in out for item in group]  # prompt-major: i * n + j
        return items[0] if flat and len(items) == 1 else items

    def pause(self, body: Any) -> dict[str, Any]:
        mode = body.get("mode", "abort") if isinstance(body, dict) else "abort"
        if mode not in ("abort", "retract", "in_place"):
            raise RequestError(f"mode={mode!r} is not one of abort, retract, in_place")
        self._resumed.clear()
        return {"message": "Generation paused successfully.", "status": "ok"}

    def resume(self) -> dict[str, Any]:
        self._resumed.set()
        return {"message": "Generation continued successfully.", "status": "ok"}

    # ------------------------------------------------------------------------------------------------ weights
    def begin_weight_update(self) -> dict[str, Any]:
        if self._session:
            raise WeightError("a weight-update session is already open; call end_weight_update() first")
        self._session = True
        return {"success": True, "message": "Success"}

    def end_weight_update(self) -> dict[str, Any]:
        if not self._session:
            raise WeightError("no weight-update session is open; call begin_weight_update() first")
        self._session = False
        return {"success": True, "message": "Success"}

    def init_group(self, body: dict[str, Any]) -> dict[str, Any]:
        fields = _require_fields(body, ("master_address", "master_port", "rank_offset", "world_size",
                                        "group_name"), optional=("backend",))
        name = str(fields["group_name"])
        if name in self._groups:
            raise WeightError(f"group {name!r} already exists; destroy it first")
        try:
            self._groups[name] = join_weight_update_group(
                master_address=str(fields["master_address"]), master_port=int(fields["master_port"]),
                rank=int(fields["rank_offset"]), world_size=int(fields["world_size"]), group_name=name,
                backend=str(fields.get("backend") or ("nccl" if torch.cuda.is_available() else "gloo")))
        except (RuntimeError, ValueError) as exc:
            raise WeightError(f"Failed to initialize custom process group: {exc}") from exc
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def destroy_group(self, body: dict[str, Any]) -> dict[str, Any]:
        name = str(_require_fields(body, ("group_name",))["group_name"])
        group = self._groups.pop(name, None)
        if group is None:
            raise WeightError(f"no group {name!r}")
        group.close()
        return {"success": True, "message": "Succeeded to destroy custom process group."}

    def update_from_distributed(self, body: dict[str, Any]) -> dict[str, Any]:
        if not self._session:
            raise WeightError("update_weights_from_distributed must run between begin_weight_update() and "
                              "end_weight_update()")
        f = _require_fields(body, ("names", "dtypes", "shapes", "group_name"),
                            optional=("flush_cache", "weight_version", "load_format"))
        group = self._groups.get(str(f["group_name"]))
        if group is None:
            raise WeightError(f"no group {f['group_name']!r}; call init_weights_update_group first")
        names, shapes = list(f["names"]), [tuple(int(d) for d in s) for s in f["shapes"]]
        dtypes = [_dtype(d) for d in f["dtypes"]]
        if not len(names) == len(dtypes) == len(shapes):
            raise WeightError("names, dtypes and shapes must have the same length")
        if f.get("load_format") == "flattened_bucket":
            total = sum(_numel(s) * torch.empty((), dtype=d).element_size() for d, s in zip(dtypes, shapes,
                                                                                              strict=True))
            if self._inbox is None or self._inbox.numel() < total:  # kept between buckets: its pages stay mapped
                self._inbox = torch.empty(total, dtype=torch.uint8)
            flat = self._inbox[:total]
            group.receive(flat)
            pairs = unpack(flat, names, dtypes, shapes)
        elif f.get("load_format") is None:
            pairs = []
            for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
                t = torch.empty(shape, dtype=dtype)
                group.receive(t)
                pairs.append((name, t))
        else:
            raise WeightError(f"load_format={f['load_format']!r} is not null or 'flattened_bucket'")
        return self._load(pairs, f.get("weight_version"), "Succeeded to update parameter online.")

    def update_from_disk(self, body: dict[str, Any]) -> dict[str, Any]:
        from nsr_megatron.convert.io import HFCheckpoint

        f = _require_fields(body, ("model_path",), optional=("weight_version", "flush_cache", "load_format"))
        path = str(f["model_path"])
        try:
            ckpt = HFCheckpoint(path)
        except (ValueError, OSError) as exc:
            raise WeightError(f"Failed to get weights iterator: {exc}") from exc
        try:
            shapes = ckpt.shapes()
            self.engine.check_weights(shapes)  # everything checked before anything is copied
            result = self._load(((n, ckpt.read(n)) for n in shapes), f.get("weight_version"),
                                "Succeeded to update model weights.")
        except ValueError as exc:
            raise WeightError(f"Failed to update weights: {exc}") from exc
        finally:
            ckpt.close()
        self.model_path = path
        return {**result, "num_paused_requests": 0}

    def shared_weights(self, body: dict[str, Any]) -> dict[str, Any]:
        _require_fields(body, ())
        with self._lock:
            try:
                layout = self.engine.share_weights()
            except RuntimeError as exc:
                raise WeightError(f"Failed to share weights: {exc}") from exc
        return {"success": True, "message": "Success", **layout.to_json()}

    def update_from_shared(self, body: dict[str, Any]) -> dict[str, Any]:
        if not self._session:
            raise WeightError("update_weights_from_shared_memory must run between begin_weight_update() and "
                              "end_weight_update()")
        f = _require_fields(body, (), optional=("weight_version", "flush_cache"))
        if not self.engine.shares_weights:
            raise WeightError("the weights are not in shared memory; call /shared_weights first")
        with self._lock:  # the writers are done: later generations see the new weights
            if f.get("weight_version") is not None:
                self.weight_version = str(f["weight_version"])
        return {"success": True, "message": f"Succeeded to update weights from shared memory. Weight version "
                                           f"updated to {self.weight_version}."}

    def update_version(self, body: dict[str, Any]) -> dict[str, Any]:
        version = str(_require_fields(body, ("new_version",), optional=("abort_all_requests",))["new_version"])
        self.weight_version = version
        return {"success": True, "message": f"Weight version updated to {version}", "new_version": version}

    def _load(self, pairs: Iterable[tuple[str, torch.Tensor]], version: Any, what: str) -> dict[str, Any]:
        with self._lock:
            try:
                count = self.engine.update_weights(pairs)
            except ValueError as exc:
                raise WeightError(str(exc)) from exc
            if version is not None:
                self.weight_version = str(version)
        suffix = f" Weight version updated to {self.weight_version}." if version is not None else ""
        return {"success": True, "message": f"{what}{suffix}", "num_tensors": count}

    def checksums(self) -> dict[str, Any]:
        with self._lock:
            sums = {name: _checksum(t) for name, t in self.engine.named_weights()}
        return {"success": True, "message": "Success.", "ranks": [{"checksums": sums}]}

    def weights_by_name(self, body: dict[str, Any]) -> Any:
        f = _require_fields(body, ("name",), optional=("truncate_size",))
        with self._lock:
            weights = dict(self.engine.named_weights())
        name = str(f["name"])
        if name not in weights:
            raise RequestError(f"Get parameter by name failed: no tensor {name!r}")
        flat = weights[name].detach().float().reshape(-1)
        return flat[: int(f.get("truncate_size") or flat.numel())].tolist()


# ---------------------------------------------------------------------------------------------------- parsing
def parse_generate_request(body: Any) -> tuple[list[list[int]], bool, list[tuple[SamplingParams, int, int]], bool]:
    """Validate a ``/generate`` body -> (prompts, single input, [(params, n, seed)] per prompt, return_logprob)."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    unknown = sorted(set(body) - GENERATE_KEYS)
    if unknown:
        raise RequestError(f"unknown field `{unknown[0]}`: this server takes {sorted(GENERATE_KEYS)} (no `text`: "
                           "it holds no tokenizer)")
    if body.get("stream"):
        raise RequestError("streaming is not supported; send stream=false")
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise RequestError("input_ids must be a non-empty list of token ids or of token-id lists")
    flat = not isinstance(ids[0], list)
    prompts = [ids] if flat else ids
    for k, p in enumerate(prompts):
        if not isinstance(p, list) or not p or not all(_is_int(t) and t >= 0 for t in p):
            raise RequestError(f"input_ids[{k}] must be a non-empty list of non-negative ints")
    sp = body.get("sampling_params", {})
    per_prompt = sp if isinstance(sp, list) else [sp] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise RequestError(f"sampling_params holds {len(per_prompt)} entries for {len(prompts)} prompts")
    requests = [_sampling(p) for p in per_prompt]
    return_logprob = body.get("return_logprob", False)
    if not isinstance(return_logprob, bool):
        raise RequestError("return_logprob must be true or false")
    return [list(p) for p in prompts], flat, requests, return_logprob


def _sampling(sp: Any) -> tuple[SamplingParams, int, int]:
    if not isinstance(sp, dict):
        raise RequestError("sampling_params must be an object (or a list of one per prompt)")
    unknown = sorted(set(sp) - set(SGLANG_SAMPLING_KEYS))
    if unknown:  # SGLang's own message
        expected = ", ".join(f"`{k}`" for k in SGLANG_SAMPLING_KEYS)
        raise RequestError("", payload={"error": f"unknown field `{unknown[0]}`, expected one of {expected}"})
    unsupported = sorted(k for k in sp if k not in SAMPLING_KEYS and sp[k] not in (None, False))
    if unsupported:
        raise RequestError(f"sampling_params.{unsupported[0]} is not supported by this server; it takes "
                           f"{list(SAMPLING_KEYS)}")
    n, seed = sp.get("n", 1), sp.get("sampling_seed", 0)
    if not _is_int(n) or n < 1:
        raise RequestError(f"sampling_params.n={n!r} must be an int >= 1")
    if not _is_int(seed):
        raise RequestError(f"sampling_params.sampling_seed={seed!r} must be an int")
    kwargs: dict[str, Any] = {k: sp[k] for k in ("max_new_tokens", "top_p") if k in sp}
    temperature = sp.get("temperature", 1.0)
    top_k = sp.get("top_k", -1)
    if not _is_int(top_k) or top_k < -1:
        raise RequestError(f"sampling_params.top_k={top_k!r} must be an int >= -1 (-1 or 0 = off)")
    kwargs["top_k"] = max(0, top_k)
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0:
        kwargs["top_k"], temperature = 1, 1.0  # SGLang: temperature 0 is greedy
    kwargs["temperature"] = temperature
    if sp.get("stop_token_ids") is not None:
        if not isinstance(sp["stop_token_ids"], list):
            raise RequestError("sampling_params.stop_token_ids must be a list of ints")
        kwargs["stop_token_ids"] = tuple(sp["stop_token_ids"])
    try:
        params = SamplingParams(**kwargs)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    return params, int(n), int(seed)


def _require_fields(body: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise WeightError("the body must be a JSON object")
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        raise WeightError(f"unknown field `{unknown[0]}`; expected {list(required + optional)}")
    missing = [k for k in required if k not in body]
    if missing:
        raise WeightError(f"missing field `{missing[0]}`")
    return body


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise WeightError(f"dtype {name!r} is not a torch dtype name (e.g. bfloat16)")
    return dtype


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _checksum(t: torch.Tensor) -> str:
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{int.from_bytes(hashlib.sha256(raw).digest()[:8], 'big'):016x}"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _sglang_output(gen: Generation, params: SamplingParams, return_logprob: bool, version: str) -> dict[str, Any]:
    if gen.finish_reason == "stop":
        finish: dict[str, Any] = {"type": "stop", "matched": gen.response_ids[-1]}
    else:
        finish = {"type": "length", "length": params.max_new_tokens}
    meta: dict[str, Any] = {"id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(gen.prompt_ids),
                            "completion_tokens": len(gen.response_ids), "cached_tokens": 0, "weight_version": version}
    if return_logprob:
        meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in
                                         zip(gen.response_logprobs, gen.response_ids, strict=True)]
    if gen.routed_experts is not None:  # SGLang's format: base64 of int32 [prompt + completion - 1, layers, k]
        meta["routed_experts"] = base64.b64encode(
            gen.routed_experts.to(torch.int32).contiguous().numpy().tobytes()).decode()
    return {"output_ids": list(gen.response_ids), "meta_info": meta}


# ---------------------------------------------------------------------------------------------------- HTTP
def _make_handler(server: RolloutServer) -> type[BaseHTTPRequestHandler]:
    posts = {
        "/generate": server.generate,
        "/pause_generation": server.pause,
        "/continue_generation": lambda body: server.resume(),
        "/begin_weight_update": lambda body: server.begin_weight_update(),
        "/end_weight_update": lambda body: server.end_weight_update(),
        "/init_weights_update_group": server.init_group,
        "/destroy_weights_update_group": server.destroy_group,
        "/update_weights_from_distributed": server.update_from_distributed,
        "/update_weights_from_disk": server.update_from_disk,
        "/update_weight_version": server.update_version,
        "/shared_weights": server.shared_weights,
        "/update_weights_from_shared_memory": server.update_from_shared,
        "/weights_checker": lambda body: server.checksums(),
        # Colocated memory release: nothing to release on a CPU engine; answered as SGLang does.
        "/release_memory_occupation": lambda body: {"success": True, "message": "Success"},
        "/resume_memory_occupation": lambda body: {"success": True, "message": "Success"},
        "/get_weights_by_name": server.weights_by_name,
    }
    gets = {"/model_info": server.model_info, "/get_model_info": server.model_info, "/server_info": server.server_info}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            logger.debug("%s %s", self.address_string(), format % args)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

        def _dispatch(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if not server.authorized(path, self.headers.get("Authorization")):
                    body = self._read_body()  # drain it
                    raise RequestError("missing or wrong bearer token (Authorization: Bearer <key>)",
                                       status=HTTPStatus.UNAUTHORIZED)
                if method == "GET" and path in OPEN_PATHS:
                    self._send(200, b"", "text/plain")
                elif method == "GET" and path in gets:
                    self._send_json(200, gets[path]())
                elif method == "POST" and path == "/flush_cache":
                    self._read_body()
                    self._send(200, b"Cache flushed.\n", "text/plain")
                elif method == "POST" and path == "/update_weights_from_tensor":
                    self._read_body()
                    raise WeightError("this server never unpickles tensors: use /update_weights_from_distributed or "
                                      "/update_weights_from_disk")
                elif method == "POST" and path in posts:
                    body = self._read_body()
                    self._send_json(200, posts[path](self._json(body) if body else {}))
                else:
                    raise RequestError(f"no endpoint {method} {path}", status=404)
            except WeightError as exc:
                self._send_json(exc.status, {"success": False, "message": str(exc)}, close=True)
            except RequestError as exc:
                payload = exc.payload if exc.payload is not None else {"error": {"message": str(exc), "code": exc.status}}
                self._send_json(exc.status, payload, close=True)
            except Exception as exc:  # keep the server alive; the client sees the reason
                logger.exception("rollout server: %s %s failed", method, path)
                self._send_json(500, {"error": {"message": f"{type(exc).__name__}: {exc}", "code": 500}}, close=True)

        def _read_body(self) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None:
                return b""
            try:
                size = int(length)
            except ValueError as exc:
                raise RequestError(f"Content-Length {length!r} is not an int") from exc
            if size > server.max_body_bytes:
                self.close_connection = True
                raise RequestError(f"body of {size} bytes exceeds max_body_bytes={server.max_body_bytes}",
                                   status=413)
            return self.rfile.read(size)

        def _json(self, body: bytes) -> Any:
            try:
                return json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(f"malformed JSON body: {exc}") from exc

        def _send_json(self, status: int, payload: Any, close: bool = False) -> None:
            if close:
                self.close_connection = True  # the request body may be unread: do not reuse the connection
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _send(self, status: int, data: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            if status == HTTPStatus.UNAUTHORIZED:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            self.wfile.write(data)

    return Handler


def main(argv: list[str] | None = None) -> None:
    """``python -m nsr_megatron.rollout.server --model-path DIR [--host H] [--port P] [--api-key K]``."""
    from nsr_megatron.rollout.embedded import EmbeddedEngine

    parser = argparse.ArgumentParser(description="The project's rollout server (SGLang's HTTP protocol).")
    parser.add_argument("--model-path", required=True, help="Hugging Face model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--api-key", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.monotonic()
    engine = EmbeddedEngine(args.model_path, dtype=getattr(torch, args.dtype), device=args.device,
                            max_batch_size=args.max_batch_size)
    server = RolloutServer(engine, host=args.host, port=args.port, api_token=args.api_key, model_path=args.model_path)
    logger.info("rollout server on %s, host %s (ready in %.1f s)", server.url, socket.gethostname(),
                time.monotonic() - start)
    try:
        server.httpd.serve_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
