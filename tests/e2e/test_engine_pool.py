"""The rollout tier against real processes of the project's server: two engines launched and supervised by an
``EnginePool``, prompts spread over them, weights pushed over a gloo weight-update group and through a safetensors
folder, an engine SIGKILLed mid-use restarted and brought to the current weights, and the protocol's contract."""

from __future__ import annotations

import json
import os
import secrets
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from nsr_megatron.convert.io import HFCheckpoint
from nsr_megatron.rollout import EmbeddedEngine, SamplingParams
from nsr_megatron.rollout.pool import EnginePool, RolloutError, server_launchers
from tests.helpers import make_tiny_model

PARAMS = SamplingParams(max_new_tokens=6, temperature=1.0, stop_token_ids=(2,))
PROMPTS = [[1, 4 + i % 10, 17] for i in range(12)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pool")
    return {"a": make_tiny_model(root / "a", seed=1), "b": make_tiny_model(root / "b", seed=2)}


def hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    ckpt = HFCheckpoint(path)
    try:
        for name in ckpt.tensors:
            yield name, ckpt.read(name)
    finally:
        ckpt.close()


def checksum(t: torch.Tensor) -> str:
    import hashlib

    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{int.from_bytes(hashlib.sha256(raw).digest()[:8], 'big'):016x}"


def same(got: list[Any], want: list[Any]) -> bool:
    return [[(g.response_ids, g.finish_reason) for g in grp] for grp in got] == [
        [(g.response_ids, g.finish_reason) for g in grp] for grp in want]


@pytest.fixture
def pool(models: dict[str, Path], tmp_path: Path) -> Iterator[EnginePool]:
    token = secrets.token_hex(8)
    launchers = server_launchers(str(models["a"]), 2, token=token, log_dir=tmp_path / "engines", threads=1)
    p = EnginePool(launchers=launchers, token=token, weights_dir=tmp_path / "weights", hf_path=str(models["a"]),
                   bucket_bytes=64 << 10, max_restarts=1)
    p.start()
    try:
        yield p
    finally:
        p.close()
    assert all(not launcher.alive() for launcher in launchers)


def test_prompts_spread_over_engines_sample_as_one_engine(pool: EnginePool, models: dict[str, Path]) -> None:
    local = EmbeddedEngine(models["a"])
    want = local.generate(PROMPTS, PARAMS, n=3, seed=5)
    got = pool.generate(PROMPTS, PARAMS, n=3, seed=5)
    assert same(got, want)  # the first 6 prompts came from engine 0, the rest from engine 1
    for g_grp, w_grp in zip(got, want, strict=True):
        for g, w in zip(g_grp, w_grp, strict=True):
            torch.testing.assert_close(torch.tensor(g.response_logprobs), torch.tensor(w.response_logprobs))


@pytest.mark.parametrize("weight_sync", ["distributed", "disk"])
def test_weight_updates_reach_every_engine_exactly(pool: EnginePool, models: dict[str, Path],
                                                   weight_sync: str) -> None:
    pool.weight_sync = weight_sync
    count = pool.update_weights(hf_tensors(models["b"]), version="7")
    expected = {name: checksum(t) for name, t in hf_tensors(models["b"])}
    assert count == len(expected)
    for client in pool.clients:
        assert client.weight_version() == "7"
        sums = client.weights_checksums()
        assert {n: sums[n] for n in expected} == expected  # bitwise, every tensor
    local = EmbeddedEngine(models["b"])
    assert same(pool.generate(PROMPTS, PARAMS, n=2, seed=9), local.generate(PROMPTS, PARAMS, n=2, seed=9))


def test_a_killed_engine_is_restarted_resynced_and_its_prompts_sent_again(pool: EnginePool,
                                                                          models: dict[str, Path]) -> None:
    pool.update_weights(hf_tensors(models["b"]), version="3")  # the engines now differ from their launch weights
    resynced: list[list[int]] = []

    def resync(engines: list[int]) -> None:
        resynced.append(engines)
        pool.update_weights(hf_tensors(models["b"]), version="3", engines=engines)

    pool.resync = resync
    process = pool.launchers[1].process
    assert process is not None
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    got = pool.generate(PROMPTS, PARAMS, n=2, seed=4)
    assert pool.restarts == 1 and resynced == [[1]]
    assert pool.clients[1].weight_version() == "3"
    assert same(got, EmbeddedEngine(models["b"]).generate(PROMPTS, PARAMS, n=2, seed=4))
    # A second failure is past max_restarts=1: a clear error, naming the engine and its log.
    process = pool.launchers[0].process
    assert process is not None
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    with pytest.raises(RolloutError, match=r"rollout engine 0 .* failed again after 1 restarts .*engine0.log"):
        pool.generate(PROMPTS, PARAMS, n=2, seed=4)


def test_an_engine_that_dies_right_after_an_update_is_stale_not_fatal(pool: EnginePool,
                                                                    models: dict[str, Path]) -> None:
    """An engine killed between its weight update and the version check (``bench/soak.py`` found it): the check
    raises :class:`RolloutError` (which the trainer logs and goes on from), not the client's error, and the
    engine is restarted and resynced before the next rollout."""
    pool.weight_sync = "disk"
    pool.update_weights(hf_tensors(models["b"]), version="5")
    resynced: list[list[int]] = []

    def resync(engines: list[int]) -> None:
        resynced.append(engines)
        pool.update_weights(hf_tensors(models["b"]), version="5", engines=engines)

    process = pool.launchers[1].process
    assert process is not None
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    with pytest.raises(RolloutError, match=r"engine 1 did not answer.*brought to the current weights"):
        pool._check_versions([0, 1])  # what update_weights and close_shared_update end with
    pool.ensure_healthy(resync)
    assert pool.restarts == 1 and resynced == [[1]] and pool.clients[1].weight_version() == "5"
    assert same(pool.generate(PROMPTS, PARAMS, n=2, seed=4), EmbeddedEngine(models["b"]).generate(PROMPTS, PARAMS,
                                                                                                  n=2, seed=4))


def _write_all(views: list[dict[str, torch.Tensor]], named: Iterator[tuple[str, torch.Tensor]]) -> None:
    for name, t in named:
        for v in views:
            v[name].copy_(t)


def test_shared_memory_updates_reach_every_engine_and_survive_a_restart(pool: EnginePool,
                                                                        models: dict[str, Path]) -> None:
    """weight_sync=shared_memory: the writer (in the trainer, every rank) copies into the engines' own weights
    through their shared-memory files; the engines then report the version and sample from the new weights. A
    restarted engine is resynced through disk and gets a new file; a failed write leaves the engines stale."""
    from nsr_megatron.rollout.weight_sync import SharedMappings

    pool.weight_sync = "shared_memory"
    maps = SharedMappings()
    layouts = pool.open_shared_update()
    assert len({lay.id for lay in layouts}) == 2 and all(lay.path.startswith("/proc/") for lay in layouts)
    _write_all(maps.views(layouts), hf_tensors(models["b"]))
    pool.close_shared_update("4")
    expected = {name: checksum(t) for name, t in hf_tensors(models["b"])}
    for client in pool.clients:
        assert client.weight_version() == "4"
        sums = client.weights_checksums()
        assert {n: sums[n] for n in expected} == expected
    local = EmbeddedEngine(models["b"])
    assert same(pool.generate(PROMPTS, PARAMS, n=2, seed=9), local.generate(PROMPTS, PARAMS, n=2, seed=9))

    pool.resync = lambda engines: pool.update_weights(hf_tensors(models["b"]), version="4", engines=engines)
    process = pool.launchers[1].process
    assert process is not None
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    pool.healthy_or_recover()  # restarted from its launch weights (model a), resynced from disk to b
    assert pool.clients[1].weight_version() == "4"
    again = pool.open_shared_update()
    assert again[0].id == layouts[0].id and again[1].id != layouts[1].id  # a new process, a new file
    _write_all(maps.views(again), hf_tensors(models["a"]))
    pool.close_shared_update("5")
    assert same(pool.generate(PROMPTS, PARAMS, n=2, seed=9),
                EmbeddedEngine(models["a"]).generate(PROMPTS, PARAMS, n=2, seed=9))

    pool.open_shared_update()
    with pytest.raises(RolloutError, match="update to version 6 failed .*could not write"):
        pool.close_shared_update("6", written=False)
    resynced: list[list[int]] = []
    pool.resync = resynced.append
    pool.healthy_or_recover()  # the sessions were closed; the stale engines get the current weights
    assert resynced == [[0, 1]]


# ------------------------------------------------------------------------------------------------ contract

def call(url: str, path: str, body: Any = None, token: str | None = None, raw: bytes | None = None,
         method: str | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"))
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            text = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        text, status = exc.read(), exc.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.decode()


@pytest.fixture(scope="module")
def served(models: dict[str, Path]) -> Iterator[tuple[str, str]]:
    from nsr_megatron.rollout.server import RolloutServer

    token = "t0ken"
    server = RolloutServer(EmbeddedEngine(models["a"]), host="127.0.0.1", port=0, api_token=token,
                           model_path=str(models["a"])).start()
    try:
        yield server.url, token
    finally:
        server.close()


def test_contract_generate_shapes(served: tuple[str, str]) -> None:
    url, token = served
    # SGLANG.md section 2: a batch with n = 2 is prompt-major, with meta_info and logprobs aligned to output_ids.
    status, out = call(url, "/generate", {"input_ids": [[5, 6, 7], [9, 10]], "sampling_params": {
        "n": 2, "max_new_tokens": 8, "temperature": 1.0, "sampling_seed": 1234}, "return_logprob": True}, token)
    assert status == 200 and isinstance(out, list) and len(out) == 4
    for item in out:
        meta = item["meta_info"]
        assert set(meta) >= {"id", "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version",
                             "finish_reason", "output_token_logprobs"}
        assert meta["finish_reason"]["type"] in ("stop", "length")
        assert [tok for _, tok, _ in meta["output_token_logprobs"]] == item["output_ids"]
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [3, 3, 2, 2]
    # One prompt: an object, not a list; the same seed gives the same sample.
    status, one = call(url, "/generate", {"input_ids": [5, 6, 7], "sampling_params": {
        "max_new_tokens": 8, "sampling_seed": 1234}}, token)
    assert status == 200 and isinstance(one, dict) and one["output_ids"] == out[0]["output_ids"]
    assert "output_token_logprobs" not in one["meta_info"]


def test_contract_errors(served: tuple[str, str]) -> None:
    url, token = served
    status, body = call(url, "/generate", {"input_ids": [1, 2], "sampling_params": {"seed": 1}}, token)
    assert status == 400 and body["error"].startswith("unknown field `seed`, expected one of `max_new_tokens`")
    status, body = call(url, "/generate", {"input_ids": [1, 2], "seed": 1}, token)
    assert status == 400 and "unknown field `seed`" in body["error"]["message"]  # stricter than SGLang
    status, body = call(url, "/update_weights_from_distributed", {"names": [], "dtypes": [], "shapes": [],
                                                                  "group_name": "g"}, token)
    assert (status, body) == (400, {"success": False, "message": "update_weights_from_distributed must run between "
                                                                   "begin_weight_update() and end_weight_update()"})
    assert call(url, "/end_weight_update", {}, token) == (400, {
        "success": False, "message": "no weight-update session is open; call begin_weight_update() first"})
    assert call(url, "/begin_weight_update", {}, token) == (200, {"success": True, "message": "Success"})
    assert call(url, "/begin_weight_update", {}, token)[0] == 400
    assert call(url, "/end_weight_update", {}, token) == (200, {"success": True, "message": "Success"})
    status, body = call(url, "/update_weights_from_tensor", {"serialized_named_tensors": ["x"]}, token)
    assert status == 400 and body["success"] is False and "never unpickles" in body["message"]
    status, body = call(url, "/update_weights_from_shared_memory", {"weight_version": "2"}, token)
    assert status == 400 and "between begin_weight_update() and end_weight_update()" in body["message"]
    assert call(url, "/shared_weights", {"size": 1}, token)[0] == 400  # unknown field
    status, body = call(url, "/update_weights_from_disk", {"model_path": "/no/such/folder"}, token)
    assert status == 400 and body["success"] is False
    # Authorization: /health* is open, everything else needs the key.
    assert call(url, "/health_generate")[0] == 200
    assert call(url, "/model_info")[0] == 401
    status, info = call(url, "/model_info", token=token)
    assert status == 200 and set(info) >= {"model_path", "weight_version", "is_generation"}
    assert call(url, "/update_weight_version", {"new_version": "5"}, token)[1]["new_version"] == "5"
    assert call(url, "/model_info", token=token)[1]["weight_version"] == "5"
    assert call(url, "/flush_cache", {}, token) == (200, "Cache flushed.\n")


def test_colocated_memory_release_and_resume_requests(pool: EnginePool) -> None:
    """The colocated path's requests (SGLang's /release_memory_occupation and /resume_memory_occupation; the
    project's server answers them as no-ops): resume only takes back what was released."""
    sent: list[tuple[str, Any]] = []
    for client in pool.clients:
        for name in ("release_memory", "resume_memory"):
            original = getattr(client, name)
            setattr(client, name, lambda tags, _n=name, _o=original: (sent.append((_n, tags)), _o(tags)))
    pool.resume_memory(["weights"])
    assert sent == []  # nothing was released
    pool.release_memory()
    pool.resume_memory(["weights"])
    pool.resume_memory(["weights", "kv_cache"])
    assert sent == [("release_memory", None)] * 2 + [("resume_memory", ["weights"])] * 2 + \
        [("resume_memory", ["kv_cache"])] * 2
    sent.clear()
    pool.release_memory(["kv_cache"])  # an evaluation between rollouts keeps the weights
    pool.resume_memory(["weights", "kv_cache"])
    assert sent == [("release_memory", ["kv_cache"])] * 2 + [("resume_memory", ["kv_cache"])] * 2
