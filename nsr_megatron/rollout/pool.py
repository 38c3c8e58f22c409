"""The rollout tier: several engines behind one driver, launched and supervised by the trainer (or attached to).

An :class:`EnginePool` owns ``num_engines`` engines, each an HTTP server that speaks SGLang's protocol (the
project's :mod:`~nsr_megatron.rollout.server`, or real SGLang) driven through one
:class:`~nsr_megatron.rollout.client.HttpEngine` client each:

- **launching**: :class:`EngineLauncher` s build the command lines (:func:`server_launchers`,
  :func:`sglang_launchers`): free loopback ports, a bearer token, output to ``<log_dir>/engine<k>.log``; the pool
  waits for ``/health_generate``. Each engine runs under a :mod:`~nsr_megatron.rollout.reaper` supervisor, so it
  and its children stop within seconds when the trainer dies, even by SIGKILL. With URLs instead
  (``rollout.urls``) it attaches to running engines, and never stops them.
- **generation**: the prompts of a call are split into contiguous shares, one per engine, sent at once; prompt i
  carries its own seed (``sampling_seed``), so with the project's server a sample does not depend on which engine
  served it. Results come back in prompt order.
- **weights**: :meth:`EnginePool.update_weights` streams flat buckets either over one weight-update process group
  that every engine joins (``distributed``: one broadcast per bucket reaches all engines) or through a safetensors
  folder each engine loads (``disk``). Every update ends with each engine's ``weight_version`` checked.
- **supervision**: an engine that dies or stops answering is restarted (when the pool launched it), brought to the
  current weights through ``resync`` (a callback of the trainer, which must export them), and its share of the
  prompts is sent again, so a step never trains on partial groups. Restarts are counted (:attr:`restarts`); past
  ``max_restarts`` the pool raises :class:`RolloutError`.

Nothing here imports megatron.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from nsr_megatron.rollout.client import EngineError, EngineUnreachable, HttpEngine
from nsr_megatron.rollout.engine import Generation, Resync, RolloutError, SamplingParams, prompt_seeds
from nsr_megatron.rollout.reaper import supervisor_command
from nsr_megatron.rollout.weight_sync import FlatBucket, SharedLayout, WeightUpdateGroup, buckets, free_port

__all__ = ["EngineLauncher", "EnginePool", "RolloutError", "server_launchers", "sglang_launchers"]

log = logging.getLogger(__name__)


@dataclass
class EngineLauncher:
    """How to start one engine: ``command`` (with the port already in it), its environment and log file."""

    command: list[str]
    url: str
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    tp_size: int = 1  # engine ranks that join a weight-update group
    startup_timeout_s: float = 600.0
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the engine under a :mod:`~nsr_megatron.rollout.reaper` supervisor, the leader of a new process
        group holding the engine and its children: the engine stops when this process dies, by any signal.
        ``process`` is the supervisor, which lives as long as the engine and exits with its status."""
        env = {**os.environ, **self.env}
        with contextlib.ExitStack() as stack:
            out = (stack.enter_context(open(self.log_path, "ab")) if self.log_path is not None  # the child keeps
                   else subprocess.DEVNULL)  # its own descriptor
            self.process = subprocess.Popen(supervisor_command(os.getpid()), env=env, stdin=subprocess.PIPE,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        assert self.process.stdin is not None
        # The command travels on stdin, so only the engine's own process shows it (`pgrep -f` finds it alone).
        # A supervisor that died first leaves a broken pipe: waiting for the engine's health reports it.
        with contextlib.suppress(BrokenPipeError), self.process.stdin as command:
            command.write(json.dumps(self.command).encode())

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout_s)
        else:
            _signal_group(proc, signal.SIGKILL)  # its children (SGLang's scheduler) may outlive it


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def server_launchers(hf_path: str, num_engines: int, *, token: str, log_dir: Path, dtype: str = "float32",
                     max_batch_size: int = 256, threads: int | None = None) -> list[EngineLauncher]:
    """Launchers of ``num_engines`` processes of the project's rollout server on loopback."""
    out = []
    for k in range(num_engines):
        port = free_port()
        env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        out.append(EngineLauncher(
            command=[sys.executable, "-m", "nsr_megatron.rollout.server", "--model-path", hf_path, "--host",
                     "127.0.0.1", "--port", str(port), "--api-key", token, "--dtype", dtype, "--max-batch-size",
                     str(max_batch_size)],
            url=f"http://127.0.0.1:{port}", env=env, log_path=log_dir / f"engine{k}.log", startup_timeout_s=300.0))
    return out


