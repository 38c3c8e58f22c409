"""The ``sglang`` rollout backend against the real SGLang server (0.5.23, CPU engine, its own venv).

The venv comes from ``scripts/setup_sglang.sh`` (``bash scripts/test.sh`` builds it and exports
``NSR_SGLANG_PYTHON``). SGLang's CPU engine imports a kernel module that PyPI does not ship; the test-only
stand-in in ``tests/sglang_stub`` provides the one function it calls (see its docstring). If the venv is missing the
tests fail, naming the command that builds it: they are never skipped.

- The trainer launches an SGLang engine itself (``rollout.backend=sglang``), trains, and stops it.
- The trainer attached to a running SGLang engine pushes its weights over a gloo weight-update group; afterwards
  the engine holds exactly the bf16 cast of ``mcore-to-hf`` of the saved checkpoint (SGLang's ``/weights_checker``
  checksums of its fused parameters), and its log-probs of a fixed prompt match a transformers forward of the
  converted model. The same after a push through ``/update_weights_from_disk``.
- Contract: requests and replies of SGLANG.md against SGLang and the project's server alike. Routed experts
  (``return_routed_experts``) come from the project's server, checked against a transformers forward; SGLang
  returns them only on CUDA, and without them the client says so.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from nsr_megatron.rollout.pool import EngineLauncher, EnginePool, sglang_launchers
from nsr_megatron.rollout.weight_sync import free_port
from tests.e2e.test_engine_pool import call, hf_tensors
from tests.e2e.test_rl_loop import _ok, read_metrics, run_cli
from tests.helpers import echo_rows, make_tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
STUB = ROOT / "tests" / "sglang_stub"


def sglang_python() -> str:
    python = os.environ.get("NSR_SGLANG_PYTHON") or str(ROOT / ".venv-sglang" / "bin" / "python")
    if not Path(python).is_file():
        pytest.fail(f"the SGLang venv is missing ({python}): build it with `bash scripts/setup_sglang.sh` (scripts/"
                    "test.sh does) or set NSR_SGLANG_PYTHON to its python.", pytrace=False)
    return python


def _no_sglang_left(marker: str) -> bool:
    out = subprocess.run(["pgrep", "-f", f"sglang.launch_server --model-path {marker}"], capture_output=True)
    return out.returncode != 0


def _clean_shm() -> None:
    for p in Path("/dev/shm").glob("sglang_*"):
        try:
            p.unlink()
        except OSError:
            pass


@pytest.fixture(scope="module")
def sglang_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """One SGLang server on the quickstart's tiny Qwen3-MoE: (url, token, model folder)."""
    root = tmp_path_factory.mktemp("sglang")
    model = make_tiny_model(root / "hf", seed=3)
    token = secrets.token_hex(8)
    (launcher,) = sglang_launchers(str(model), 1, token=token, log_dir=root, python=sglang_python(),
                                   env={"PYTHONPATH": str(STUB)})
    pool = EnginePool(launchers=[launcher], token=token, weights_dir=root / "w", hf_path=str(model))
    pool.start()
    try:
        yield launcher.url, token, model
    finally:
        pool.close()
        _clean_shm()


