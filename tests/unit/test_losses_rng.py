"""The counter-based hash behind NSR's draws: bit-exact splitmix64, uniform, pure, layout-free."""

from __future__ import annotations

import pytest
import torch

from nsr_megatron.losses.rng import (
    SEQUENCE_INDEX,
    hash64,
    mix64,
    mix64_int,
    row_keys,
    uniform,
    uniform_from_keys,
)

U64 = (1 << 64) - 1


def test_mix64_matches_published_splitmix64_output() -> None:
    # splitmix64 seeded with 0: the first output is 0xE220A8397B1DCDAF (Vigna's reference C code).
    assert mix64_int(0) == 0xE220A8397B1DCDAF
    assert int(mix64(torch.tensor([0])).item()) & U64 == 0xE220A8397B1DCDAF


def test_mix64_tensor_is_bit_identical_to_python_reference_including_negatives() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-(2**63), 2**63 - 1, (2000,), generator=g, dtype=torch.int64)
    x = torch.cat([x, torch.tensor([0, -1, 1, 2**63 - 1, -(2**63)])])
    got = [v & U64 for v in mix64(x).tolist()]
    want = [mix64_int(v & U64) for v in x.tolist()]
    assert got == want


def test_hash64_is_pure_and_broadcasts() -> None:
    ids = torch.arange(6).view(6, 1)
    tok = torch.arange(5).view(1, 5)
    h = hash64(3, 7, ids, tok)
    assert h.shape == (6, 5)
    assert torch.equal(h, hash64(3, 7, ids.expand(6, 5).clone(), tok.expand(6, 5).clone()))
    # any single coordinate changes the hash
    for other in (hash64(4, 7, ids, tok), hash64(3, 8, ids, tok), hash64(3, 7, ids + 1, tok)):
        assert (other != h).all()
    assert (hash64(3, 7, ids, SEQUENCE_INDEX) != h).all()


def test_uniform_range_mean_and_independence() -> None:
    n = 200_000
    u = uniform(1, 2, torch.arange(n), torch.arange(n) % 97)
    assert u.dtype == torch.float64 and 0.0 <= u.min() and u.max() < 1.0
    # mean of U(0,1): 1/2 with standard error sqrt(1/12 / n) = 6.5e-4; 5 sigma
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12 / n) ** 0.5
    counts = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
    chi2 = ((counts - n / 10) ** 2 / (n / 10)).sum().item()
    assert chi2 < 40.0  # chi-square with 9 dof: P(> 40) ~ 7e-6
    # neighbouring steps are uncorrelated
    v = uniform(1, 3, torch.arange(n), torch.arange(n) % 97)
    corr = torch.corrcoef(torch.stack([u, v]))[0, 1].item()
    assert abs(corr) < 5 / n**0.5


def test_uniform_float32_is_below_one_and_matches_float64_top_bits() -> None:
    ids = torch.arange(10_000)
    u32 = uniform(5, 0, ids, 0, dtype=torch.float32)
    u64 = uniform(5, 0, ids, 0)
    assert u32.dtype == torch.float32 and u32.max() < 1.0
    assert torch.equal(u32.double(), torch.floor(u64 * 2**24) / 2**24)
    with pytest.raises(ValueError, match="use torch.float64 or torch.float32"):
        uniform(5, 0, ids, 0, dtype=torch.float16)


def test_uniform_never_touches_the_global_generator() -> None:
    state = torch.get_rng_state()
    uniform(0, 0, torch.arange(100), torch.arange(100))
    assert torch.equal(state, torch.get_rng_state())


def test_mix64_rejects_non_int64() -> None:
    with pytest.raises(ValueError, match="convert with .long()"):
        mix64(torch.arange(3, dtype=torch.int32))


def test_row_keys_then_tokens_equals_the_one_shot_hash() -> None:
    ids = torch.tensor([3, 99, -5, 2**40])
    tok = torch.tensor([[0, 1, 7], [2, 2, 2], [5, 0, 1], [9, 8, 7]])
    keys = row_keys(13, 4, ids)  # [4]
    assert torch.equal(uniform_from_keys(keys[:, None], tok), uniform(13, 4, ids[:, None], tok))
    assert torch.equal(uniform_from_keys(keys, SEQUENCE_INDEX), uniform(13, 4, ids, SEQUENCE_INDEX))
