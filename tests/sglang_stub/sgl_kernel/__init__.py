"""Test-only stand-in for SGLang's CPU kernel build (``sgl_kernel``). Never shipped in the package.

SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) imports a module named ``sgl_kernel`` whose CPU build is made
only from SGLang's source and is not on PyPI. The tests put this folder (``tests/sglang_stub``) on ``PYTHONPATH``
of the SGLang server process so that the real SGLang server runs on a CPU-only machine.

It provides exactly one real function, :func:`assign_req_to_token_pool_cpu`, in plain torch. Any other name
(SGLang imports many at module level) is a placeholder that raises ``NotImplementedError`` naming the missing
kernel when it is called. It deliberately registers no ``torch.ops.sgl_kernel`` operator (in particular not
``convert_weight_packed``), so SGLang's AMX check is false and every layer takes its plain-torch
``forward_native`` path.
"""

import torch

__version__ = "0.0.0+nsr-test-stub"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    max_context_len: int,
) -> None:
    """For each request i, write the next ``end_offset[i] - start_offset[i]`` entries of ``out_cache_loc`` into
    ``req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]]`` (in place)."""
    del max_context_len  # the row width of req_to_token; bounds are the caller's
    pt = 0
    for i, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist(), strict=False):
        n = e - s
        if n > 0:
            req_to_token[i, s:e] = out_cache_loc[pt : pt + n].to(req_to_token.dtype)
        pt += n


def _missing(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not in the test stand-in (tests/sglang_stub): SGLang's CPU kernel build is missing"
        )

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = f"Missing CPU kernel {name!r}: calling it raises NotImplementedError."
    return kernel


def __getattr__(name: str):
    # SGLang does `from sgl_kernel import <kernel>` at import time in many modules, so a missing kernel is a
    # placeholder that raises NotImplementedError (naming the kernel) when it is called, not when it is imported.
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)  # keep the import machinery, pickle, inspect etc. working
    fn = _missing(name)
    globals()[name] = fn
    return fn
