"""EmbeddedEngine against transformers itself: greedy = ``generate(do_sample=False)``, log-probs = a full forward,
sampling frequencies = softmax, weight sync = the other model, on tiny random Qwen2 / Qwen3 / Qwen3-MoE models."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config, Qwen3MoeConfig

from nsr_megatron.rollout import EmbeddedEngine, Generation, RolloutEngine, SamplingParams, sample_tokens
from nsr_megatron.rollout.engine import prompt_seeds

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]  # different lengths -> left padding


def make_config(arch: str, **overrides):
    if arch == "qwen3":
        return Qwen3Config(**COMMON, head_dim=8, **overrides)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(
            **COMMON, head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, **overrides
        )
    if arch == "qwen2":  # tied embeddings: lm_head.weight is model.embed_tokens.weight
        return Qwen2Config(**COMMON, tie_word_embeddings=True, **overrides)
    raise AssertionError(arch)


def save_model(arch: str, path, seed: int):
    """A random tiny model with a sharpened output layer (clear argmax gaps), saved with save_pretrained."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_models")
    return {
        (arch, seed): save_model(arch, root / f"{arch}_{seed}", seed)
        for arch in ("qwen3", "qwen3_moe", "qwen2")
        for seed in (0, 1)
    }


@pytest.fixture(scope="module")
def engines(model_dirs):
    return {arch: EmbeddedEngine(model_dirs[(arch, 0)]) for arch in ("qwen3", "qwen3_moe", "qwen2")}


