"""The SGLang-shaped HTTP server and its HttpEngine client, against a real EmbeddedEngine on 127.0.0.1."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import load_file, save
from transformers import AutoModelForCausalLM, Qwen3Config

from nsr_megatron.rollout import EmbeddedEngine, HttpEngine, RolloutEngine, RolloutServer, SamplingParams

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
PARAMS = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.95, stop_token_ids=(3, 7))
TOKEN = "s3cret-token"


def tiny_model_dir(path, seed):
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_server")
    return tiny_model_dir(root / "a", 0), tiny_model_dir(root / "b", 1)


@pytest.fixture
def served(dirs):
    """A fresh engine on model a, served on a free loopback port."""
    engine = EmbeddedEngine(dirs[0])
    with RolloutServer(engine, host="127.0.0.1", port=0, model_path=str(dirs[0])) as server:
        yield engine, server


def request(url, *, data=None, headers=None, method=None):
    """(status, body bytes) for one HTTP request, HTTP errors included."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post_json(url, payload, raw=None):
    data = raw if raw is not None else json.dumps(payload).encode()
    return request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")


def test_health_and_model_info(served):
    _, server = served
    assert request(server.url + "/health") == (200, b"")
    status, body = request(server.url + "/get_model_info")
    info = json.loads(body)
    assert status == 200 and info["is_generation"] is True and info["model_path"].endswith("a")
    assert request(server.url + "/nope")[0] == 404


def test_generate_batch_with_n_matches_the_engine_in_sglang_shape(served):
    engine, server = served
    body = {
        "input_ids": PROMPTS,
        "sampling_params": {
            "max_new_tokens": 8,
            "temperature": 0.9,
            "top_p": 0.95,
            "stop_token_ids": [3, 7],
            "n": 2,
        },
        "return_logprob": True,
        "seed": 5,
    }
    status, raw = post_json(server.url + "/generate", body)
    assert status == 200
    out = json.loads(raw)
    want = engine.generate(PROMPTS, PARAMS, n=2, seed=5)
    assert isinstance(out, list) and len(out) == len(PROMPTS) * 2
    for i, group in enumerate(want):
        for j, gen in enumerate(group):
            item = out[i * 2 + j]  # prompt-major, as SGLang orders parallel samples
            meta = item["meta_info"]
            assert item["output_ids"] == gen.response_ids
            assert meta["finish_reason"]["type"] == gen.finish_reason
            if gen.finish_reason == "stop":
                assert meta["finish_reason"]["matched"] == gen.response_ids[-1]
            else:
                assert meta["finish_reason"] == {"type": "length", "length": 8}
            assert meta["prompt_tokens"] == len(PROMPTS[i]) and meta["completion_tokens"] == len(gen.response_ids)
            assert [tok for _, tok, _ in meta["output_token_logprobs"]] == gen.response_ids
            assert [lp for lp, _, _ in meta["output_token_logprobs"]] == pytest.approx(gen.response_logprobs, abs=1e-6)
            assert all(text is None for _, _, text in meta["output_token_logprobs"])


def test_flat_input_ids_with_n_1_returns_one_object_without_logprobs(served):
    engine, server = served
    status, raw = post_json(
        server.url + "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4}}
    )
    out = json.loads(raw)
    assert status == 200 and isinstance(out, dict) and "output_token_logprobs" not in out["meta_info"]
    assert out["output_ids"] == engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))[0][0].response_ids


def test_http_engine_generate_and_update_weights_match_in_process(served, dirs):
    engine, server = served
    client = HttpEngine(server.url)
    assert isinstance(client, RolloutEngine) and client.health()
    want = engine.generate(PROMPTS, PARAMS, n=3, seed=9)
    got = client.generate(PROMPTS, PARAMS, n=3, seed=9)
    assert [[(g.response_ids, g.finish_reason) for g in grp] for grp in got] == [
        [(g.response_ids, g.finish_reason) for g in grp] for grp in want
    ]
    assert got[1][2].response_logprobs == pytest.approx(want[1][2].response_logprobs, abs=1e-6)

    other = EmbeddedEngine(dirs[1])
    target = other.generate(PROMPTS, PARAMS, n=2, seed=1)
    state = load_file(dirs[1] / "model.safetensors")
    client.bucket_bytes = 20_000  # several safetensors requests
    assert client.update_weights(state.items()) == len(state)
    client.flush_cache()
    after = client.generate(PROMPTS, PARAMS, n=2, seed=1)
    assert [[g.response_ids for g in grp] for grp in after] == [[g.response_ids for g in grp] for grp in target]
    assert json.loads(request(server.url + "/get_model_info")[1])["weight_version"] != "0"
    with pytest.raises(ValueError, match=r"unknown tensor 'bogus\.weight'"):
        client.update_weights([("bogus.weight", torch.zeros(2))])