def sglang_launchers(hf_path: str, num_engines: int, *, token: str, log_dir: Path, python: str, tp_size: int = 1,
                     mem_fraction: float = 0.8, base_gpu_id: int = 0, colocate: bool = False,
                     extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                     routed_experts: bool = False) -> list[EngineLauncher]:
    """Launchers of ``num_engines`` SGLang servers (``python -m sglang.launch_server``) on loopback. Without CUDA
    they run SGLang's CPU engine (``--device cpu``, torch-native attention, a small fixed memory pool)."""
    cpu = not torch.cuda.is_available()
    out = []
    for k in range(num_engines):
        port = free_port()
        cmd = [python, "-m", "sglang.launch_server", "--model-path", hf_path, "--host", "127.0.0.1", "--port",
               str(port), "--api-key", token, "--skip-tokenizer-init", "--tp-size", str(tp_size)]
        engine_env = dict(env or {})
        if cpu:
            cmd += ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
                    "--disable-overlap-schedule", "--mem-fraction-static", "0.05", "--max-total-tokens", "4096",
                    "--dtype", "bfloat16"]
            engine_env["SGLANG_USE_CPU_ENGINE"] = "1"
        else:
            cmd += ["--mem-fraction-static", str(mem_fraction), "--base-gpu-id", str(base_gpu_id + k * tp_size)]
            if colocate:
                cmd += ["--enable-memory-saver"]
        if routed_experts:
            cmd += ["--enable-return-routed-experts"]
        out.append(EngineLauncher(command=cmd + list(extra_args), url=f"http://127.0.0.1:{port}", env=engine_env,
                                  log_path=log_dir / f"engine{k}.log", tp_size=tp_size))
    return out


