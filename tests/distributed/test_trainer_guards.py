"""The trainer's guards, on a real megatron policy in a gloo process:

* a non-finite log-prob, loss or gradient skips the optimizer step and leaves the weights and the Adam state
  bitwise unchanged, and the loop counts it;
* an offloaded reference model holds no weight storage except during its own forward, and the weights it gets
  back are the right ones;
* the policy's torch Adam runs fused, takes the step torch's per-parameter Adam takes (to float rounding),
  and stays fused across a checkpoint load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.distributed._gloo import run
from tests.helpers import echo_rows, make_tiny_model, write_jsonl


def _runtime(root: Path, *overrides: str) -> Any:
    from nsr_megatron.cli import CONFIGS_DIR
    from nsr_megatron.config import load_config
    from nsr_megatron.trainer.preflight import preflight
    from nsr_megatron.trainer.runtime import build_runtime

    config = load_config(CONFIGS_DIR / "quickstart.yaml", [
        f"model.hf_path={root / 'hf'}", f"data.path={root / 'echo.jsonl'}", f"run.run_dir={root / 'run'}",
        "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", *overrides])
    return build_runtime(config, preflight(config, world_size=1), world_size=1)


def _phases(rt: Any) -> Any:
    from nsr_megatron.telemetry.status import PhaseTimer

    return PhaseTimer(rt.run_dir, write_status=False)


def _snapshot(bundle: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = [p.detach().clone() for p in bundle.module.parameters()]
    state = []
    for opt in getattr(bundle.optimizer, "chained_optimizers", [bundle.optimizer]):
        for per_param in opt.optimizer.state.values():
            state += [v.detach().clone() for v in per_param.values() if isinstance(v, torch.Tensor)]
    return params, state


def _micro(rt: Any, step: int) -> list[dict[str, torch.Tensor]]:
    from nsr_megatron.trainer import loop
    from nsr_megatron.trainer.experience import pack_micro_batches

    batch, _, _ = loop.sample_batch(rt, step, _phases(rt))
    micro = pack_micro_batches(batch.mine, max_tokens=4096, pad_id=0)
    loop._attach_logprobs(rt, micro)
    return micro


def nonfinite_worker(rank: int, world_size: int, root: Path) -> None:
    from nsr_megatron.trainer import actor, loop

    rt = _runtime(root)
    loop.rl_step(rt, 0, _phases(rt))  # a normal step: Adam has state now
    micro = _micro(rt, 1)
    fn = actor.policy_loss_fn(rt.config.loss, step=1, temperature=1.0, global_num_tokens=micro[0]["mask"].sum(),
                              global_num_seqs=torch.tensor(float(len(micro[0]["mask"]))), scale=1.0)

    def grad_nan(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> Any:
        loss, sums = fn(logits, batch)  # finite value; d sqrt(x)/dx at 0 is inf, times 0: NaN gradients
        return loss + 0.0 * torch.sqrt((logits * 0.0).sum()), sums

    bad_old = [dict(mb) for mb in micro]
    row, col = (bad_old[0]["mask"] > 0).nonzero()[0].tolist()
    bad_old[0]["old_logprobs"] = bad_old[0]["old_logprobs"].clone()
    bad_old[0]["old_logprobs"][row, col] = float("nan")
    inf_old = [dict(mb) for mb in micro]
    inf_old[0]["old_logprobs"] = inf_old[0]["old_logprobs"].clone()
    inf_old[0]["old_logprobs"][row, col] = float("-inf")  # clamped inside the loss, so caught as a log-prob
    inf_adv = [dict(mb) for mb in micro]
    inf_adv[0]["advantages"] = torch.full_like(inf_adv[0]["advantages"], float("inf"))  # the loss is not finite
    for name, batches, loss_fn in (("NaN old log-prob", bad_old, fn), ("-inf old log-prob", inf_old, fn),
                                   ("inf advantage", inf_adv, fn), ("NaN gradient", micro, grad_nan)):
        before = _snapshot(rt.policy)
        _, grad_norm = actor.train_step(rt.policy, batches, loss_fn, lr=1e-2)
        assert grad_norm is None, f"{name}: the step was not skipped"
        after = _snapshot(rt.policy)
        assert len(after[1]) == len(before[1]) > 0
        for a, b in zip(before[0] + before[1], after[0] + after[1], strict=True):
            assert torch.equal(a, b), f"{name}: a weight or an Adam state tensor changed"
    # The same batch, finite: the step happens and changes the weights.
    before = _snapshot(rt.policy)
    _, grad_norm = actor.train_step(rt.policy, micro, fn, lr=1e-2)
    assert grad_norm is not None and grad_norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(before[0], _snapshot(rt.policy)[0], strict=True))

    # Through the loop: the engine hands back a NaN log-prob; with old_logprobs=rollout that mini-batch skips.
    rt.config.algorithm.old_logprobs = "rollout"
    generate = rt.engine.generate

    def poisoned(*args: Any, **kwargs: Any) -> Any:
        groups = generate(*args, **kwargs)
        groups[0][0].response_logprobs[0] = float("nan")
        return groups

    rt.engine.generate = poisoned
    metrics = loop.rl_step(rt, 2, _phases(rt))
    assert metrics["train/skipped_steps"] == 1.0  # the first of two mini-batches holds the NaN
    assert metrics["grad_norm"] is not None and metrics["grad_norm"] > 0  # the second one trained
    rt.scorer.close()


def test_nonfinite_values_never_reach_the_weights(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "hf")
    write_jsonl(tmp_path / "echo.jsonl", echo_rows(64))
    run(nonfinite_worker, 1, tmp_path)


def offload_worker(rank: int, world_size: int, root: Path) -> None:
    from nsr_megatron.trainer import actor, loop

    rt = _runtime(root, "loss.kl_coef=0.05", "model.offload_reference=true")
    ref = rt.reference
    params = list(ref.module.parameters())
    on_device: list[bool] = []

    def record(module: Any, args: Any) -> None:
        on_device.append(all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in params))

    ref.module.register_forward_pre_hook(record)
    assert ref.offloaded and all(p.untyped_storage().nbytes() == 0 for p in params)
    # Before any update the reference equals the policy: the reloaded weights must give the policy's log-probs.
    micro = _micro(rt, 0)
    with ref.in_use():
        assert not ref.offloaded
        ref_lp = actor.token_logprobs(ref, micro, temperature=1.0)
    policy_lp = actor.token_logprobs(rt.policy, micro, temperature=1.0)
    assert ref.offloaded
    for a, b in zip(ref_lp, policy_lp, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for step in range(2):  # the loop brings it back for each of its forwards only
        calls = len(on_device)
        metrics = loop.rl_step(rt, step, _phases(rt))
        assert len(on_device) > calls and all(on_device), on_device
        assert ref.offloaded, "the reference stayed on the device after its use"
        assert metrics["kl_ref"] > 0
    rt.scorer.close()


def test_offloaded_reference_holds_its_weights_only_while_in_use(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "hf")
    write_jsonl(tmp_path / "echo.jsonl", echo_rows(64))
    run(offload_worker, 1, tmp_path)



def _inner_adams(bundle: Any) -> list[Any]:
    return [opt.optimizer for opt in getattr(bundle.optimizer, "chained_optimizers", [bundle.optimizer])]


def fused_adam_worker(rank: int, world_size: int, root: Path) -> None:
    from nsr_megatron.trainer import loop
    from nsr_megatron.trainer.checkpoint import load_checkpoint, save_checkpoint

    rt = _runtime(root)
    loop.rl_step(rt, 0, _phases(rt))  # Adam has state now
    inner = _inner_adams(rt.policy)
    assert inner and all(g["fused"] is True and not g["foreach"] for o in inner for g in o.param_groups)
    g = torch.Generator().manual_seed(0)
    for opt in inner:
        params = [p for group in opt.param_groups for p in group["params"]]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, t in zip(params, twins, strict=True):
            t.grad = p.grad.clone()
        hyper = {k: opt.param_groups[0][k] for k in ("lr", "betas", "eps", "weight_decay")}
        ref = type(opt)(twins, **hyper, foreach=False, fused=False)
        for p, t in zip(params, twins, strict=True):
            ref.state[t] = {k: v.detach().clone() for k, v in opt.state[p].items()}
        opt.step()
        ref.step()
        for p, t in zip(params, twins, strict=True):
            torch.testing.assert_close(p.detach(), t.detach(), rtol=2e-6, atol=1e-7)
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[t]["exp_avg_sq"], rtol=2e-6, atol=0)
            assert float(opt.state[p]["step"]) == float(ref.state[t]["step"]) > 1
    # A step count held the way the per-parameter path may hold it (another dtype) is given back as fp32.
    from nsr_megatron.models.provider import fuse_torch_adam

    first = inner[0].param_groups[0]["params"][0]
    inner[0].state[first]["step"] = inner[0].state[first]["step"].double()
    assert fuse_torch_adam(rt.policy.optimizer) == sum(len(o.param_groups) for o in inner)
    assert inner[0].state[first]["step"].dtype == torch.float32
    # A checkpoint saved with the per-parameter update loads fused again.
    for opt in inner:
        for group in opt.param_groups:
            group["fused"] = None
    save_checkpoint(root / "ckpt", 1, rt.policy.module, rt.policy.optimizer)
    load_checkpoint(root / "ckpt" / "step_00000001", rt.policy.module, rt.policy.optimizer)
    assert all(g["fused"] is True for o in _inner_adams(rt.policy) for g in o.param_groups)
    metrics = loop.rl_step(rt, 1, _phases(rt))
    assert metrics["grad_norm"] is not None and metrics["grad_norm"] > 0
    rt.scorer.close()


def test_the_policy_adam_is_fused_and_takes_torchs_step(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "hf")
    write_jsonl(tmp_path / "echo.jsonl", echo_rows(64))
    run(fused_adam_worker, 1, tmp_path)
