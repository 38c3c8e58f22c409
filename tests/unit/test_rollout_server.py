"""The project's rollout server (SGLang's protocol) and the HttpEngine client, against a real EmbeddedEngine on
127.0.0.1, in this process: generation, per-prompt seeds, the weight paths (a gloo weight-update group with the
test as the trainer, a safetensors folder that is checked before anything is loaded), auth and bad requests."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen3Config

from nsr_megatron.rollout import EmbeddedEngine, EngineError, HttpEngine, RolloutServer, SamplingParams
from nsr_megatron.rollout.engine import prompt_seeds
from nsr_megatron.rollout.weight_sync import WeightUpdateGroup, buckets

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
    assert request(server.url + "/health_generate") == (200, b"")
    status, body = request(server.url + "/model_info")
    info = json.loads(body)
    assert status == 200 and info["is_generation"] is True and info["model_path"].endswith("a")
    assert info["weight_version"] == "default"
    assert request(server.url + "/nope")[0] == 404


def test_generate_batch_with_n_matches_the_engine_in_sglang_shape(served):
    engine, server = served
    seeds = [11, 22, 33]
    body = {
        "input_ids": PROMPTS,
        "sampling_params": [{"max_new_tokens": 8, "temperature": 0.9, "top_p": 0.95, "stop_token_ids": [3, 7],
                             "n": 2, "sampling_seed": s} for s in seeds],
        "return_logprob": True,
    }
    status, raw = post_json(server.url + "/generate", body)
    assert status == 200
    out = json.loads(raw)
    want = engine.generate(PROMPTS, PARAMS, n=2, seeds=seeds)
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
            assert meta["weight_version"] == "default"
            assert [tok for _, tok, _ in meta["output_token_logprobs"]] == gen.response_ids
            assert [lp for lp, _, _ in meta["output_token_logprobs"]] == pytest.approx(gen.response_logprobs, abs=1e-6)
            assert all(text is None for _, _, text in meta["output_token_logprobs"])


def test_flat_input_ids_with_n_1_returns_one_object_and_temperature_0_is_greedy(served):
    engine, server = served
    status, raw = post_json(server.url + "/generate", {"input_ids": [1, 2, 3], "sampling_params": {
        "max_new_tokens": 4, "temperature": 0, "top_k": -1}})
    out = json.loads(raw)
    assert status == 200 and isinstance(out, dict) and "output_token_logprobs" not in out["meta_info"]
    greedy = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, top_k=1))[0][0].response_ids
    assert out["output_ids"] == greedy


def test_http_engine_samples_like_the_engine_whatever_the_share(served):
    engine, server = served
    client = HttpEngine(server.url)
    assert client.healthy()
    want = engine.generate(PROMPTS, PARAMS, n=3, seed=9)
    got = client.generate(PROMPTS, PARAMS, n=3, seed=9)
    assert [[(g.response_ids, g.finish_reason) for g in grp] for grp in got] == [
        [(g.response_ids, g.finish_reason) for g in grp] for grp in want]
    assert got[1][2].response_logprobs == pytest.approx(want[1][2].response_logprobs, abs=1e-6)
    tail = client.generate(PROMPTS[1:], PARAMS, n=3, seeds=prompt_seeds(9, len(PROMPTS))[1:])  # another share
    assert [[g.response_ids for g in grp] for grp in tail] == [[g.response_ids for g in grp] for grp in want[1:]]


def test_distributed_update_over_a_gloo_weight_group(served, dirs):
    """The test is the trainer: it opens the group, the server joins it, and flat buckets are broadcast."""
    engine, server = served
    client = HttpEngine(server.url)
    state = load_file(dirs[1] / "model.safetensors")
    group = WeightUpdateGroup(2, name="test_weights")
    joined = threading.Thread(target=client.init_weights_update_group, kwargs=dict(
        master_address=group.address, master_port=group.port, rank_offset=1, world_size=2,
        group_name=group.name, backend="gloo"))
    joined.start()
    group.open()
    joined.join()
    client.begin_weight_update()
    for bucket in buckets(state.items(), bucket_bytes=20_000):  # several buckets
        sent = threading.Thread(target=client.update_weights_from_distributed, kwargs=dict(
            names=bucket.names, dtypes=bucket.dtype_names(), shapes=[list(s) for s in bucket.shapes],
            group_name=group.name, weight_version="4", flattened=True))
        sent.start()
        group.broadcast(bucket.data)
        sent.join()
    client.end_weight_update()
    client.destroy_weights_update_group(group.name)
    group.close()
    assert client.weight_version() == "4"
    target = EmbeddedEngine(dirs[1])
    assert all(torch.equal(t, dict(target.named_weights())[n]) for n, t in engine.named_weights())
    sums = client.weights_checksums()
    assert sums == json.loads(request(server.url + "/weights_checker", data=b'{"action": "checksum"}',
                                      method="POST")[1])["ranks"][0]["checksums"]


def test_disk_update_checks_the_whole_folder_before_loading(served, dirs, tmp_path):
    engine, server = served
    client = HttpEngine(server.url)
    before = {n: t.clone() for n, t in engine.named_weights()}
    state = load_file(dirs[1] / "model.safetensors")
    bad = dict(state)
    bad["model.norm.weight"] = torch.ones(7)  # one wrong shape, listed last
    (tmp_path / "bad").mkdir()
    save_file(bad, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(EngineError, match="model.norm.weight.*shape"):
        client.update_weights_from_disk(str(tmp_path / "bad"), "9")
    assert all(torch.equal(t, before[n]) for n, t in engine.named_weights())  # nothing was loaded
    assert client.weight_version() != "9"
    client.update_weights_from_disk(str(dirs[1]), "9")
    assert client.weight_version() == "9" and client.model_info()["model_path"] == str(dirs[1])
    target = EmbeddedEngine(dirs[1])
    assert all(torch.equal(t, dict(target.named_weights())[n]) for n, t in engine.named_weights())


def test_every_endpoint_but_health_needs_the_key_when_set(dirs):
    engine = EmbeddedEngine(dirs[0])
    with RolloutServer(engine, port=0, api_token=TOKEN) as server:
        assert request(server.url + "/health")[0] == 200
        for path, data in (("/model_info", None), ("/generate", b'{"input_ids": [1]}'), ("/flush_cache", b"")):
            status, _ = request(server.url + path, data=data, method="POST" if data is not None else "GET",
                                headers={"Authorization": "Bearer wrong"})
            assert status == 401, path
        assert HttpEngine(server.url, api_token=TOKEN).weight_version() == "default"
        with pytest.raises(EngineError, match="HTTP 401"):
            HttpEngine(server.url, api_token="nope").flush_cache()


def test_binding_beyond_loopback_requires_a_key(dirs, monkeypatch):
    monkeypatch.delenv("NSR_ROLLOUT_TOKEN", raising=False)
    with pytest.raises(ValueError, match="API key"):
        RolloutServer(EmbeddedEngine(dirs[0]), host="0.0.0.0", port=0)


@pytest.mark.parametrize(
    ("payload", "raw", "message"),
    [
        (None, b"{not json", "malformed JSON"),
        ({"sampling_params": {}}, None, "input_ids must be"),
        ({"input_ids": [[1, "x"]]}, None, r"input_ids\[0\]"),
        ({"input_ids": [[1]], "sampling_params": {"temperature": -1}}, None, "temperature"),
        ({"input_ids": [[1]], "sampling_params": {"n": 0}}, None, "n=0"),
        ({"input_ids": [[1]], "sampling_params": {"min_p": 0.1}}, None, "min_p is not supported"),
        ({"input_ids": [[1]], "text": "hi"}, None, "unknown field `text`"),
        ({"input_ids": [[1]], "stream": True}, None, "streaming"),
        ({"input_ids": [[1], [2]], "sampling_params": [{}]}, None, "1 entries for 2 prompts"),
        ({"input_ids": [[1, 999]]}, None, "outside"),
        ({"input_ids": [[1]], "sampling_params": {"stop_token_ids": [99]}}, None, "99"),
    ],
)
def test_bad_generate_requests_get_400_with_the_reason(served, payload, raw, message):
    _, server = served
    status, body = post_json(server.url + "/generate", payload, raw=raw)
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == 400
    assert re.search(message, error["message"])


def test_shared_weights_are_mapped_only_when_the_file_is_the_engines(tmp_path: Path) -> None:
    """share_parameters moves parameters into a shared-memory file; a writer maps it only after checking its size
    and header (a /proc/<pid>/fd path can name another file in another PID namespace), and never grows a file."""
    import dataclasses

    from nsr_megatron.rollout.weight_sync import SharedLayout, SharedMappings, share_parameters

    layer = torch.nn.Linear(8, 4)
    want = layer.weight.detach().clone()
    layout, memory = share_parameters(layer.parameters(), [("w", layer.weight), ("b", layer.bias)])
    assert layer.weight.untyped_storage().data_ptr() == memory.untyped_storage().data_ptr()
    assert torch.equal(layer.weight, want)  # moved, not changed
    views = SharedMappings().views([layout])[0]
    views["w"].fill_(2.0)  # written through another mapping of the same file
    assert torch.equal(layer.weight, torch.full((4, 8), 2.0))

    other = tmp_path / "other.bin"
    other.write_bytes(b"x" * 16)
    for bad in (dataclasses.replace(layout, path=str(other)), dataclasses.replace(layout, nbytes=layout.nbytes * 2),
                dataclasses.replace(layout, id="0" * 32)):
        with pytest.raises(RuntimeError, match="not that engine's weights file.*weight_sync=distributed"):
            SharedMappings().views([bad])
    assert other.read_bytes() == b"x" * 16

    body = layout.to_json()
    assert SharedLayout.from_json(body) == layout
    body["tensors"]["w"]["dtype"] = "load"  # not a dtype: refused when the reply is read
    with pytest.raises(ValueError, match=r"dtype\(s\) \['load'\] are not torch dtype names"):
        SharedLayout.from_json(body)