class EnginePool:
    """A :class:`~nsr_megatron.rollout.engine.RolloutEngine` over several HTTP engines (module docstring).

    Args:
        launchers: engines to start and supervise; or ``urls`` of running engines (never restarted).
        token: the engines' bearer token.
        weight_sync: ``distributed``, ``disk``, ``tensor`` (colocated CUDA) or ``shared_memory`` (the project's
            server on this host: the trainer writes into the engines' weights, :meth:`open_shared_update`; resyncs
            of restarted engines and :meth:`update_weights` go through ``disk``).
        bucket_bytes: flat bucket size of a weight update.
        weights_dir: where ``disk`` updates (and restarted engines' resyncs) write safetensors folders.
        hf_path: the model folder whose ``config.json`` goes with the written weights.
        max_restarts: engine restarts allowed over the pool's life.
        request_timeout_s: per-request time limit.
    """

    def __init__(self, *, launchers: Sequence[EngineLauncher] = (), urls: Sequence[str] = (), token: str | None,
                 weight_sync: str = "distributed", bucket_bytes: int = 512 << 20, weights_dir: Path,
                 hf_path: str, max_restarts: int = 3, request_timeout_s: float = 600.0,
                 colocate: bool = False, topk: int = 0, group_host: str = "127.0.0.1") -> None:
        if bool(launchers) == bool(urls):
            raise ValueError("EnginePool needs either launchers (engines it starts) or urls (running engines).")
        self.launchers = list(launchers)
        urls = [lch.url for lch in self.launchers] if self.launchers else list(urls)
        self.clients = [HttpEngine(u, api_token=token, timeout_s=request_timeout_s) for u in urls]
        self.tp_sizes = [lch.tp_size for lch in self.launchers] if self.launchers else [1] * len(urls)
        self.weight_sync = weight_sync
        self.bucket_bytes = bucket_bytes
        self.weights_dir = Path(weights_dir)
        self.hf_path = hf_path
        self.max_restarts = max_restarts
        self.colocate = colocate  # the engines share the training GPUs: release their memory while training
        self.topk = topk  # the model's experts per token (to read routed experts back)
        self.group_host = group_host  # where the engines reach the weight-update group's store
        self._released: set[str] = set()
        self.restarts = 0
        self.version = ""
        self.resync: Callable[[list[int]], None] | None = None  # set by the trainer: push current weights to these
        self._stale: set[int] = set()  # engines whose weights a failed update left behind
        self._group: WeightUpdateGroup | None = None
        self._group_gen = 0
        self._layouts: dict[int, SharedLayout] = {}  # weight_sync=shared_memory: engine -> where its weights sit

    # -------------------------------------------------------------------------------------------- life cycle
    def start(self) -> EnginePool:
        for launcher in self.launchers:
            if launcher.log_path is not None:
                launcher.log_path.parent.mkdir(parents=True, exist_ok=True)
            launcher.start()
        for k, client in enumerate(self.clients):
            self._wait(k, client)
        log.info("rollout: %d engine(s) ready: %s", len(self.clients), ", ".join(c.base_url for c in self.clients))
        return self

    def _wait(self, k: int, client: HttpEngine) -> None:
        launcher = self.launchers[k] if self.launchers else None
        try:
            client.wait_healthy(launcher.startup_timeout_s if launcher else 120.0,
                                alive=launcher.alive if launcher else None)
        except EngineUnreachable as exc:
            where = f"; its log: {launcher.log_path}" if launcher and launcher.log_path else ""
            raise RolloutError(f"rollout engine {k} did not start: {exc}{where}") from None

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Colocated engines give their GPU memory back to training: ``tags`` (``weights``, ``kv_cache``), or all
        of it (None)."""
        for client in self.clients:
            client.release_memory(tags)
        self._released |= set(tags if tags is not None else ("weights", "kv_cache"))

    def resume_memory(self, tags: list[str]) -> None:
        """Colocated engines take released memory back: ``["weights"]`` before a weight update, ``["kv_cache"]``
        after it (a tag that was not released is skipped)."""
        wanted = [t for t in tags if t in self._released]
        if wanted:
            for client in self.clients:
                client.resume_memory(wanted)
            self._released -= set(wanted)

    def close(self) -> None:
        """Stop the engines this pool launched (attached ones keep running)."""
        group, self._group = self._group, None
        if group is not None:
            group.close()
        for launcher in self.launchers:
            launcher.stop()

    # -------------------------------------------------------------------------------------------- generation
    def generate(self, prompts: list[list[int]], params: SamplingParams, *, n: int = 1, seed: int = 0,
                 seeds: Sequence[int] | None = None, return_routed_experts: bool = False) -> list[list[Generation]]:
        keyed = list(seeds) if seeds is not None else prompt_seeds(seed, len(prompts))
        shares = _shares(len(prompts), len(self.clients))
        results: list[list[Generation] | None] = [None] * len(prompts)
        pending = [(k, lo, hi) for k, (lo, hi) in enumerate(shares) if hi > lo]
        while pending:
            failed: list[tuple[int, int, int]] = []
            with ThreadPoolExecutor(len(pending)) as pool:
                futures = {pool.submit(self.clients[k].generate, prompts[lo:hi], params, n=n, seeds=keyed[lo:hi],
                                       return_routed_experts=return_routed_experts, topk=self.topk): (k, lo, hi)
                           for k, lo, hi in pending}
            for future, (k, lo, hi) in futures.items():
                try:
                    results[lo:hi] = future.result()
                except EngineError as exc:
                    log.warning("rollout engine %d failed on %d prompts (%s); restarting it.", k, hi - lo, exc)
                    failed.append((k, lo, hi))
            for k in sorted({k for k, _, _ in failed}):
                self._recover(k)
            pending = failed  # the whole share again: no partial groups
        return [r for r in results if r is not None]

    def _recover(self, k: int) -> None:
        """Restart engine ``k`` (or, attached, wait for it), then bring it to the current weights."""
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise RolloutError(
                f"rollout engine {k} ({self.clients[k].base_url}) failed again after {self.max_restarts} restarts "
                f"(rollout.max_restarts); see its log{f' {self.launchers[k].log_path}' if self.launchers else ''}.")
        if self.launchers:
            self.launchers[k].stop()
            self.launchers[k].start()
        self._wait(k, self.clients[k])
        self._layouts.pop(k, None)  # a new process: its weights sit in a new shared-memory file
        group = self._group
        self._drop_group(restarted=k)  # the engine left the weight-update group: all join a new one next time
        if group is not None:
            group.close()
        if self.version and self.resync is not None:
            self._stale.add(k)  # until its resync lands: a resync that raises leaves it to the next check
            self.resync([k])

    def ensure_healthy(self, resync: Resync) -> None:
        """The protocol's check before a rollout: :meth:`healthy_or_recover` with ``resync`` (kept for the engines
        that fail in the following :meth:`generate` calls)."""
        self.resync = resync
        self.healthy_or_recover()

    def healthy_or_recover(self) -> None:
        """Before a rollout: restart any engine whose process died or that fails its health check, and bring
        engines a failed update left behind to the current weights."""
        for k, client in enumerate(self.clients):
            dead = bool(self.launchers) and not self.launchers[k].alive()
            if dead or not client.healthy():
                log.warning("rollout engine %d (%s) is %s; restarting it.", k, client.base_url,
                            "dead" if dead else "not healthy")
                self._recover(k)
        if self._stale and self.resync is not None:
            stale, self._stale = sorted(self._stale), set()
            self.resync(stale)

    # -------------------------------------------------------------------------------------------- weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str = "", *,
                       engines: Sequence[int] | None = None) -> int:
        """Push ``named_tensors`` (HF names, full tensors) to ``engines`` (default: all) and set their weight
        version; returns the number of tensors. Restarted engines get their resync through the disk path."""
        targets = list(range(len(self.clients))) if engines is None else list(engines)
        self.version = version or str(int(self.version or "0") + 1)
        stream = iter(named_tensors)
        try:
            if self.weight_sync in ("disk", "shared_memory") or engines is not None:
                count = self._push_disk(stream, targets)
            elif self.weight_sync == "tensor":
                count = self._push_tensors(stream, targets)
            else:
                count = self._push_distributed(stream, targets)
        except (EngineError, RuntimeError) as exc:
            for _ in stream:  # the producer's other ranks are still sending: let them finish
                pass
            self._drop_group()
            self._stale.update(targets)
            raise RolloutError(f"the weight update to version {self.version} failed ({exc}); the engines are brought "
                               "to the current weights before the next rollout.") from exc
        self._check_versions(targets)
        return count

    def set_weight_sync(self, mode: str) -> None:
        """Send the next updates over ``mode`` (the trainer's fallback from ``shared_memory`` to ``distributed``)."""
        self.weight_sync = mode

    def open_shared_update(self) -> list[SharedLayout]:
        """``weight_sync=shared_memory``: open a weight-update session on every engine and return where each
        engine's weights sit in its shared memory (asked once per engine process). The trainer's ranks then write
        their shards there and :meth:`close_shared_update` ends the session. Raises :class:`RolloutError` (the
        engines are brought to the current weights before the next rollout)."""
        opened: list[HttpEngine] = []
        try:
            for k, client in enumerate(self.clients):
                if k not in self._layouts:
                    self._layouts[k] = client.shared_weights()
            for client in self.clients:
                client.begin_weight_update()
                opened.append(client)
        except EngineError as exc:
            self._end_sessions(opened)
            self._stale.update(range(len(self.clients)))
            raise RolloutError(f"the shared-memory weight update could not start ({exc}); the engines are brought "
                               "to the current weights before the next rollout.") from exc
        return [self._layouts[k] for k in range(len(self.clients))]

    def close_shared_update(self, version: str, *, written: bool = True) -> None:
        """End the session :meth:`open_shared_update` opened: with ``written``, every engine now holds weight
        version ``version`` (checked); without, the write failed and the engines count as stale."""
        self.version = version
        problem = None if written else "a trainer rank could not write its shards"
        try:
            if problem is None:
                for client in self.clients:
                    client.update_weights_from_shared_memory(version)
        except EngineError as exc:
            problem = str(exc)
        finally:
            self._end_sessions(self.clients)
        if problem is not None:
            self._stale.update(range(len(self.clients)))
            raise RolloutError(f"the shared-memory weight update to version {version} failed ({problem}); the "
                               "engines are brought to the current weights before the next rollout.")
        self._check_versions(range(len(self.clients)))

    def _check_versions(self, engines: Iterable[int]) -> None:
        """Ask each of ``engines`` for its weight version after an update. One that reports another version, or
        does not answer (it may have died right after the update), counts as stale and is brought to the current
        weights before the next rollout; then :class:`RolloutError` says which (the trainer goes on)."""
        problems = []
        for k in engines:
            try:
                got = self.clients[k].weight_version()
            except EngineError as exc:
                problems.append(f"engine {k} did not answer ({exc})")
                self._stale.add(k)
                continue
            if got != self.version:
                problems.append(f"engine {k} reports weight_version {got!r}")
                self._stale.add(k)
            else:
                self._stale.discard(k)  # it holds the current weights now
        if problems:
            raise RolloutError(f"after the weight update to {self.version!r}: {'; '.join(problems)}; those engines "
                               "are brought to the current weights before the next rollout.")

    @staticmethod
    def _end_sessions(clients: Sequence[HttpEngine]) -> None:
        for client in clients:
            try:
                client.end_weight_update()
            except EngineError as exc:
                log.warning("%s did not end its weight-update session: %s", client.base_url, exc)

    def _drop_group(self, restarted: int | None = None) -> None:
        """Forget the weight-update group (the engines that still hold it leave it too): the next distributed
        update builds a new one that every engine joins."""
        if self._group is None:
            return
        name, self._group = self._group.name, None
        for k, client in enumerate(self.clients):
            if k != restarted:
                try:
                    client.destroy_weights_update_group(name)
                except EngineError as exc:
                    log.warning("rollout engine %d did not leave weight group %s: %s", k, name, exc)

    def _ensure_group(self) -> WeightUpdateGroup:
        if self._group is not None:
            return self._group
        self._group_gen += 1
        world = 1 + sum(self.tp_sizes)
        group = WeightUpdateGroup(world, name=f"nsr_weights_{os.getpid()}_{self._group_gen}", host=self.group_host)
        offsets = [1 + sum(self.tp_sizes[:k]) for k in range(len(self.clients))]
        calls = [partial(c.init_weights_update_group, master_address=group.address, master_port=group.port,
                         rank_offset=off, world_size=world, group_name=group.name, backend=group.backend)
                 for c, off in zip(self.clients, offsets, strict=True)]
        _with_requests(calls, group.open)
        self._group = group
        return group

    def _push_distributed(self, named: Iterable[tuple[str, torch.Tensor]], targets: list[int]) -> int:
        """One broadcast per flat bucket over the weight-update group, while every engine's request waits for it."""
        group = self._ensure_group()

        def push(bucket: FlatBucket, clients: list[tuple[int, HttpEngine]]) -> None:
            calls = [partial(c.update_weights_from_distributed, names=bucket.names, dtypes=bucket.dtype_names(),
                             shapes=[list(s) for s in bucket.shapes], group_name=group.name,
                             weight_version=self.version, flattened=True) for _, c in clients]
            _with_requests(calls, partial(group.broadcast, bucket.data))

        count = self._in_session(named, targets, push)
        for k in targets:
            self.clients[k].flush_cache()
        return count

    def _push_tensors(self, named: Iterable[tuple[str, torch.Tensor]], targets: list[int]) -> int:
        """Colocated CUDA engines: each bucket travels as CUDA IPC handles (``/update_weights_from_tensor``)."""

        def push(bucket: FlatBucket, clients: list[tuple[int, HttpEngine]]) -> None:
            for k, c in clients:
                c.update_weights_from_tensor(bucket, self.version, tp_size=self.tp_sizes[k])

        return self._in_session(named, targets, push)

    def _in_session(self, named: Iterable[tuple[str, torch.Tensor]], targets: list[int],
                    push: Callable[[FlatBucket, list[tuple[int, HttpEngine]]], None]) -> int:
        """``push`` every bucket to the target engines between ``/begin_weight_update`` and ``/end_weight_update``."""
        clients = [(k, self.clients[k]) for k in targets]
        for _, c in clients:
            c.begin_weight_update()
        count = 0
        try:
            for bucket in buckets(named, self.bucket_bytes):
                push(bucket, clients)
                count += len(bucket.names)
        finally:
            for _, c in clients:
                c.end_weight_update()
        return count

    def _push_disk(self, named: Iterable[tuple[str, torch.Tensor]], targets: list[int]) -> int:
        folder, count = _write_safetensors_folder(buckets(named, self.bucket_bytes), self.weights_dir, self.version,
                                                  self.hf_path)
        for k in targets:
            self.clients[k].update_weights_from_disk(str(folder), self.version)
        for old in self.weights_dir.glob("v*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        return count


def _shares(count: int, engines: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal ``[lo, hi)`` shares of ``count`` prompts over ``engines``."""
    size, extra = divmod(count, engines)
    out, lo = [], 0
    for k in range(engines):
        hi = lo + size + (1 if k < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def _with_requests(calls: Sequence[Callable[[], Any]], work: Callable[[], Any]) -> None:
    """Run ``calls`` (HTTP requests that block until ``work`` is done on this side, like a collective) in threads
    while ``work`` runs here; raise the first request error. A request that fails before ``work`` finishes would
    leave ``work`` waiting, so each call's failure is checked as soon as ``work`` returns."""
    errors: list[BaseException] = []

    def run(call: Callable[[], Any]) -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in calls]
    for t in threads:
        t.start()
    time.sleep(0)  # let the requests leave first
    work()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _write_safetensors_folder(bucketed: Iterable[FlatBucket], root: Path, version: str, hf_path: str
                              ) -> tuple[Path, int]:
    """Write the buckets as an HF safetensors folder ``<root>/v<version>`` (one shard per bucket, an index, the
    model's config files), atomically: a temporary folder renamed into place. Returns (folder, tensor count)."""
    import json

    from safetensors.torch import save_file

    from nsr_megatron.convert.io import copy_hf_side_files

    final, tmp = root / f"v{version}", root / f".tmp-v{version}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    for i, bucket in enumerate(bucketed):
        name = f"model-{i + 1:05d}.safetensors"
        save_file({n: t.contiguous().cpu() for n, t in bucket.tensors()}, str(tmp / name))
        weight_map.update(dict.fromkeys(bucket.names, name))
        total += bucket.nbytes
    with open(tmp / "model.safetensors.index.json", "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    copy_hf_side_files(Path(hf_path), tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final, len(weight_map)