def reference_model(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def full_forward_logprobs(model, gen: Generation, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) at the response tokens from one uncached, unpadded forward of prompt + response."""
    ids = torch.tensor([gen.prompt_ids + gen.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(gen.prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, torch.tensor(gen.response_ids)[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop_token_ids": (-3,)}, "stop_token_ids"),
    ],
)
def test_sampling_params_reject_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_stop_ids_to_a_tuple():
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)


def test_engine_satisfies_the_protocol(engines):
    assert isinstance(engines["qwen3"], RolloutEngine)


# ---------------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "qwen2"])
@pytest.mark.parametrize(
    "params", [SamplingParams(max_new_tokens=10, top_k=1), SamplingParams(max_new_tokens=10, top_p=1e-6)]
)
def test_greedy_equals_transformers_generate_with_left_padding(engines, model_dirs, arch, params):
    gens = engines[arch].generate(PROMPTS, params, n=2, seed=3)
    model = reference_model(model_dirs[(arch, 0)])
    width = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, p in enumerate(PROMPTS):
        ids[k, width - len(p) :] = torch.tensor(p)
        mask[k, width - len(p) :] = 1
    ref = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=None
    )[:, width:]
    for k in range(len(PROMPTS)):
        for gen in gens[k]:
            assert gen.response_ids == ref[k].tolist()
            assert gen.finish_reason == "length"


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "qwen2"])
def test_logprobs_equal_an_uncached_full_forward(engines, model_dirs, arch):
    """Checks the KV cache, padding and position ids: cached left-padded decode vs one plain forward per sequence."""
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=20)
    gens = engines[arch].generate(PROMPTS, params, n=3, seed=11)
    model = reference_model(model_dirs[(arch, 0)])
    for group, prompt in zip(gens, PROMPTS, strict=True):
        assert len(group) == 3
        for gen in group:
            assert gen.prompt_ids == prompt and len(gen.response_ids) == len(gen.response_logprobs) == 12
            ref = full_forward_logprobs(model, gen, params.temperature)
            torch.testing.assert_close(torch.tensor(gen.response_logprobs), ref, atol=1e-5, rtol=0)


def test_same_seed_reproduces_and_other_seeds_differ(engines):
    engine, params = engines["qwen3_moe"], SamplingParams(max_new_tokens=16, temperature=1.0)
    a = engine.generate(PROMPTS, params, n=4, seed=7)
    b = engine.generate(PROMPTS, params, n=4, seed=7)
    c = engine.generate(PROMPTS, params, n=4, seed=8)
    assert a == b
    assert [g.response_ids for grp in a for g in grp] != [g.response_ids for grp in c for g in grp]
    # the n samples of one prompt are different draws
    assert len({tuple(g.response_ids) for g in a[0]}) > 1


def test_samples_do_not_depend_on_batch_composition(engines):
    """Draws are keyed by (prompt seed, sample index, position): sub-batching, n, the other prompts and the prompt's
    place in the call do not change sample j of a prompt (bitwise here; in general up to float rounding)."""
    engine, params = engines["qwen3"], SamplingParams(max_new_tokens=12, stop_token_ids=(5, 9))
    full = engine.generate(PROMPTS, params, n=3, seed=2)
    engine.max_batch_size = 2
    try:
        split = engine.generate(PROMPTS, params, n=3, seed=2)
    finally:
        engine.max_batch_size = 256
    alone = engine.generate(PROMPTS[:1], params, n=2, seed=2)
    assert_same_samples(split, full)
    assert_same_samples(alone, [full[0][:2]])
    # With per-prompt seeds a prompt's samples do not depend on its position in the call either (an engine pool
    # hands each engine a different share of the prompts).
    seeds = prompt_seeds(2, len(PROMPTS))
    assert seeds == prompt_seeds(2, 1, start=0) + prompt_seeds(2, len(PROMPTS) - 1, start=1)
    last = engine.generate(PROMPTS[2:3], params, n=3, seeds=seeds[2:3])
    reordered = engine.generate([PROMPTS[2], PROMPTS[0]], params, n=3, seeds=[seeds[2], seeds[0]])
    assert_same_samples(last, [full[2]])
    assert_same_samples(reordered, [full[2], full[0]])
    with pytest.raises(ValueError, match="one int per prompt"):
        engine.generate(PROMPTS, params, seeds=[1])


def assert_same_samples(got: list[list[Generation]], want: list[list[Generation]]) -> None:
    """Same tokens and finish reasons; log-probs within float32 rounding (a different batch shape may change the
    forward's last bits)."""
    assert [[(g.response_ids, g.finish_reason) for g in grp] for grp in got] == [
        [(g.response_ids, g.finish_reason) for g in grp] for grp in want
    ]
    for grp_g, grp_w in zip(got, want, strict=True):
        for g, w in zip(grp_g, grp_w, strict=True):
            torch.testing.assert_close(torch.tensor(g.response_logprobs), torch.tensor(w.response_logprobs))


def test_stop_tokens_end_sequences_and_max_new_tokens_gives_length(engines):
    engine = engines["qwen3"]
    stop = tuple(range(0, VOCAB, 8))
    gens = [
        g for grp in engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, stop_token_ids=stop), n=8) for g in grp
    ]
    reasons = {g.finish_reason for g in gens}
    assert reasons == {"stop", "length"}
    for g in gens:
        assert len(g.response_ids) == len(g.response_logprobs)
        if g.finish_reason == "stop":
            assert g.response_ids[-1] in stop and not set(g.response_ids[:-1]) & set(stop)
        else:
            assert len(g.response_ids) == 8 and not set(g.response_ids) & set(stop)
    for g in (g for grp in engine.generate(PROMPTS, SamplingParams(max_new_tokens=5), n=2) for g in grp):
        assert g.finish_reason == "length" and len(g.response_ids) == 5


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "qwen2"])
def test_the_static_kv_cache_gives_the_dynamic_caches_samples_exactly(model_dirs, arch):
    """Preallocated slabs (finished rows replaced by the last running ones) against transformers' DynamicCache:
    the same tokens, finish reasons and routed experts while rows finish at different steps; the same log-probs,
    bitwise while no row moves, else to float32 rounding (moved rows change the batch's row order)."""
    static = EmbeddedEngine(model_dirs[(arch, 0)], max_batch_size=12)  # sub-batches of 12 rows
    dynamic = EmbeddedEngine(model_dirs[(arch, 0)], max_batch_size=12, kv_cache="dynamic")
    assert (static.kv_cache, dynamic.kv_cache) == ("static", "dynamic")
    for stop in ((), tuple(range(0, VOCAB, 5))):
        params = SamplingParams(max_new_tokens=10, temperature=1.0, stop_token_ids=stop)
        routed = arch == "qwen3_moe"
        got = static.generate(PROMPTS, params, n=6, seed=11, return_routed_experts=routed)
        want = dynamic.generate(PROMPTS, params, n=6, seed=11, return_routed_experts=routed)
        lengths = {len(g.response_ids) for grp in got for g in grp}
        assert len(lengths) > (1 if stop else 0)  # with stop tokens, rows leave the batch early
        for grp_g, grp_w in zip(got, want, strict=True):
            for g, w in zip(grp_g, grp_w, strict=True):
                assert (g.response_ids, g.finish_reason) == (w.response_ids, w.finish_reason)
                if stop:
                    torch.testing.assert_close(torch.tensor(g.response_logprobs), torch.tensor(w.response_logprobs))
                else:
                    assert g.response_logprobs == w.response_logprobs
                if routed:
                    assert torch.equal(g.routed_experts, w.routed_experts)
    with pytest.raises(ValueError, match="kv_cache='paged'"):
        EmbeddedEngine(model_dirs[(arch, 0)], kv_cache="paged")


