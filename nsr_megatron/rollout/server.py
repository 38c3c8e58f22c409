"""A strict subset of SGLang's native HTTP API over any :class:`RolloutEngine`, plus :class:`HttpEngine`, its client.

Standard library only (``http.server.ThreadingHTTPServer``, ``urllib``); requests are served one at a time
through a lock (the engine is not thread-safe, and a weight update must not interleave with a generation).

Endpoints (shapes follow SGLang's ``/generate``; anything not listed is refused with 404 / 400, never ignored):

``GET /health``            200, empty body.
``GET /get_model_info``    ``{"model_path", "tokenizer_path": null, "is_generation": true, "weight_version"}``.
``POST /generate``         body ``{"input_ids": [[...], ...] | [...], "sampling_params": {"max_new_tokens",
                           "temperature", "top_p", "top_k", "stop_token_ids", "n", "sampling_seed"},
                           "return_logprob": bool, "seed": int}``. Reply, as in SGLang: one object per (prompt,
                           sample), prompt-major (entry ``i * n + j`` is sample j of prompt i), a bare object when
                           ``input_ids`` is one flat prompt and n == 1::

                               {"output_ids": [...], "meta_info": {"id", "prompt_tokens", "completion_tokens",
                                "cached_tokens": 0, "finish_reason": {"type": "stop", "matched": id} |
                                {"type": "length", "length": max_new_tokens},
                                "output_token_logprobs": [[logprob, token_id, null], ...]}}

                           (no ``"text"``: the server holds no tokenizer, like SGLang's ``skip_tokenizer_init``;
                           ``output_token_logprobs`` only with ``return_logprob``). The log-prob convention is
                           :mod:`nsr_megatron.rollout.engine`'s.
``POST /flush_cache``      200 ``"Cache flushed.\\n"``.
``POST /update_weights_from_tensor``  body: one safetensors file (``Content-Type: application/octet-stream``);
                           the tensor names come from its header. Never pickle (SGLang's own payload is pickled, so
                           this endpoint is shape-compatible in name only). ``{"success": true, "message",
                           "num_tensors"}``.

Security: weight-changing endpoints (``/update_weights_from_tensor``, ``/flush_cache``) need
``Authorization: Bearer <token>`` whenever the server binds to anything but loopback (it refuses to start there
without a token) and, with ``require_token=True``, always; otherwise 401. Errors are JSON
``{"error": {"message", "field", "code"}}`` (400 for a bad request, naming the field).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import math
import os
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from nsr_megatron.rollout.engine import Generation, RolloutEngine, SamplingParams

__all__ = ["HttpEngine", "RolloutServer", "main"]

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_SAMPLING_KEYS = frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "n", "sampling_seed"})
_GENERATE_KEYS = frozenset({"input_ids", "sampling_params", "return_logprob", "seed", "stream"})
_TOKEN_ENV = "NSR_ROLLOUT_TOKEN"


class RequestError(ValueError):
    """A bad request: answered with ``status`` and a JSON error naming ``field``."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


