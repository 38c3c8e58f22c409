"""Group advantages, dynamic-sampling filter, micro-batch packing and the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch

from nsr_megatron.trainer.advantages import group_advantages, informative_groups
from nsr_megatron.trainer.experience import Sample, dp_shard, mini_batches, pack_micro_batches
from nsr_megatron.trainer.runtime import lr_at


def test_group_advantages_by_hand() -> None:
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    a = group_advantages(r)
    torch.testing.assert_close(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert torch.equal(a[1], torch.zeros(4))
    torch.testing.assert_close(group_advantages(r, normalize_std=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert informative_groups(r).tolist() == [True, False]
    with pytest.raises(ValueError, match=r"rewards must be \[num_prompts, samples_per_prompt\], got shape \(4,\)"):
        group_advantages(r[0])


def _sample(uid: int, p: int, r: int) -> Sample:
    return Sample(uid=uid, prompt_ids=list(range(10, 10 + p)), response_ids=list(range(50, 50 + r)),
                  rollout_logprobs=[-0.5 - 0.1 * i for i in range(r)], reward=1.0, advantage=float(uid))


def test_pack_micro_batches_aligns_targets_with_the_response() -> None:
    samples = [_sample(0, 3, 2), _sample(1, 2, 4), _sample(2, 4, 1)]
    mbs = pack_micro_batches(samples, max_tokens=16, pad_id=0, seq_multiple=4)
    S = 8  # longest is 6 tokens, rounded up to a multiple of 4
    assert [mb["tokens"].shape for mb in mbs] == [(2, S), (1, S)]
    mb = mbs[0]
    # sample 1: prompt [10, 11], response [50, 51, 52, 53]: targets 1..4 are the response tokens
    assert mb["tokens"][1].tolist() == [10, 11, 50, 51, 52, 53, 0, 0]
    assert mb["mask"][1].tolist() == [0, 1, 1, 1, 1, 0, 0]
    assert mb["targets"][1][mb["mask"][1].bool()].tolist() == [50, 51, 52, 53]
    assert mb["token_index"][1][mb["mask"][1].bool()].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(mb["rollout_logprobs"][1][1:5], torch.tensor([-0.5, -0.6, -0.7, -0.8]))
    assert mb["sample_ids"].tolist() == [0, 1] and mb["advantages"].tolist() == [0.0, 1.0]
    assert mbs[1]["mask"].sum() == 1


def test_uniform_rows_pad_the_last_micro_batch_with_rows_that_carry_nothing() -> None:
    """Under pipeline parallelism every micro-batch has one [B, S] shape; the padding rows leave the loss, its
    denominators and its statistics exactly as they were."""
    from nsr_megatron.losses import PolicyLossConfig, loss_denominators, policy_loss

    samples = [_sample(i, 3, 2 + i % 3) for i in range(5)]
    plain = pack_micro_batches(samples, max_tokens=16, pad_id=0, seq_len=8)
    even = pack_micro_batches(samples, max_tokens=16, pad_id=0, seq_len=8, uniform_rows=True)
    assert [mb["tokens"].shape[0] for mb in plain] == [2, 2, 1]
    assert [mb["tokens"].shape for mb in even] == [(2, 8)] * 3
    last, pad = plain[-1], even[-1]
    assert pad["sample_ids"].tolist() == [4, -1] and pad["mask"][1].sum() == 0 and not pad["valid"][1].any()
    assert pad["advantages"][1] == 0 and (pad["tokens"][1] == 0).all()
    cfg = PolicyLossConfig(name="nsr")
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(2, 7, generator=g) * 0.1 - 1.0  # [B, T] the padded micro-batch's log-probs
    old = lp + torch.randn(2, 7, generator=g) * 0.3
    for key in ("tokens", "seqs"):
        assert loss_denominators(cfg, pad["mask"])[key] == loss_denominators(cfg, last["mask"])[key]
    kw = dict(step=3, global_num_tokens=torch.tensor(10.0), global_num_seqs=torch.tensor(2.0))
    got = policy_loss(cfg, lp, old, pad["advantages"], pad["mask"], sample_ids=pad["sample_ids"],
                      token_index=pad["token_index"], **kw)  # type: ignore[arg-type]
    want = policy_loss(cfg, lp[:1], old[:1], last["advantages"], last["mask"], sample_ids=last["sample_ids"],
                       token_index=last["token_index"], **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(got[0], want[0])
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], msg=k)


def test_sharding_and_mini_batches_cover_every_sample_once() -> None:
    samples = [_sample(i, 2, 2) for i in range(10)]
    shards = [dp_shard(samples, r, 3) for r in range(3)]
    assert sorted(s.uid for shard in shards for s in shard) == list(range(10))
    parts = mini_batches(samples, 3)
    assert [len(p) for p in parts] == [4, 3, 3] and [s.uid for p in parts for s in p] == list(range(10))


def test_lr_schedule() -> None:
    kw = dict(lr=1.0, min_lr=0.1, warmup=2, total=10)
    assert [lr_at(s, schedule="constant", **kw) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_at(2, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(6, schedule="linear", **kw) == pytest.approx(0.55)


def test_weight_group_host_is_loopback_only_for_local_engines() -> None:
    import socket

    from nsr_megatron.trainer.runtime import weight_group_host

    assert weight_group_host("", []) == "127.0.0.1"  # engines the trainer launches listen on loopback
    assert weight_group_host("", ["http://127.0.0.1:30000", "http://localhost:30001"]) == "127.0.0.1"
    assert weight_group_host("", ["http://node7:30000"]) == socket.getfqdn()  # engines on another node
    assert weight_group_host("10.0.0.5", ["http://node7:30000"]) == "10.0.0.5"


def test_the_on_policy_shortcut_applies_only_where_the_old_forward_adds_nothing() -> None:
    from types import SimpleNamespace

    from nsr_megatron.config import load_config
    from nsr_megatron.trainer.loop import on_policy_shortcut

    def applies(optimizer_steps: int = 1, routing: object = None, *overrides: str) -> bool:
        rt = SimpleNamespace(config=load_config(None, list(overrides)), policy=SimpleNamespace(routing=routing))
        return on_policy_shortcut(rt, optimizer_steps)  # type: ignore[arg-type]

    assert applies()
    assert not applies(2)  # the second optimizer step trains on a policy that moved: it needs the old forward
    assert not applies(1, object())  # the routing profiler measures the drift between the two forwards
    for override in ("algorithm.on_policy_shortcut=false", "algorithm.old_logprobs=rollout", "loss.tis_cap=2.0",
                     "loss.mis_low=0.5", "loss.mis_high=2.0", "algorithm.routing_replay=R2"):
        assert not applies(1, None, override), override
    assert applies(1, None, "algorithm.routing_replay=R3")


def test_auto_weight_sync_uses_shared_memory_only_for_server_engines_on_this_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from nsr_megatron.config import RolloutConfig
    from nsr_megatron.trainer.runtime import weight_sync_mode

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert RolloutConfig().weight_sync == "auto"
    assert weight_sync_mode(RolloutConfig(backend="server")) == "shared_memory"
    assert weight_sync_mode(RolloutConfig(backend="server", urls=["http://localhost:30000"])) == "shared_memory"
    assert weight_sync_mode(RolloutConfig(backend="server", urls=["http://10.0.0.7:30000"])) == "distributed"
    assert weight_sync_mode(RolloutConfig(backend="sglang")) == "distributed"
    assert weight_sync_mode(RolloutConfig()) == "distributed"  # the embedded engine
    assert weight_sync_mode(RolloutConfig(backend="server", weight_sync="disk")) == "disk"  # explicit wins
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert weight_sync_mode(RolloutConfig(backend="server")) == "shared_memory"  # torchrun on one node
    monkeypatch.setenv("WORLD_SIZE", "8")  # two nodes of 4
    assert weight_sync_mode(RolloutConfig(backend="server")) == "distributed"