def test_a_sliding_window_model_uses_the_dynamic_cache(tmp_path):
    path = tmp_path / "sliding"
    AutoModelForCausalLM.from_config(make_config("qwen2", use_sliding_window=True, sliding_window=4)).save_pretrained(path)
    assert EmbeddedEngine(path).kv_cache == "dynamic"


def test_stop_token_on_the_last_step_is_stop(engines):
    engine = engines["qwen3"]
    first = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=1, top_k=1))[0][0].response_ids[0]
    gen = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=1, top_k=1, stop_token_ids=(first,)))[0][0]
    assert gen.response_ids == [first] and gen.finish_reason == "stop"


# ---------------------------------------------------------------------------------------------------- distribution


def chi2_critical(df: int, z: float = 4.75) -> float:
    """Upper chi-square quantile by Wilson-Hilferty; z = 4.75 is a one-sided p of about 1e-6."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def first_token_frequencies(engine, prompt, params, num):
    engine.max_batch_size = num  # one prefill, one sampling step over all rows
    try:
        gens = engine.generate([prompt], params, n=num, seed=123)[0]
    finally:
        engine.max_batch_size = 256
    tokens = torch.tensor([g.response_ids[0] for g in gens])
    return torch.bincount(tokens, minlength=VOCAB).double() / num, gens


def test_first_token_frequencies_match_softmax(engines, model_dirs):
    """Pearson chi-square of 20k first-token samples against softmax(logits / T), p ~ 1e-6 critical value
    (bins with expected count < 5 merged); and every probability within 5 binomial standard deviations."""
    engine, prompt, num, temperature = engines["qwen3"], PROMPTS[1], 20_000, 1.0
    freq, gens = first_token_frequencies(engine, prompt, SamplingParams(max_new_tokens=1, temperature=temperature), num)
    with torch.no_grad():
        logits = reference_model(model_dirs[("qwen3", 0)])(torch.tensor([prompt])).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, dim=-1)
    assert probs.max() < 0.9  # a non-degenerate distribution, or the test proves nothing
    expected, observed = probs * num, freq * num
    big = expected >= 5
    exp_bins = torch.cat([expected[big], expected[~big].sum()[None]])
    obs_bins = torch.cat([observed[big], observed[~big].sum()[None]])
    stat = float(((obs_bins - exp_bins) ** 2 / exp_bins.clamp_min(1e-12)).sum())
    assert stat < chi2_critical(len(exp_bins) - 1), stat
    sigma = (probs * (1 - probs) / num).sqrt()
    assert float(((freq - probs).abs() / sigma.clamp_min(1e-12)).max()) < 5
    # the reported log-prob of each sampled token is log p(token)
    for g in gens[:50]:
        assert abs(g.response_logprobs[0] - math.log(probs[g.response_ids[0]])) < 1e-5


def test_top_k_samples_from_the_renormalised_top_k_and_top_p_tiny_is_argmax(engines, model_dirs):
    engine, prompt, num = engines["qwen3"], PROMPTS[1], 10_000
    with torch.no_grad():
        logits = reference_model(model_dirs[("qwen3", 0)])(torch.tensor([prompt])).logits[0, -1].double()
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, 3).indices
    freq, gens = first_token_frequencies(engine, prompt, SamplingParams(max_new_tokens=1, top_k=3), num)
    renorm = torch.zeros_like(probs)
    renorm[top] = probs[top] / probs[top].sum()
    sigma = (renorm * (1 - renorm) / num).sqrt().clamp_min(1e-12)
    assert set(freq.nonzero()[:, 0].tolist()) <= set(top.tolist())
    assert float(((freq - renorm).abs() / sigma)[top].max()) < 5
    # log-probs are taken before truncation: log softmax(logits), not log of the renormalised top-k
    assert abs(gens[0].response_logprobs[0] - math.log(probs[gens[0].response_ids[0]])) < 1e-5
    freq, _ = first_token_frequencies(engine, prompt, SamplingParams(max_new_tokens=1, top_p=1e-3), 2000)
    assert freq[int(probs.argmax())] == 1.0


def test_sample_tokens_inverse_cdf_on_hand_made_probabilities():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    logits = probs.log()
    cases = [(0.0, 0), (0.099, 0), (0.1001, 1), (0.35, 2), (0.61, 3), (0.9999, 3)]
    for u, expect in cases:
        tok, lp = sample_tokens(logits, torch.tensor([u], dtype=torch.float64), SamplingParams())
        assert int(tok) == expect and abs(float(lp) - math.log(probs[0, expect])) < 1e-6
    # top_p = 0.5: keeps 0.4 and 0.3 (mass before 0.3 is 0.4 < 0.5), renormalised to 4/7, 3/7
    for u, expect in [(0.5, 3), (0.58, 2)]:
        tok, _ = sample_tokens(logits, torch.tensor([u], dtype=torch.float64), SamplingParams(top_p=0.5))
        assert int(tok) == expect


# ---------------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2"])
def test_update_weights_in_place_reproduces_the_other_model(model_dirs, arch):
    """Loads the other model's checkpoint tensors by their HF names (per-expert names for the MoE, no lm_head for
    the tied Qwen2) into the engine's existing storage; outputs then equal an engine built on the other model."""
    engine = EmbeddedEngine(model_dirs[(arch, 0)])
    other = EmbeddedEngine(model_dirs[(arch, 1)])
    params = SamplingParams(max_new_tokens=10, temperature=0.9)
    before = engine.generate(PROMPTS, params, n=2, seed=4)
    target = other.generate(PROMPTS, params, n=2, seed=4)
    assert before != target
    ptrs = {name: p.data_ptr() for name, p in engine.model.named_parameters()}
    state = load_file(model_dirs[(arch, 1)] / "model.safetensors")
    assert engine.update_weights(state.items()) == len(state)
    assert {name: p.data_ptr() for name, p in engine.model.named_parameters()} == ptrs
    assert_same_samples(engine.generate(PROMPTS, params, n=2, seed=4), target)