class RolloutServer:
    """Serves ``engine`` over HTTP on ``host:port`` (``port=0`` picks a free port; see :attr:`url`).

    Args:
        engine: any :class:`RolloutEngine` (normally an ``EmbeddedEngine``).
        host: bind address; loopback by default. Any other address needs ``api_token``.
        port: TCP port (0 = any free port).
        api_token: the bearer token for weight-changing endpoints (default: env ``NSR_ROLLOUT_TOKEN``).
        require_token: demand the token even on loopback.
        model_path: reported by ``/get_model_info``.
        max_body_bytes: larger request bodies are refused with 413 (weight buckets must fit).
    """

    def __init__(
        self,
        engine: RolloutEngine,
        *,
        host: str = "127.0.0.1",
        port: int = 30000,
        api_token: str | None = None,
        require_token: bool = False,
        model_path: str = "",
        max_body_bytes: int = 8 << 30,
    ) -> None:
        token = api_token if api_token is not None else os.environ.get(_TOKEN_ENV) or None
        loopback = host in LOOPBACK_HOSTS
        if not loopback and not token:
            raise ValueError(
                f"RolloutServer(host={host!r}): binding beyond loopback exposes /update_weights_from_tensor; set "
                f"api_token (or the {_TOKEN_ENV} environment variable), or bind to 127.0.0.1."
            )
        if require_token and not token:
            raise ValueError(f"RolloutServer(require_token=True) needs api_token (or the {_TOKEN_ENV} variable).")
        self.engine = engine
        self.model_path = model_path
        self.max_body_bytes = max_body_bytes
        self._token = token
        self._token_required = require_token or not loopback
        self._lock = threading.Lock()
        self._weight_version = 0
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
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="rollout-server", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> RolloutServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ request handling (called by the handler)

    def authorized(self, header: str | None) -> bool:
        if not self._token_required:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        assert self._token is not None
        return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), self._token.encode())

    def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "tokenizer_path": None,
            "is_generation": True,
            "weight_version": str(self._weight_version),
        }

    def generate(self, body: Any) -> Any:
        prompts, flat, params, n, seed, return_logprob = parse_generate_request(body)
        with self._lock:
            try:
                groups = self.engine.generate(prompts, params, n=n, seed=seed)
            except ValueError as exc:  # the engine's checks against the model (vocabulary size)
                msg = str(exc)
                field = "sampling_params.stop_token_ids" if "stop_token_ids" in msg else "input_ids"
                raise RequestError(msg, field=field) from exc
        out = [
            _sglang_output(gen, params, return_logprob) for group in groups for gen in group
        ]  # prompt-major: i * n + j
        return out[0] if flat and n == 1 else out

    def flush_cache(self) -> None:
        with self._lock:
            self.engine.flush_cache()

    def update_weights(self, blob: bytes) -> dict[str, Any]:
        from safetensors.torch import load as load_safetensors

        try:
            tensors = load_safetensors(blob)
        except Exception as exc:  # safetensors raises its own error types on a corrupt header
            raise RequestError(f"body is not a safetensors file: {exc}", field="body") from exc
        with self._lock:
            count = self.engine.update_weights(tensors.items())
            self._weight_version += 1
        return {"success": True, "message": f"Loaded {count} tensors.", "num_tensors": count}