def sglang_checksums(hf: dict[str, torch.Tensor], num_layers: int, num_experts: int) -> dict[str, str]:
    """SGLang parameter name -> its /weights_checker checksum for these HF tensors cast to bf16: qkv fused along
    rows, experts stacked (gate and up concatenated), the vocabulary padded to 64 rows with zeros, everything else
    as it is, under its HF name."""
    def digest(t: torch.Tensor) -> str:
        raw = t.to(torch.bfloat16).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return f"{int.from_bytes(hashlib.sha256(raw).digest()[:8], 'big'):016x}"

    def padded(name: str, t: torch.Tensor) -> torch.Tensor:  # SGLang pads the vocabulary to 64 rows, with zeros
        if name not in ("model.embed_tokens.weight", "lm_head.weight") or t.shape[0] % 64 == 0:
            return t
        return torch.cat([t, t.new_zeros(64 - t.shape[0] % 64, *t.shape[1:])])

    out = {n: digest(padded(n, t)) for n, t in hf.items()
           if ".mlp.experts." not in n and not any(f".self_attn.{p}_proj." in n for p in "qkv")}
    for i in range(num_layers):
        p = f"model.layers.{i}"
        out[f"{p}.self_attn.qkv_proj.weight"] = digest(torch.cat([hf[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv"]))
        out[f"{p}.mlp.experts.w13_weight"] = digest(torch.stack([torch.cat(
            [hf[f"{p}.mlp.experts.{e}.gate_proj.weight"], hf[f"{p}.mlp.experts.{e}.up_proj.weight"]])
            for e in range(num_experts)]))
        out[f"{p}.mlp.experts.w2_weight"] = digest(torch.stack(
            [hf[f"{p}.mlp.experts.{e}.down_proj.weight"] for e in range(num_experts)]))
    return out


def _logprob_gap(url: str, token: str, model_dir: Path) -> float:
    """Mean |SGLang log-prob - transformers fp32 log-prob| over 24 generated tokens of a fixed prompt."""
    from transformers import AutoModelForCausalLM

    prompt = [1, 7, 8, 9, 10, 4, 5, 6]
    status, out = call(url, "/generate", {"input_ids": prompt, "sampling_params": {
        "max_new_tokens": 24, "temperature": 1.0, "ignore_eos": True}, "return_logprob": True}, token)
    assert status == 200, out
    ids = out["output_ids"]
    theirs = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
    ours = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None])[:, 0]
    return float((theirs - ours).abs().mean())


def test_the_trainer_launches_sglang_engines_trains_and_stops_them(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # 16 groups a step: SGLang's CPU engine ignores sampling seeds, and a step whose groups all score alike
    # (about 1 in 100 with 16 groups of 4 at the untrained model's 7% reward) has no gradient.
    proc = run_cli("quickstart", "--no-progress", f"run.run_dir={run_dir}", "run.steps=2",
                   "rollout.prompts_per_step=16", "rollout.samples_per_prompt=4", "rollout.backend=sglang",
                   f"rollout.sglang.python={sglang_python()}", f"rollout.sglang.env.PYTHONPATH={STUB}",
                   "profile.routing=counters")
    _ok(proc)
    rows = read_metrics(run_dir)
    assert len(rows) == 2 and any(r["grad_norm"] > 0 for r in rows) and rows[0]["rollout/restarts"] == 0
    # the profiler runs; SGLang's CPU engine cannot return routed experts, so there is no rollout drift
    assert "routing/entropy" in rows[0] and "routing/drift_rollout_train" not in rows[0]
    assert (run_dir / "engines" / "engine0.log").is_file()
    assert _no_sglang_left(str(run_dir / "hf-init")), "the run left its SGLang engine running"
    _clean_shm()


def test_attached_engine_holds_the_converted_checkpoint_after_distributed_and_disk_updates(
        sglang_engine: tuple[str, str, Path], tmp_path: Path) -> None:
    from nsr_megatron.config import read_hf_config
    from nsr_megatron.convert import mcore_to_hf
    from nsr_megatron.models.hf_config import arch_from_hf

    url, token, model = sglang_engine
    data = write_jsonl(tmp_path / "echo.jsonl", echo_rows(64))
    run_dir = tmp_path / "run"
    _ok(run_cli("quickstart", "--no-progress", f"run.run_dir={run_dir}", "run.steps=2", f"model.hf_path={model}",
                f"data.path={data}", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4",
                "rollout.backend=sglang", f"rollout.urls=[{url}]", f"rollout.api_token={token}"))
    assert call(url, "/model_info", token=token)[1]["weight_version"] == "2"  # the run's last push
    converted = mcore_to_hf(run_dir / "checkpoints" / "step_00000002", tmp_path / "converted", progress=False)
    arch = arch_from_hf(read_hf_config(model))
    hf = dict(hf_tensors(converted))
    want = sglang_checksums(hf, arch.num_layers, arch.num_experts)
    got = call(url, "/weights_checker", {"action": "checksum"}, token)[1]["ranks"][0]["checksums"]
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    assert got == want  # every parameter, bitwise (bf16)
    assert _logprob_gap(url, token, converted) < 0.02

    # The disk path: the initial model again, through a safetensors folder the engine loads.
    pool = EnginePool(urls=[url], token=token, weight_sync="disk", weights_dir=tmp_path / "disk", hf_path=str(model))
    pool.update_weights(hf_tensors(model), version="init")
    got = call(url, "/weights_checker", {"action": "checksum"}, token)[1]["ranks"][0]["checksums"]
    assert got == sglang_checksums(dict(hf_tensors(model)), arch.num_layers, arch.num_experts)
    assert call(url, "/model_info", token=token)[1]["weight_version"] == "init"
    assert _logprob_gap(url, token, model) < 0.02


# ------------------------------------------------------------------------------------------------ contract

@pytest.fixture(params=["project", "sglang"])
def any_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """(kind, url, token) of the project's server or of real SGLang, on the same kind of tiny model."""
    if request.param == "sglang":
        url, token, _ = request.getfixturevalue("sglang_engine")
        yield "sglang", url, token
        return
    with project_server(tmp_path) as (url, token):
        yield "project", url, token


@contextmanager
def project_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(url, token) of the project's server on the same tiny model as ``sglang_engine`` (model seed 3)."""
    token = secrets.token_hex(8)
    model = make_tiny_model(tmp_path / "hf", seed=3)
    port = free_port()
    launcher = EngineLauncher(command=[sys.executable, "-m", "nsr_megatron.rollout.server", "--model-path",
                                       str(model), "--port", str(port), "--api-key", token],
                              url=f"http://127.0.0.1:{port}", log_path=tmp_path / "server.log")
    pool = EnginePool(launchers=[launcher], token=token, weights_dir=tmp_path / "w", hf_path=str(model)).start()
    try:
        yield launcher.url, token
    finally:
        pool.close()


def test_contract_generate(any_server: tuple[str, str, str]) -> None:
    kind, url, token = any_server
    body: dict[str, Any] = {"input_ids": [[5, 6, 7], [9, 10]], "sampling_params": {
        "n": 2, "max_new_tokens": 8, "temperature": 1.0, "sampling_seed": 1234}, "return_logprob": True}
    status, out = call(url, "/generate", body, token)
    assert status == 200 and isinstance(out, list) and len(out) == 4, (kind, out)
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [3, 3, 2, 2]  # prompt-major
    for item in out:
        meta = item["meta_info"]
        assert {"id", "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version", "finish_reason",
                "output_token_logprobs"} <= set(meta), kind
        assert meta["finish_reason"]["type"] in ("stop", "length")
        assert meta["completion_tokens"] == len(item["output_ids"]) <= 8
        assert [tok for _, tok, _ in meta["output_token_logprobs"]] == item["output_ids"]
    # One sampling_params per prompt (what the trainer sends): the same shape.
    body["sampling_params"] = [dict(body["sampling_params"], sampling_seed=s) for s in (1, 2)]
    status, out = call(url, "/generate", body, token)
    assert status == 200 and len(out) == 4
    status, one = call(url, "/generate", {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}}, token)
    assert status == 200 and isinstance(one, dict) and len(one["output_ids"]) <= 2


def test_contract_errors_and_state(any_server: tuple[str, str, str]) -> None:
    kind, url, token = any_server
    status, body = call(url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "seed": 1}},
                        token)
    assert status == 400 and body["error"].startswith("unknown field `seed`, expected one of `max_new_tokens`"), kind
    status, body = call(url, "/update_weights_from_distributed", {"names": [], "dtypes": [], "shapes": [],
                                                                  "group_name": "g"}, token)
    assert status == 400 and body["success"] is False
    assert body["message"] == ("update_weights_from_distributed must run between begin_weight_update() and "
                               "end_weight_update()")
    assert call(url, "/begin_weight_update", {}, token) == (200, {"success": True, "message": "Success"})
    status, body = call(url, "/begin_weight_update", {}, token)
    assert status == 400 and body["message"] == ("a weight-update session is already open; call end_weight_update() "
                                                 "first")
    assert call(url, "/end_weight_update", {}, token) == (200, {"success": True, "message": "Success"})
    assert call(url, "/health_generate")[0] == 200  # open
    assert call(url, "/model_info")[0] == 401  # everything else needs the key
    status, info = call(url, "/model_info", token=token)
    assert status == 200 and {"model_path", "weight_version"} <= set(info)
    status, body = call(url, "/update_weight_version", {"new_version": "17"}, token)
    assert status == 200 and body["new_version"] == "17"
    assert call(url, "/model_info", token=token)[1]["weight_version"] == "17"
    status, text = call(url, "/flush_cache", {}, token)
    assert status == 200 and str(text).startswith("Cache flushed.")
    assert call(url, "/pause_generation", {"mode": "abort"}, token)[0] == 200
    assert call(url, "/continue_generation", {}, token)[0] == 200


