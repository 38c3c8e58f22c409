"""Layout-invariant random draws: a counter-based hash of (seed, step, sample id, token index).

NSR's rescue decision for a token must not depend on how the batch was split across data-, context- and
tensor-parallel ranks or micro-batches, nor on how many draws happened before (checkpoint-resume). So a
draw is a *pure function* of its coordinates, never a read from torch's global generator:

    u = U53( mix( mix( mix( mix(seed) ^ step ) ^ sample_id ) ^ token_index ) )

where ``mix(x) = splitmix64_finalizer(x + 0x9E3779B97F4A7C15)`` (Steele, Lea & Flood 2014, "Fast
splittable pseudorandom number generators"; the finalizer is Stafford's "Mix13") and ``U53`` keeps the top
53 bits as a float64 in [0, 1) (``U24``: top 24 bits as float32).

Integer arithmetic on int64 tensors: torch wraps on overflow (two's complement), which is exactly the
arithmetic modulo 2**64 that splitmix64 needs; ``>>`` on int64 is arithmetic (sign-extending), so logical
shifts are emulated by masking off the copied sign bits. ``mix`` on Python ints gives the reference.

Shape legend: S = any broadcast shape of the inputs (e.g. [B, T] for tokens, [B] for sequences, [K] for
the gathered near-boundary tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SEQUENCE_INDEX", "derive_seed", "hash64", "mix64", "mix64_int", "row_keys", "uniform", "uniform_from_keys"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB

SEQUENCE_INDEX = -1
"""Token index used for sequence-level draws; response token indices are >= 0, so it is its own stream."""


def _signed(x: int) -> int:
    """The int64 bit pattern of an unsigned 64-bit value, as a Python int torch accepts."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def mix64_int(x: int) -> int:
    """Reference ``mix`` on Python ints (unsigned 64-bit result): splitmix64's step + finalizer."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, stream: str) -> int:
    """The seed of one named stream of draws (``"shuffle"``, ``"rescue"``, ...) of a run with seed ``seed``:
    ``mix(... mix(mix(seed) ^ b_0) ^ b_1 ...) >> 1`` over the UTF-8 bytes b_i of ``stream``.

    A pure function of ``(seed, stream)``, the same on every machine and Python (no ``hash()``), in [0, 2**63) so
    it fits an int64, JSON and YAML. Different streams of one seed, and one stream of different seeds, are unrelated.
    """
    h = mix64_int(seed & _MASK64)
    for byte in stream.encode("utf-8"):
        h = mix64_int(h ^ byte)
    return h >> 1


def _lsr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 by ``k`` (0 < k < 64): arithmetic shift, then clear the sign copies."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(x: Tensor) -> Tensor:
    """``mix`` on an int64 tensor, bit-identical to :func:`mix64_int` (results as signed int64)."""
    if x.dtype != torch.int64:
        raise ValueError(f"mix64 needs an int64 tensor, got dtype={x.dtype}; convert with .long().")
    z = x + _signed(_GOLDEN)
    z ^= _lsr(z, 30)
    z *= _signed(_M1)
    z ^= _lsr(z, 27)
    z *= _signed(_M2)
    z ^= _lsr(z, 31)
    return z


def row_keys(seed: int, step: int, sample_ids: Tensor) -> Tensor:
    """``mix(mix(mix(seed) ^ step) ^ sample_id)``: the per-sample part of :func:`hash64`, int64 [S].

    Computing it once per sample and finishing per token with :func:`uniform_from_keys` gives the same
    draws as :func:`uniform` with fewer operations on the (many) tokens.
    """
    head = mix64_int(mix64_int(seed & _MASK64) ^ (step & _MASK64))
    return mix64(sample_ids.long() ^ _signed(head))


def hash64(seed: int, step: int, sample_ids: Tensor, token_index: Tensor | int) -> Tensor:
    """64-bit hash of (seed, step, sample id, token index) -> int64 tensor of the broadcast shape S.

    ``seed`` and ``step`` are mixed exactly in Python; ``sample_ids`` and ``token_index`` are int64 tensors
    (or an int for ``token_index``, e.g. :data:`SEQUENCE_INDEX`) that broadcast against each other.
    """
    return _finish(row_keys(seed, step, sample_ids), token_index)


def _finish(keys: Tensor, token_index: Tensor | int) -> Tensor:
    if isinstance(token_index, int):
        return mix64(keys ^ _signed(token_index))
    return mix64(keys ^ token_index.to(device=keys.device, dtype=torch.int64))


def _to_uniform(h: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.float64:
        return _lsr(h, 11).to(torch.float64).mul_(2.0**-53)
    if dtype == torch.float32:
        return _lsr(h, 40).to(torch.float32).mul_(2.0**-24)
    raise ValueError(f"uniform(dtype={dtype}) is not supported; use torch.float64 or torch.float32.")


def uniform(
    seed: int,
    step: int,
    sample_ids: Tensor,
    token_index: Tensor | int,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Uniform draws in [0, 1) that are a pure function of (seed, step, sample id, token index).

    float64 uses the top 53 bits of :func:`hash64` (every value a multiple of 2**-53), float32 the top 24
    bits (multiples of 2**-24), so the result is exactly representable and strictly below 1.
    """
    return _to_uniform(hash64(seed, step, sample_ids, token_index), dtype)


def uniform_from_keys(
    keys: Tensor, token_index: Tensor | int, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """:func:`uniform` given ``keys = row_keys(seed, step, sample_ids)`` (broadcast against token_index)."""
    return _to_uniform(_finish(keys, token_index), dtype)