def parse_generate_request(body: Any) -> tuple[list[list[int]], bool, SamplingParams, int, int, bool]:
    """Validate a ``/generate`` body -> (prompts, flat input, params, n, seed, return_logprob); RequestError if bad."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object", field="body")
    unknown = sorted(set(body) - _GENERATE_KEYS)
    if unknown:
        raise RequestError(
            f"unsupported fields {unknown}; this server takes {sorted(_GENERATE_KEYS)}", field=unknown[0]
        )
    if body.get("stream"):
        raise RequestError("streaming is not supported; send stream=false", field="stream")
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise RequestError("input_ids must be a non-empty list of token ids or of token-id lists", field="input_ids")
    flat = not isinstance(ids[0], list)
    prompts = [ids] if flat else ids
    for k, p in enumerate(prompts):
        if not isinstance(p, list) or not p or not all(_is_int(t) and t >= 0 for t in p):
            raise RequestError(f"input_ids[{k}] must be a non-empty list of non-negative ints", field="input_ids")
    sp = body.get("sampling_params", {})
    if not isinstance(sp, dict):
        raise RequestError("sampling_params must be an object", field="sampling_params")
    unknown = sorted(set(sp) - _SAMPLING_KEYS)
    if unknown:
        raise RequestError(
            f"unsupported sampling_params {unknown}; this server takes {sorted(_SAMPLING_KEYS)}",
            field=f"sampling_params.{unknown[0]}",
        )
    n = sp.get("n", 1)
    if not _is_int(n) or n < 1:
        raise RequestError(f"n={n!r} must be an int >= 1", field="sampling_params.n")
    seed: Any = body.get("seed", sp.get("sampling_seed", 0))
    if "seed" in body and "sampling_seed" in sp and body["seed"] != sp["sampling_seed"]:
        raise RequestError("seed and sampling_params.sampling_seed disagree; send one", field="seed")
    if not _is_int(seed):
        raise RequestError(f"seed={seed!r} must be an int", field="seed")
    kwargs = {k: sp[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k") if k in sp}
    if "stop_token_ids" in sp:
        stop = sp["stop_token_ids"]
        if stop is not None and not isinstance(stop, list):
            raise RequestError("stop_token_ids must be a list of ints", field="sampling_params.stop_token_ids")
        kwargs["stop_token_ids"] = tuple(stop or ())
    try:
        params = SamplingParams(**kwargs)
    except ValueError as exc:
        field = next((k for k in kwargs if f".{k}=" in str(exc)), None)
        raise RequestError(str(exc), field=f"sampling_params.{field}" if field else "sampling_params") from exc
    return_logprob = body.get("return_logprob", False)
    if not isinstance(return_logprob, bool):
        raise RequestError("return_logprob must be true or false", field="return_logprob")
    return [list(p) for p in prompts], flat, params, int(n), int(seed), return_logprob


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _sglang_output(gen: Generation, params: SamplingParams, return_logprob: bool) -> dict[str, Any]:
    if gen.finish_reason == "stop":
        finish: dict[str, Any] = {"type": "stop", "matched": gen.response_ids[-1]}
    else:
        finish = {"type": "length", "length": params.max_new_tokens}
    meta: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "finish_reason": finish,
        "prompt_tokens": len(gen.prompt_ids),
        "completion_tokens": len(gen.response_ids),
        "cached_tokens": 0,
    }
    if return_logprob:
        meta["output_token_logprobs"] = [
            [lp, tok, None] for lp, tok in zip(gen.response_logprobs, gen.response_ids, strict=True)
        ]
    return {"output_ids": list(gen.response_ids), "meta_info": meta}


def _make_handler(server: RolloutServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            logger.debug("%s %s", self.address_string(), format % args)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

        def _dispatch(self, method: str) -> None:
            try:
                route = (method, self.path.split("?", 1)[0])
                if route == ("GET", "/health"):
                    self._send(200, b"", "text/plain")
                elif route == ("GET", "/get_model_info"):
                    self._send_json(200, server.model_info())
                elif route == ("POST", "/generate"):
                    self._send_json(200, server.generate(self._json(self._read_body())))
                elif route == ("POST", "/flush_cache"):
                    self._authorize()
                    server.flush_cache()
                    self._send(200, b"Cache flushed.\n", "text/plain")
                elif route == ("POST", "/update_weights_from_tensor"):
                    self._authorize()
                    ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
                    if ctype != "application/octet-stream":
                        raise RequestError(
                            f"Content-Type {ctype or '(none)'!r}: send one safetensors file as application/octet-stream "
                            "(pickled tensors are never accepted)",
                            field="Content-Type",
                        )
                    self._send_json(200, server.update_weights(self._read_body()))
                else:
                    raise RequestError(f"no endpoint {method} {route[1]}", field="path", status=404)
            except RequestError as exc:
                self._send_error(exc.status, str(exc), exc.field)
            except ValueError as exc:  # the engine's own validation (unknown tensor, bad token id, ...)
                self._send_error(400, str(exc), None)
            except Exception as exc:  # keep the server alive; the client sees the reason
                logger.exception("rollout server: %s %s failed", method, self.path)
                self._send_error(500, f"{type(exc).__name__}: {exc}", None)

        def _read_body(self) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None:
                return b""
            try:
                size = int(length)
            except ValueError as exc:
                raise RequestError(f"Content-Length {length!r} is not an int", field="Content-Length") from exc
            if size > server.max_body_bytes:
                self.close_connection = True
                raise RequestError(
                    f"body of {size} bytes exceeds max_body_bytes={server.max_body_bytes}; send smaller buckets",
                    field="body",
                    status=413,
                )
            return self.rfile.read(size)

        def _json(self, body: bytes) -> Any:
            try:
                return json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(f"malformed JSON body: {exc}", field="body") from exc

        def _authorize(self) -> None:
            if not server.authorized(self.headers.get("Authorization")):
                raise RequestError(
                    "missing or wrong bearer token (Authorization: Bearer <token>)", field="Authorization", status=401
                )

        def _send_json(self, status: int, payload: Any) -> None:
            self._send(status, json.dumps(payload, allow_nan=True).encode(), "application/json")

        def _send_error(self, status: int, message: str, field: str | None) -> None:
            self.close_connection = True  # the request body may be unread: do not reuse the connection
            self._send_json(status, {"error": {"message": message, "field": field, "code": status}})

        def _send(self, status: int, data: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            if status == HTTPStatus.UNAUTHORIZED:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            self.wfile.write(data)

    return Handler


class HttpEngine:
    """:class:`RolloutEngine` over the HTTP API above (or a compatible server), with ``urllib``.

    Args:
        base_url: e.g. ``"http://127.0.0.1:30000"``.
        api_token: bearer token for the weight-changing endpoints (default: env ``NSR_ROLLOUT_TOKEN``).
        timeout_s: per-request timeout.
        bucket_bytes: ``update_weights`` sends tensors in safetensors files of about this many bytes.
    """

    def __init__(
        self, base_url: str, *, api_token: str | None = None, timeout_s: float = 600.0, bucket_bytes: int = 512 << 20
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_token = api_token if api_token is not None else os.environ.get(_TOKEN_ENV) or None
        self.timeout_s = timeout_s
        self.bucket_bytes = bucket_bytes

    def health(self) -> bool:
        try:
            self._request("GET", "/health")
        except (OSError, RuntimeError):
            return False
        return True

    def model_info(self) -> dict[str, Any]:
        return json.loads(self._request("GET", "/get_model_info"))

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, n: int = 1, seed: int = 0
    ) -> list[list[Generation]]:
        body = {
            "input_ids": [list(p) for p in prompts],
            "sampling_params": {
                "max_new_tokens": params.max_new_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": params.top_k,
                "stop_token_ids": list(params.stop_token_ids),
                "n": n,
            },
            "return_logprob": True,
            "seed": seed,
        }
        out = json.loads(self._request("POST", "/generate", json.dumps(body).encode(), "application/json"))
        if not isinstance(out, list) or len(out) != len(prompts) * n:
            raise RuntimeError(
                f"{self.base_url}/generate returned {type(out).__name__} of wrong length, "
                f"expected a list of {len(prompts) * n}"
            )
        groups: list[list[Generation]] = []
        for i, prompt in enumerate(prompts):
            group = []
            for item in out[i * n : (i + 1) * n]:
                meta = item["meta_info"]
                logprobs = meta.get("output_token_logprobs") or []
                group.append(
                    Generation(
                        prompt_ids=list(prompt),
                        response_ids=list(item["output_ids"]),
                        response_logprobs=[float(lp) if lp is not None else math.nan for lp, *_ in logprobs],
                        finish_reason=meta["finish_reason"]["type"],
                    )
                )
            groups.append(group)
        return groups

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Send the tensors as safetensors files of about ``bucket_bytes`` each; returns the number loaded."""
        from safetensors.torch import save as save_safetensors

        count, bucket, size = 0, {}, 0
        seen: set[int] = set()
        for name, tensor in named_tensors:
            t = tensor.detach().to("cpu")
            # safetensors refuses shared or partial storage (tied weights, views): give those their own copy.
            if not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes or t.data_ptr() in seen:
                t = t.contiguous().clone()
            seen.add(t.data_ptr())
            bucket[name] = t
            size += t.nbytes
            if size >= self.bucket_bytes:
                count += self._send_bucket(save_safetensors(bucket))
                bucket, size, seen = {}, 0, set()
        if bucket:
            count += self._send_bucket(save_safetensors(bucket))
        return count

    def _send_bucket(self, blob: bytes) -> int:
        out = json.loads(self._request("POST", "/update_weights_from_tensor", blob, "application/octet-stream"))
        return int(out["num_tensors"])

    def flush_cache(self) -> None:
        self._request("POST", "/flush_cache", b"", "text/plain")

    def _request(self, method: str, path: str, data: bytes | None = None, content_type: str | None = None) -> bytes:
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        if self.api_token:
            req.add_header("Authorization", f"Bearer {self.api_token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            if exc.code == 400:
                raise ValueError(f"{method} {path}: {detail}") from exc
            raise RuntimeError(f"{method} {self.base_url}{path} -> HTTP {exc.code}: {detail}") from exc


def main(argv: list[str] | None = None) -> None:
    """``python -m nsr_megatron.rollout.server --model-path DIR [--host H] [--port P]`` (token: env NSR_ROLLOUT_TOKEN)."""
    from nsr_megatron.rollout.embedded import EmbeddedEngine

    parser = argparse.ArgumentParser(description="Serve an EmbeddedEngine over a subset of SGLang's HTTP API.")
    parser.add_argument("--model-path", required=True, help="Hugging Face model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--require-token", action="store_true", help=f"demand ${_TOKEN_ENV} even on loopback")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    engine = EmbeddedEngine(
        args.model_path, dtype=getattr(torch, args.dtype), device=args.device, max_batch_size=args.max_batch_size
    )
    server = RolloutServer(
        engine, host=args.host, port=args.port, require_token=args.require_token, model_path=args.model_path
    )
    logger.info("rollout server on %s", server.url)
    try:
        server.serve_forever()
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
