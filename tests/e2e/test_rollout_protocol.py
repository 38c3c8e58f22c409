"""One rollout protocol: the trainer reaches any engine only through :class:`RolloutEngine`.

``ProtocolOnlyEngine`` below is a rollout backend that lives only in this file: it has the protocol's members and
nothing else (it samples through an embedded engine it keeps to itself), records every call the trainer makes in
``<run_dir>/engines/protocol_calls.jsonl``, and records (and refuses) any other attribute the trainer asks for.
Plugged in with ``rollout.backend=tests.e2e.test_rollout_protocol:ProtocolOnlyEngine``, it trains the quickstart
exactly as the embedded engine does, with the training state offloaded around each rollout (so the memory release
and resume calls run too).
"""

from __future__ import annotations

import ast
import inspect
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from nsr_megatron.cli import main
from nsr_megatron.config import ConfigError, RolloutConfig
from nsr_megatron.rollout import EmbeddedEngine, EngineSetup, Generation, Resync, RolloutEngine, SamplingParams
from nsr_megatron.rollout.pool import EnginePool
from tests.e2e.test_inputs import base, refused
from tests.e2e.test_rl_loop import ROOT, _ok, read_metrics, run_cli

PROTOCOL = {name for name, _ in inspect.getmembers(RolloutEngine) if not name.startswith("_")}
CALLS = "protocol_calls.jsonl"


class ProtocolOnlyEngine:
    """A rollout backend of the protocol's members only, built from an :class:`EngineSetup`."""

    def __init__(self, setup: EngineSetup) -> None:
        setup.log_dir.mkdir(parents=True, exist_ok=True)
        self._log = setup.log_dir / CALLS
        self._inner = EmbeddedEngine(setup.hf_path, device=setup.device, dtype=setup.dtype,
                                     max_batch_size=setup.max_batch_size)

    def _record(self, name: str, **detail: Any) -> None:
        with open(self._log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"call": name, **detail}) + "\n")

    def __getattr__(self, name: str) -> Any:  # only for attributes the class lacks
        if not name.startswith("_"):
            self._record("not in the protocol", name=name)
        raise AttributeError(f"{type(self).__name__} has only the RolloutEngine protocol; the trainer asked for "
                             f"{name!r}")

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, n: int = 1, seed: int = 0,
                 seeds: Sequence[int] | None = None, return_routed_experts: bool = False) -> list[list[Generation]]:
        self._record("generate", prompts=len(prompts), n=n)
        return self._inner.generate(prompts, params, n=n, seed=seed, seeds=seeds,
                                    return_routed_experts=return_routed_experts)

    @property
    def restarts(self) -> int:
        self._record("restarts")
        return 0

    def ensure_healthy(self, resync: Resync) -> None:
        self._record("ensure_healthy")

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str = "", *,
                       engines: Sequence[int] | None = None) -> int:
        count = self._inner.update_weights(named_tensors, version)
        self._record("update_weights", version=version, tensors=count)
        return count

    def open_shared_update(self) -> list[Any]:
        self._record("open_shared_update")
        raise ValueError("ProtocolOnlyEngine takes no shared-memory updates; use rollout.weight_sync=distributed.")

    def close_shared_update(self, version: str, *, written: bool = True) -> None:
        self._record("close_shared_update")
        raise ValueError("ProtocolOnlyEngine takes no shared-memory updates; use rollout.weight_sync=distributed.")

    def set_weight_sync(self, mode: str) -> None:
        self._record("set_weight_sync", mode=mode)

    def release_memory(self, tags: list[str] | None = None) -> None:
        self._record("release_memory", tags=tags)
        self._inner.release_memory(tags)

    def resume_memory(self, tags: list[str]) -> None:
        self._record("resume_memory", tags=tags)
        self._inner.resume_memory(tags)

    def close(self) -> None:
        self._record("close")


def test_every_engine_is_a_rollout_engine(tmp_path: Path, model: Path) -> None:
    pool = EnginePool(urls=["http://127.0.0.1:9"], token=None, weights_dir=tmp_path, hf_path=str(model))
    setup = EngineSetup(hf_path=str(model), device="cpu", dtype=torch.float32, max_batch_size=8, num_engines=1,
                        log_dir=tmp_path / "engines")
    for engine in (EmbeddedEngine(model), pool, ProtocolOnlyEngine(setup)):
        assert isinstance(engine, RolloutEngine), type(engine).__name__
    assert {name for name in vars(ProtocolOnlyEngine) if not name.startswith("_")} == PROTOCOL