def test_weight_endpoints_need_the_token_when_required(dirs):
    engine = EmbeddedEngine(dirs[0])
    blob = save({"model.norm.weight": torch.full((32,), 2.0)})
    with RolloutServer(engine, port=0, api_token=TOKEN, require_token=True) as server:
        url = server.url + "/update_weights_from_tensor"
        octet = {"Content-Type": "application/octet-stream"}
        for headers in (octet, {**octet, "Authorization": "Bearer wrong"}, {**octet, "Authorization": TOKEN}):
            status, body = request(url, data=blob, headers=headers, method="POST")
            assert status == 401 and json.loads(body)["error"]["field"] == "Authorization"
        assert request(server.url + "/flush_cache", data=b"", method="POST")[0] == 401
        assert torch.all(engine.model.model.norm.weight == 1.0)  # nothing was loaded
        status, body = request(url, data=blob, headers={**octet, "Authorization": f"Bearer {TOKEN}"}, method="POST")
        assert status == 200 and json.loads(body) == {"success": True, "message": "Loaded 1 tensors.", "num_tensors": 1}
        assert torch.all(engine.model.model.norm.weight == 2.0)
        # generation stays open; HttpEngine sends the token
        assert post_json(server.url + "/generate", {"input_ids": [[1]]})[0] == 200
        assert HttpEngine(server.url, api_token=TOKEN).update_weights([("model.norm.weight", torch.ones(32))]) == 1
        with pytest.raises(RuntimeError, match="HTTP 401"):
            HttpEngine(server.url, api_token="nope").flush_cache()


def test_binding_beyond_loopback_requires_a_token(dirs, monkeypatch):
    monkeypatch.delenv("NSR_ROLLOUT_TOKEN", raising=False)
    engine = EmbeddedEngine(dirs[0])
    with pytest.raises(ValueError, match="api_token"):
        RolloutServer(engine, host="0.0.0.0", port=0)
    with pytest.raises(ValueError, match="require_token=True"):
        RolloutServer(engine, port=0, require_token=True)


@pytest.mark.parametrize(
    ("payload", "raw", "field", "message"),
    [
        (None, b"{not json", "body", "malformed JSON"),
        ({"sampling_params": {}}, None, "input_ids", "input_ids must be"),
        ({"input_ids": [[1, "x"]]}, None, "input_ids", r"input_ids\[0\]"),
        (
            {"input_ids": [[1]], "sampling_params": {"temperature": 0}},
            None,
            "sampling_params.temperature",
            "temperature",
        ),
        ({"input_ids": [[1]], "sampling_params": {"n": 0}}, None, "sampling_params.n", "n=0"),
        ({"input_ids": [[1]], "sampling_params": {"min_p": 0.1}}, None, "sampling_params.min_p", "unsupported"),
        ({"input_ids": [[1]], "text": "hi"}, None, "text", "unsupported fields"),
        ({"input_ids": [[1]], "stream": True}, None, "stream", "streaming"),
        ({"input_ids": [[1]], "seed": "7"}, None, "seed", "seed"),
        ({"input_ids": [[1, 999]]}, None, "input_ids", "outside"),
        (
            {"input_ids": [[1]], "sampling_params": {"stop_token_ids": [99]}},
            None,
            "sampling_params.stop_token_ids",
            "99",
        ),
    ],
)
def test_bad_generate_requests_get_400_naming_the_field(served, payload, raw, field, message):
    _, server = served
    status, body = post_json(server.url + "/generate", payload, raw=raw)
    error = json.loads(body)["error"]
    assert status == 400 and error["field"] == field and error["code"] == 400
    assert re.search(message, error["message"])


def test_update_weights_refuses_non_safetensors_bodies(served):
    _, server = served
    url = server.url + "/update_weights_from_tensor"
    status, body = post_json(url, {"serialized_named_tensors": ["gASV"]})
    assert status == 400 and json.loads(body)["error"]["field"] == "Content-Type"
    status, body = request(url, data=b"garbage", headers={"Content-Type": "application/octet-stream"}, method="POST")
    assert status == 400 and "safetensors" in json.loads(body)["error"]["message"]
