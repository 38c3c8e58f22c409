"""The CPU layer (``nsr_megatron/platform.py``), in gloo processes:

* part 8: the DDP buffers' in-place gradient reduce-scatter and parameter all-gather are skipped in a
  data-parallel group of one rank (gloo would copy the whole buffer onto itself), with an optimizer step bitwise
  equal to one that runs them; with two ranks they run;
* ``outside_cpu_compat``: the embedded engine's Hugging Face model runs without part 2's mode, and samples
  exactly as it does under it."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from tests.distributed._gloo import run

CONFIG = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64}


def _policy() -> Any:
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.provider import build_model

    return build_model(arch_from_hf(CONFIG), model=ModelConfig(hf_path="unused"), parallel=ParallelConfig(),
                       optimizer=OptimizerConfig(lr=1e-2))


def _step(bundle: Any, seed: int) -> None:
    from nsr_megatron.trainer import actor

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (2, 8), generator=g)

    def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["tokens"].flatten()), {}

    actor.zero_grads(bundle)
    actor.forward_backward(bundle, [{"tokens": tokens}], loss_fn)
    actor.optimizer_step(bundle, lr=1e-2)


class _Spy:
    def __init__(self, collective: Any) -> None:
        self.collective, self.calls = collective, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.collective(*args, **kwargs)


def worker(rank: int, world_size: int) -> None:
    from megatron.core.distributed import param_and_grad_buffer as buffers

    from nsr_megatron import parallel
    from nsr_megatron.config import ParallelConfig

    parallel.initialize(ParallelConfig(), seed=1)
    wrappers = (buffers.dist_all_gather_func, buffers.dist_reduce_scatter_func)
    originals = tuple(w.__wrapped__ for w in wrappers)
    spies = tuple(_Spy(o) for o in originals)
    for w, spy in zip(wrappers, spies, strict=True):
        w.__wrapped__ = spy
    skipping, running = _policy(), _policy()
    with torch.no_grad():
        for a, b in zip(skipping.module.parameters(), running.module.parameters(), strict=True):
            b.copy_(a)
    for step in range(2):
        _step(skipping, seed=10 * step + rank)
    gathers, scatters = (s.calls for s in spies)
    if world_size == 1:
        assert gathers == scatters == 0, (gathers, scatters)
        buffers.dist_all_gather_func, buffers.dist_reduce_scatter_func = spies  # the collectives themselves
        for step in range(2):
            _step(running, seed=10 * step + rank)
        assert spies[0].calls > 0 and spies[1].calls > 0
        for a, b in zip(skipping.module.parameters(), running.module.parameters(), strict=True):
            assert torch.equal(a, b)
    else:  # a real group: every step reduces gradients and gathers parameters, and the ranks agree
        assert gathers >= 2 and scatters >= 2, (gathers, scatters)
        for p in skipping.module.parameters():
            others = [torch.empty_like(p) for _ in range(world_size)]
            torch.distributed.all_gather(others, p.detach().contiguous())
            assert all(torch.equal(o, others[0]) for o in others)
    buffers.dist_all_gather_func, buffers.dist_reduce_scatter_func = wrappers
    for w, o in zip(wrappers, originals, strict=True):
        w.__wrapped__ = o


def test_one_rank_skips_the_buffer_collectives_and_steps_the_same() -> None:
    run(worker, 1)


def test_two_ranks_run_them() -> None:
    run(worker, 2)


def outside_worker(rank: int, world_size: int) -> None:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from nsr_megatron import parallel
    from nsr_megatron.config import ParallelConfig
    from nsr_megatron.platform import _INSTALLED, outside_cpu_compat
    from nsr_megatron.rollout import EmbeddedEngine, SamplingParams, embedded

    def mode_on() -> bool:
        return _INSTALLED["mode"] in torch.overrides._get_current_function_mode_stack()  # type: ignore[attr-defined]

    parallel.initialize(ParallelConfig(), seed=1)
    assert mode_on()
    torch.empty(1, device="cuda")  # part 2 maps it to the CPU
    with outside_cpu_compat():
        assert not mode_on()
        try:
            torch.empty(1, device="cuda")
        except (RuntimeError, AssertionError):
            pass
        else:
            raise AssertionError("a CUDA factory ran on this CPU machine outside the layer")
    assert mode_on()

    cfg = {k: v for k, v in CONFIG.items() if k != "model_type"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**cfg), dtype=torch.float32).eval()
    engine = EmbeddedEngine.from_model(model)
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(mode_on()))
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, stop_token_ids=(3,))
    outside = engine.generate(prompts, params, n=4, seed=5)
    assert seen and not any(seen)  # no forward ran under the mode
    embedded.outside_cpu_compat = contextlib.nullcontext  # type: ignore[assignment]
    seen.clear()
    under = engine.generate(prompts, params, n=4, seed=5)
    assert seen and all(seen)
    for a, b in zip(outside, under, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.response_ids == y.response_ids and x.response_logprobs == y.response_logprobs


def test_the_embedded_engine_runs_outside_the_layer_and_samples_the_same() -> None:
    run(outside_worker, 1)