def test_update_weights_tied_lm_head_updates_the_embedding(model_dirs):
    engine = EmbeddedEngine(model_dirs[("qwen2", 0)])
    new = torch.randn(VOCAB, 32)
    assert engine.update_weights([("lm_head.weight", new.to(torch.bfloat16))]) == 1
    torch.testing.assert_close(engine.model.model.embed_tokens.weight, new.to(torch.bfloat16).float())


def test_update_weights_errors_name_the_tensor_and_shapes(engines):
    engine = engines["qwen3_moe"]
    with pytest.raises(ValueError, match=r"unknown tensor 'model\.layers\.9\.mlp\.gate\.weight'"):
        engine.update_weights([("model.layers.9.mlp.gate.weight", torch.zeros(4, 32))])
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.mlp\.experts\.1\.up_proj\.weight' has shape \(16, 31\).*\(16, 32\)"
    ):
        engine.update_weights([("model.layers.0.mlp.experts.1.up_proj.weight", torch.zeros(16, 31))])
    with pytest.raises(ValueError, match=r"has shape \(64, 16\) but the model expects \(64, 32\)"):
        engine.update_weights([("model.embed_tokens.weight", torch.zeros(64, 16))])


# ---------------------------------------------------------------------------------------------------- construction


def test_config_only_directory_and_from_config_build_seeded_random_models(tmp_path):
    config = make_config("qwen3_moe")
    config.save_pretrained(tmp_path)
    a, b = EmbeddedEngine(tmp_path), EmbeddedEngine.from_config(config.to_dict())
    params = SamplingParams(max_new_tokens=6)
    assert a.generate(PROMPTS, params, seed=1) == b.generate(PROMPTS, params, seed=1)
    with pytest.raises(ValueError, match="model_type"):
        EmbeddedEngine.from_config({"vocab_size": 8})
    with pytest.raises(ValueError, match="no config.json"):
        EmbeddedEngine(tmp_path / "missing")


def test_generate_rejects_bad_requests(engines):
    engine, params = engines["qwen3"], SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty"):
        engine.generate([[1], []], params)
    with pytest.raises(ValueError, match=r"token id 64, outside \[0, 64\)"):
        engine.generate([[1, 64]], params)
    with pytest.raises(ValueError, match=r"n=0"):
        engine.generate([[1]], params, n=0)
    with pytest.raises(ValueError, match=r"stop_token_ids=\[99\]"):
        engine.generate([[1]], SamplingParams(stop_token_ids=(99,)))


def test_rollout_package_does_not_import_megatron():
    import subprocess
    import sys

    code = (
        "import sys, nsr_megatron.rollout as r; r.HttpEngine; "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'megatron'], 'megatron imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