def test_routed_experts_need_cuda_in_sglang(sglang_engine: tuple[str, str, Path]) -> None:
    """SGLang fills ``routed_experts`` only when launched with --enable-return-routed-experts, and that flag
    needs CUDA (a pinned host buffer registered with cudaHostRegister: the CPU engine dies at start). Asked
    anyway, it answers without them, and the client says what is missing."""
    from nsr_megatron.rollout.client import EngineError, HttpEngine
    from nsr_megatron.rollout.engine import SamplingParams

    url, token, _ = sglang_engine
    status, out = call(url, "/generate", {"input_ids": [1, 7, 8], "sampling_params": {"max_new_tokens": 3},
                                          "return_routed_experts": True}, token)
    assert status == 200 and "routed_experts" not in out["meta_info"]
    with pytest.raises(EngineError, match="SGLang needs --enable-return-routed-experts"):
        HttpEngine(url, api_token=token).generate([[1, 7, 8]], SamplingParams(max_new_tokens=3), n=1,
                                               return_routed_experts=True, topk=2)


def test_project_server_returns_routed_experts(tmp_path: Path) -> None:
    """``return_routed_experts`` as SGLANG.md states it: base64 of int32 [prompt + completion - 1, layers, k],
    the experts a transformers forward of the same model routes the same tokens to; prompts of different lengths
    (left-padded together in the engine) and several samples each."""
    import base64

    from transformers import AutoModelForCausalLM

    prompts = [[1, 7, 8, 9, 10, 4, 5, 6], [12, 3], [4, 4, 9, 30, 2]]
    with project_server(tmp_path) as (url, token):
        status, out = call(url, "/generate", {"input_ids": prompts, "sampling_params": {
            "n": 2, "max_new_tokens": 12, "temperature": 1.0, "sampling_seed": 5}, "return_routed_experts": True},
            token)
    assert status == 200 and len(out) == 6, out
    model = AutoModelForCausalLM.from_pretrained(str(make_tiny_model(tmp_path / "ref", seed=3)), dtype=torch.float32)
    cfg = model.config
    layers, k, experts = cfg.num_hidden_layers, cfg.num_experts_per_tok, cfg.num_experts
    for i, item in enumerate(out):
        prompt, ids = prompts[i // 2], item["output_ids"]
        raw = torch.frombuffer(bytearray(base64.b64decode(item["meta_info"]["routed_experts"])), dtype=torch.int32)
        tokens = len(prompt) + len(ids) - 1  # the last token is never run
        assert raw.numel() == tokens * layers * k, (i, raw.numel())
        theirs = raw.view(tokens, layers, k).long()
        assert bool(((theirs >= 0) & (theirs < experts)).all())
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids[:-1]]), output_router_logits=True).router_logits
        ours = torch.stack([lg.view(tokens, experts).topk(k, dim=-1).indices for lg in logits], dim=1)  # [T, L, k]
        same = (theirs.sort(-1).values == ours.sort(-1).values).all(-1).float().mean()
        assert same == 1.0, (i, float(same))