def test_the_loop_reaches_the_engine_only_through_the_protocol() -> None:
    """``trainer/loop.py`` asks the engine (``rt.engine``, or a local named ``engine``) only for protocol members,
    and holds no ``isinstance`` on an engine class and no ``type: ignore``."""
    source = (ROOT / "nsr_megatron" / "trainer" / "loop.py").read_text(encoding="utf-8")
    assert "type: ignore" not in source
    tree = ast.parse(source)

    def is_engine(node: ast.expr) -> bool:
        return (isinstance(node, ast.Name) and node.id == "engine") or (
            isinstance(node, ast.Attribute) and node.attr == "engine")

    asked = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and is_engine(node.value)}
    assert asked and asked <= PROTOCOL, asked - PROTOCOL
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            assert not any("Engine" in ast.unparse(arg) or "Pool" in ast.unparse(arg) for arg in node.args[1:]), \
                ast.unparse(node)


def test_a_backend_is_named_by_module_and_factory(model: Path, data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``rollout.backend=module:Factory``; preflight imports it, and a wrong name is a one-line config error."""
    ours = "rollout.backend=tests.e2e.test_rollout_protocol:ProtocolOnlyEngine"
    assert main(["validate", *base(model, data, tmp_path / "r", ours)]) == 0
    msg = refused(capsys, *base(model, data, tmp_path / "r", "rollout.backend=tests.e2e.nowhere:Engine"))
    assert "rollout.backend='tests.e2e.nowhere:Engine': cannot import 'Engine' from 'tests.e2e.nowhere'" in msg
    msg = refused(capsys, *base(model, data, tmp_path / "r", "rollout.backend=tests.e2e.test_rollout_protocol:CALLS"))
    assert "is a str, not a class or function that takes an EngineSetup" in msg
    with pytest.raises(ConfigError, match=r"rollout.backend='vllm' is not one of .* nor 'module:Factory'"):
        RolloutConfig(backend="vllm")
    with pytest.raises(ConfigError, match=r"rollout.urls names running engines"):
        RolloutConfig(backend=ours.partition("=")[2], urls=["http://127.0.0.1:1"])


def test_a_backend_of_the_protocol_only_trains_like_the_embedded_engine(tmp_path: Path) -> None:
    common = ["--no-progress", "run.steps=3", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4",
              "rollout.offload_train=true"]
    embedded, plugged = tmp_path / "embedded", tmp_path / "plugged"
    _ok(run_cli("quickstart", f"run.run_dir={embedded}", *common))
    _ok(run_cli("quickstart", f"run.run_dir={plugged}", *common,
                "rollout.backend=tests.e2e.test_rollout_protocol:ProtocolOnlyEngine"))
    want, got = read_metrics(embedded), read_metrics(plugged)
    assert [r["step"] for r in got] == [1, 2, 3]
    for key in ("reward/mean", "response_length/mean", "rollout/kept_groups", "rollout/restarts"):
        assert [r[key] for r in got] == [r[key] for r in want], key
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-6)
    assert all(0.0 <= r["reward/mean"] <= 1.0 and 0.0 <= r["grad_norm"] < 100.0 for r in got)
    assert any(r["grad_norm"] > 0 for r in got)  # (a step whose groups all scored alike has no gradient)

    calls = [json.loads(line) for line in (plugged / "engines" / CALLS).read_text().splitlines()]
    names = [c["call"] for c in calls]
    assert "not in the protocol" not in names, [c for c in calls if c["call"] == "not in the protocol"]
    assert names.count("ensure_healthy") == 3 and names.count("generate") == 3 and names[-1] == "close"
    # the starting weights and one update per trained step, each a full model
    updates = [c for c in calls if c["call"] == "update_weights"]
    assert [c["version"] for c in updates] == ["0", "1", "2", "3"] and len({c["tensors"] for c in updates}) == 1
    assert {"release_memory", "resume_memory", "restarts"} <= set(names)
