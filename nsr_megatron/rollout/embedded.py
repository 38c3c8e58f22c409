"""Embedded rollout engine: a Hugging Face causal LM driven by its own batched, KV-cached sampling loop.

Pure torch + transformers (no megatron, no SGLang), so the whole RL loop runs on a laptop CPU; the same loop runs
on one GPU. Per sub-batch of at most ``max_batch_size`` rows (a row = one sample of one prompt):

1. prefill once per *distinct* prompt (left-padded, attention mask + position ids), then repeat the KV cache
   rows for the ``n`` samples (``DynamicCache.batch_select_indices``), so prefill costs P forwards, not P * n;
2. decode one token per forward over the rows still generating, with a preallocated KV cache
   (``kv_cache="static"``, the default: :class:`_SlabCache`, one [rows, heads, prompt + new tokens, head_dim] slab per
   layer, written in place, so no ``torch.cat`` per token); rows that emitted a stop token leave the batch: the
   rows still generating are always the slab's first rows, and a finished row's place is taken by one from the
   end, so only the moved rows are copied (``kv_cache="dynamic"``: transformers' ``DynamicCache``, which
   concatenates per token and copies every remaining row when one finishes);
3. sample with temperature / top-k / top-p from uniforms that are a counter-based hash of
   (prompt seed s_i, sample index j, response position t) (:func:`nsr_megatron.rollout.engine.row_key`), never
   from a stateful generator.

Reproducibility (what is guaranteed):

* same (weights, prompts, params, n, seeds, max_batch_size, device, dtype) -> bitwise identical outputs;
* the random draw behind token t of sample j of a prompt with seed s is a pure function of (s, j, t); it does not
  depend on n, on the other prompts, on the prompt's position in the call, on the sub-batch split or on which rows
  already finished. So a sample is the same whichever engine or call serves it *up to floating-point differences
  of the forward pass*: a different padding length or batch size can change logits in the last bits, which flips
  a token only when its uniform lands within that rounding of a CDF boundary (the tests see identical outputs on
  tiny models, but that is not a bitwise guarantee). ``seed=S`` without ``seeds`` gives prompt i the seed
  ``prompt_seeds(S, P)[i]``.

Log-probs: ``log softmax(logits / T)`` at the sampled token, before top-p / top-k truncation (see
:mod:`nsr_megatron.rollout.engine`), computed in float32 whatever the model dtype.

Shape legend: P = prompts in the call, R = rows in a sub-batch, U = distinct prompts in it, L = its longest
prompt, A = rows still generating, K = tokens in the KV cache, V = vocabulary, T = max_new_tokens.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from nsr_megatron.losses.rng import uniform_from_keys
from nsr_megatron.models.families import find_family
from nsr_megatron.platform import outside_cpu_compat
from nsr_megatron.rollout.engine import Generation, Resync, SamplingParams, prompt_seeds, row_key

if TYPE_CHECKING:
    from nsr_megatron.rollout.weight_sync import SharedLayout

__all__ = ["EmbeddedEngine", "sample_tokens"]

logger = logging.getLogger(__name__)

_MAX_N = 1 << 31
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

def sample_tokens(logits_av: Tensor, uniforms_a: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor]:
    """Draw one token per row by inverse-CDF sampling and return (tokens [A], logprobs [A]).

    ``p = softmax(logits / T)``; top-k keeps the k largest probabilities, top-p the smallest prefix of the sorted
    probabilities whose mass reaches ``top_p`` (the token that crosses it is kept); the kept probabilities are
    renormalised and the token is the first index whose cumulative mass (float64) exceeds ``u * total``, with
    ``u`` in [0, 1). Ties sort by token id (stable sort), so ``top_k=1`` is ``argmax``. The returned log-prob is
    ``log_softmax(logits / T)`` at the token: temperature-scaled, before truncation.
    """
    logp_av = torch.log_softmax(logits_av.float() / params.temperature, dim=-1)  # A, V
    if params.top_k == 0 and params.top_p >= 1.0:
        order_av = None
        probs_av = logp_av.double().exp()
    else:
        sorted_logp_av, order_av = torch.sort(logp_av, dim=-1, descending=True, stable=True)
        probs_av = sorted_logp_av.double().exp()
        keep_av = torch.ones_like(probs_av, dtype=torch.bool)
        if params.top_k > 0:
            keep_av[:, params.top_k :] = False
        if params.top_p < 1.0:
            mass_before_av = probs_av.cumsum(dim=-1) - probs_av
            keep_av &= mass_before_av < params.top_p
        probs_av = probs_av * keep_av
    cdf_av = probs_av.cumsum(dim=-1)
    target_a1 = uniforms_a.to(cdf_av.dtype)[:, None] * cdf_av[:, -1:]
    idx_a = torch.searchsorted(cdf_av, target_a1, right=True).squeeze(1).clamp_(max=logp_av.shape[-1] - 1)
    # u * total can round up to total (u is at most 1 - 2**-53); never return a zero-probability token then.
    zero_a = probs_av.gather(1, idx_a[:, None]).squeeze(1) == 0
    if bool(zero_a.any()):
        idx_a = torch.where(zero_a, probs_av.argmax(dim=-1), idx_a)
    tokens_a = idx_a if order_av is None else order_av.gather(1, idx_a[:, None]).squeeze(1)
    return tokens_a, logp_av.gather(1, tokens_a[:, None]).squeeze(1)


class EmbeddedEngine:
    """In-process rollout engine over a Hugging Face causal LM, the class its model family names (any family of
    :mod:`nsr_megatron.models.families`; ``AutoModelForCausalLM`` for others).

    Args:
        hf_path: a Hugging Face model directory. With weights (``model.safetensors`` etc.) it is loaded with
            ``from_pretrained``; with only ``config.json`` the model is built with ``from_config`` and random
            weights (seeded by ``init_seed``), to be filled by :meth:`update_weights`.
        dtype: parameter dtype (log-probs and sampling are float32 / float64 regardless).
        device: where the model runs.
        max_batch_size: rows (prompt x sample) per forward; larger calls are split into sub-batches.
        attn_implementation: passed to transformers (``None``: its default, ``sdpa``).
        init_seed: seed of the random init when there are no weights.
        kv_cache: ``static`` (preallocated slabs, the default; models with a sliding window and transformers
            without the layered cache API use ``dynamic``) or ``dynamic`` (transformers' ``DynamicCache``).
    """

    def __init__(
        self,
        hf_path: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_batch_size: int = 256,
        attn_implementation: str | None = None,
        init_seed: int = 0,
        kv_cache: str = "static",
    ) -> None:
        from transformers import AutoConfig

        path = Path(hf_path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"EmbeddedEngine(hf_path={str(hf_path)!r}): no config.json there; pass a Hugging Face model "
                "directory (save_pretrained output or a hub snapshot)."
            )
        kwargs: dict[str, Any] = {"dtype": dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        config = AutoConfig.from_pretrained(str(path))
        if any((path / name).is_file() for name in _WEIGHT_FILES):
            model: torch.nn.Module = _causal_lm_class(config.model_type).from_pretrained(str(path), **kwargs)
        else:
            logger.warning("%s has no weight files: building the model from config.json with random weights", path)
            model = _model_from_config(config, init_seed=init_seed, **kwargs)
        self._setup(model, device=device, max_batch_size=max_batch_size, name=str(path), kv_cache=kv_cache)

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | Any,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_batch_size: int = 256,
        attn_implementation: str | None = None,
        init_seed: int = 0,
        kv_cache: str = "static",
    ) -> EmbeddedEngine:
        """An engine over a randomly initialised model built from an HF config (a ``config.json`` dict with a
        ``model_type`` key, or a ``PretrainedConfig``); the init is seeded by ``init_seed``."""
        from transformers import AutoConfig

        if isinstance(config, Mapping):
            values = dict(config)
            model_type = values.pop("model_type", None)
            if not model_type:
                raise ValueError(
                    "EmbeddedEngine.from_config: the config dict has no 'model_type' (e.g. 'qwen3_moe'); "
                    "add it or pass a transformers PretrainedConfig."
                )
            config = AutoConfig.for_model(model_type, **values)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = _model_from_config(config, init_seed=init_seed, **kwargs)
        engine = cls.__new__(cls)
        engine._setup(model, device=device, max_batch_size=max_batch_size, name=f"<random {config.model_type}>",
                      kv_cache=kv_cache)
        return engine

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, *, device: str | torch.device | None = None, max_batch_size: int = 256,
        kv_cache: str = "static",
    ) -> EmbeddedEngine:
        """An engine over an already built HF causal LM (used as is: not copied)."""
        engine = cls.__new__(cls)
        dev = device if device is not None else next(model.parameters()).device
        engine._setup(model, device=dev, max_batch_size=max_batch_size, name=type(model).__name__, kv_cache=kv_cache)
        return engine

    def _setup(self, model: Any, *, device: str | torch.device, max_batch_size: int, name: str,
               kv_cache: str = "static") -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"EmbeddedEngine(max_batch_size={max_batch_size!r}) must be an int >= 1.")
        if kv_cache not in ("static", "dynamic"):
            raise ValueError(f"EmbeddedEngine(kv_cache={kv_cache!r}) must be 'static' or 'dynamic'.")
        # The slabs need transformers' layered cache API and full attention in every layer.
        self.kv_cache = kv_cache if _SlabCache.supports(model.config) else "dynamic"
        # a transformers PreTrainedModel, typed loosely: its methods (get_output_embeddings, ...) are dynamic
        self.model: Any = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.name = name
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.weight_version = "0"
        self._targets = _weight_targets(self.model)
        self._shared: tuple[Any, Tensor] | None = None  # (layout, mapping) once the weights live in shared memory
        self._released: Any = None  # a HostOffload holding the weights while they are released (release_memory)
        family = find_family(getattr(model.config, "model_type", ""))
        router = family.hf_router_suffix if family is not None else ""
        self._gates = [m for name, m in self.model.named_modules() if router and name.endswith(router)]  # MoE routers
        fused = family is not None and family.hf_fused_experts  # else the fused names are the checkpoint's own
        self._fused_names = {n for n, (t, _) in self._targets.items() if fused and t.dim() == 3 and n.endswith(
            ("experts.gate_up_proj", "experts.down_proj"))}
        # transformers >= 5.24 names the KV-cache argument ``cache`` (``past_key_values`` is deprecated there).
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_args else "past_key_values"

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        n: int = 1,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        return_routed_experts: bool = False,
    ) -> list[list[Generation]]:
        """Sample ``n`` continuations of every prompt; ``result[i][j]`` is sample ``j`` of prompt ``i``.

        ``seeds[i]`` keys prompt i's draws; without ``seeds``, they come from ``seed`` (``prompt_seeds``). With
        ``return_routed_experts`` (MoE models) each generation carries the experts its tokens were routed to."""
        self._check_request(prompts, params, n, seed)
        if self._released is not None:
            raise RuntimeError("EmbeddedEngine.generate: the weights are released (release_memory); call "
                               "resume_memory(['weights']) first.")
        keyed = list(seeds) if seeds is not None else prompt_seeds(seed, len(prompts))
        if len(keyed) != len(prompts) or not all(isinstance(s, int) and not isinstance(s, bool) for s in keyed):
            raise ValueError(f"generate(seeds=...) must hold one int per prompt ({len(prompts)}), got {seeds!r:.80}.")
        rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
        # Sorting rows by prompt length shortens the padding of each sub-batch; stable, so the n rows of one
        # prompt stay together and prefill once. Draws are keyed by (i, j), so the order changes no sample.
        rows.sort(key=lambda row: len(prompts[row[0]]))
        results: list[list[Generation | None]] = [[None] * n for _ in prompts]
        with torch.inference_mode(), outside_cpu_compat():  # the HF model needs no CUDA-to-CPU mapping
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start : start + self.max_batch_size]
                for (i, j), gen in zip(chunk, self._generate_rows(prompts, chunk, params, keyed,
                                                                  return_routed_experts), strict=True):
                    results[i][j] = gen
        return [[g for g in per_prompt if g is not None] for per_prompt in results]

    def _generate_rows(
        self, prompts: list[list[int]], rows: list[tuple[int, int]], params: SamplingParams, seeds: list[int],
        routed: bool = False,
    ) -> list[Generation]:
        from transformers import DynamicCache

        dev = self.device
        uniq = list(dict.fromkeys(i for i, _ in rows))  # U prompt indices, first-seen order
        slot = {i: k for k, i in enumerate(uniq)}
        lengths = [len(prompts[i]) for i in uniq]
        longest = max(lengths)
        ids_ul = torch.zeros(len(uniq), longest, dtype=torch.long)
        mask_ul = torch.zeros(len(uniq), longest, dtype=torch.long)
        for k, i in enumerate(uniq):  # left padding: every prompt ends at column L - 1
            ids_ul[k, longest - lengths[k] :] = torch.tensor(prompts[i], dtype=torch.long)
            mask_ul[k, longest - lengths[k] :] = 1
        ids_ul, mask_ul = ids_ul.to(dev), mask_ul.to(dev)
        pos_ul = (mask_ul.cumsum(dim=-1) - 1).clamp_(min=0)

        static = self.kv_cache == "static"
        cache: Any = (_SlabCache.build(self.model.config, capacity=longest + params.max_new_tokens) if static
                      else DynamicCache(config=self.model.config))
        cache_kw = {self._cache_kwarg: cache}
        seen: list[Tensor] = []  # each MoE gate's choices in the last forward, in layer order
        hooks = [gate.register_forward_hook(lambda m, a, o: seen.append(self._choices(o))) for gate in self._gates
                 ] if routed else []
        out = self.model(
            input_ids=ids_ul, attention_mask=mask_ul, position_ids=pos_ul, use_cache=True, logits_to_keep=1, **cache_kw
        )
        src_r = torch.tensor([slot[i] for i, _ in rows], dtype=torch.long, device=dev)  # R: row -> its prompt
        # Routed experts [R, L_pad + T, layers, k]: the (left-padded) prompt's tokens from the prefill, then each
        # response token fed back; row r's tokens are one contiguous slice of it.
        if routed:
            prompt_experts = self._routed(seen, len(uniq), longest)  # [U, L_pad, layers, k]
            experts_r = torch.full((len(rows), longest + params.max_new_tokens, *prompt_experts.shape[2:]), -1,
                                   dtype=prompt_experts.dtype)
            experts_r[:, :longest] = prompt_experts[src_r.cpu()]
        if len(uniq) != len(rows):
            cache.batch_select_indices(src_r)  # K/V of each prompt repeated for its samples
        logits_av = out.logits[src_r, -1]  # A = R, V
        mask_ak = mask_ul[src_r]
        if static:  # [R, L_pad + T]: the prompt's mask, then ones; row a of the batch attends to mask_rk[a, :K]
            mask_rk = torch.cat([mask_ak, mask_ak.new_ones(len(rows), params.max_new_tokens)], dim=1)
        prompt_len_r = torch.tensor([len(prompts[i]) for i, _ in rows], dtype=torch.long, device=dev)
        key_r = torch.tensor([row_key(seeds[i], j) for i, j in rows], dtype=torch.long, device=dev)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=dev)

        num_rows, max_new = len(rows), params.max_new_tokens
        tokens_rt = torch.zeros(num_rows, max_new, dtype=torch.long, device=dev)
        logps_rt = torch.zeros(num_rows, max_new, dtype=torch.float32, device=dev)
        length_r = torch.zeros(num_rows, dtype=torch.long, device=dev)
        stopped_r = torch.zeros(num_rows, dtype=torch.bool, device=dev)
        active_a = torch.arange(num_rows, device=dev)
        for t in range(max_new):
            u_a = uniform_from_keys(key_r[active_a], t)  # A, float64 in [0, 1)
            tok_a, logp_a = sample_tokens(logits_av, u_a, params)
            tokens_rt[active_a, t] = tok_a
            logps_rt[active_a, t] = logp_a
            length_r[active_a] = t + 1
            if stop_ids.numel():
                hit_a = torch.isin(tok_a, stop_ids)
                if bool(hit_a.any()):
                    stopped_r[active_a[hit_a]] = True
                    keep_a = (~hit_a).nonzero().squeeze(1)
                    if keep_a.numel() == 0:
                        break
                    if static:  # the last rows still generating move into the finished rows' places
                        holes, movers = _fill_holes(hit_a)
                        cache.move_rows(holes, movers, len(keep_a))
                        mask_rk[holes] = mask_rk[movers]
                        active_a[holes], tok_a[holes] = active_a[movers], tok_a[movers]
                        active_a, tok_a = active_a[: len(keep_a)], tok_a[: len(keep_a)]
                    else:
                        cache.batch_select_indices(keep_a)  # finished rows leave the batch and the cache
                        mask_ak, active_a, tok_a = mask_ak[keep_a], active_a[keep_a], tok_a[keep_a]
            if t == max_new - 1:
                break
            if static:
                mask_ak = mask_rk[: len(active_a), : longest + t + 1]
            else:
                mask_ak = torch.cat([mask_ak, mask_ak.new_ones(len(active_a), 1)], dim=1)
            pos_a1 = (prompt_len_r[active_a] + t)[:, None]  # response token t sits at position len(prompt) + t
            out = self.model(
                input_ids=tok_a[:, None], attention_mask=mask_ak, position_ids=pos_a1, use_cache=True, **cache_kw
            )
            logits_av = out.logits[:, -1]
            if routed:
                experts_r[active_a.cpu(), longest + t] = self._routed(seen, len(active_a), 1)[:, 0]  # [A, layers, k]
        for hook in hooks:
            hook.remove()

        tokens, logps = tokens_rt.cpu().tolist(), logps_rt.cpu().tolist()
        lens, stopped = length_r.cpu().tolist(), stopped_r.cpu().tolist()
        return [
            Generation(
                prompt_ids=list(prompts[i]),
                response_ids=tokens[r][: lens[r]],
                response_logprobs=logps[r][: lens[r]],
                finish_reason="stop" if stopped[r] else "length",
                routed_experts=experts_r[r, longest - len(prompts[i]) : longest + lens[r] - 1] if routed else None,
            )
            for r, (i, _) in enumerate(rows)
        ]

    def _choices(self, out: Any) -> Tensor:
        """A gate's chosen experts [tokens, k]: transformers 5 routers return (logits, scores, indices); a plain
        linear gate (transformers 4) returns logits, whose top-k are the choice."""
        if isinstance(out, tuple):
            return out[2].detach()
        return out.detach().topk(int(self.model.config.num_experts_per_tok), dim=-1).indices

    def _routed(self, seen: list[Tensor], rows: int, length: int) -> Tensor:
        """The last forward's choices (``seen``, one [rows * length, k] per MoE layer, row-major) as
        [rows, length, layers, k] int16; ``seen`` is emptied for the next forward."""
        if not seen:
            raise ValueError("return_routed_experts needs an MoE model: this one has no expert gates.")
        stacked = torch.stack([c.view(rows, length, -1) for c in seen], dim=2).to(torch.int16).cpu()
        seen.clear()
        return stacked

    def _check_request(self, prompts: Any, params: Any, n: Any, seed: Any) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"generate(params={params!r}) must be a SamplingParams.")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < _MAX_N:
            raise ValueError(f"generate(n={n!r}) must be an int in [1, 2**31): the number of samples per prompt.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"generate(seed={seed!r}) must be an int.")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("generate(prompts=...) must be a non-empty list of token-id lists.")
        vocab = self.vocab_size
        for i, p in enumerate(prompts):
            if not isinstance(p, (list, tuple)) or not p:
                raise ValueError(f"generate: prompts[{i}] must be a non-empty list of token ids, got {p!r:.80}.")
            if all(type(tok) is int for tok in p) and 0 <= min(p) and max(p) < vocab:  # fast path
                continue
            tok = next(t for t in p if type(t) is not int or not 0 <= t < vocab)
            raise ValueError(
                f"generate: prompts[{i}] holds token id {tok!r}, outside [0, {vocab}) (the model's vocabulary) or "
                "not a Python int; check the tokenizer matches the model."
            )
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"SamplingParams.stop_token_ids={bad} are outside the model's vocabulary [0, {vocab}).")

    # ------------------------------------------------------------------ weights

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor],
                       version: str = "", *, engines: Sequence[int] | None = None) -> int:
        """Copy Hugging Face-named tensors into the model's weights (parameters and the buffers a checkpoint
        carries, such as a router's expert bias) in place; return how many were loaded.

        ``named_tensors``: (name, tensor) pairs, streamed (a generator of buckets is fine), or a name -> tensor dict.
        ``engines`` is ignored: the engine is one replica. It keeps no cache between calls, so nothing goes stale.

        Accepts the model's own parameter names and, for families whose transformers class fuses the experts
        (:attr:`~nsr_megatron.models.families.ModelFamily.hf_fused_experts`), the checkpoint's per-expert names
        (``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``), which are copied into their slice of the
        fused ``experts.gate_up_proj`` / ``experts.down_proj``. With tied embeddings ``lm_head.weight`` and
        ``model.embed_tokens.weight`` are one tensor, so either name updates both. Dtype and device are converted;
        storage is never re-allocated (no ``load_state_dict``, no new Parameters).

        Raises ``ValueError`` on an unknown name or a shape mismatch, naming the tensor and both shapes. Tensors
        are copied as they stream in, so on error the ones before it are already loaded.
        """
        count = 0
        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        with torch.no_grad():
            for name, tensor in items:
                target = self._targets.get(name)
                if target is None:
                    raise ValueError(
                        f"update_weights: unknown tensor {name!r} for {type(self.model).__name__}; expected Hugging "
                        f"Face names such as {next(iter(self._targets))!r} (check the Megatron -> HF name mapping)."
                    )
                param, index = target
                dest = param[index] if index else param
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise ValueError(
                        f"update_weights: tensor {name!r} has shape {tuple(tensor.shape)} but the model expects "
                        f"{tuple(dest.shape)}; check the TP/EP gather and the model config."
                    )
                dest.copy_(tensor)
                count += 1
        self.weight_version = version or str(int(self.weight_version) + 1)
        return count

    def check_weights(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise ``ValueError`` unless every name is one :meth:`update_weights` accepts, with the right shape
        (copies nothing: a caller checks a whole checkpoint before loading any of it)."""
        for name, shape in shapes.items():
            target = self._targets.get(name)
            if target is None:
                raise ValueError(f"unknown tensor {name!r} for {type(self.model).__name__}")
            param, index = target
            want = tuple((param[index] if index else param).shape)
            if tuple(shape) != want:
                raise ValueError(f"tensor {name!r} has shape {tuple(shape)} but the model expects {want}")

    def named_weights(self) -> Iterable[tuple[str, Tensor]]:
        """``(name, tensor)`` of every weight under the names a checkpoint uses: per-expert names where the
        model fuses experts (``experts.E.gate_proj.weight`` ...), the parameter names elsewhere."""
        for name, (param, index) in self._targets.items():
            if name not in self._fused_names:
                yield name, param[index] if index else param

    def share_weights(self) -> Any:
        """Move the model's weights (parameters and saved buffers) into a shared-memory file that trainer ranks on this host write new weights
        into (``rollout.weight_sync=shared_memory``); returns its
        :class:`~nsr_megatron.rollout.weight_sync.SharedLayout` (checkpoint names, as :meth:`named_weights`). Done
        once; later calls return the same layout. CPU engines only."""
        from nsr_megatron.rollout.weight_sync import share_parameters

        if self._shared is None:
            self._shared = share_parameters([t for t, _ in self._targets.values()], self.named_weights())
        return self._shared[0]

    @property
    def shares_weights(self) -> bool:
        """Whether :meth:`share_weights` moved the weights into shared memory."""
        return self._shared is not None

    # ------------------------------------------------------------------ health and transports (the protocol)

    @property
    def restarts(self) -> int:
        """Always 0: the engine lives in the trainer's process, which nothing restarts."""
        return 0

    def ensure_healthy(self, resync: Resync) -> None:
        """No-op: the engine lives in the trainer's process (if it died, so did the trainer), and every weight
        update is a copy in that process that either lands or raises, so no replica is ever stale."""

    def open_shared_update(self) -> list[SharedLayout]:
        """Not for this engine: its weights are copied in the driver's process by :meth:`update_weights`; the
        shared-memory session is the project's server's (preflight refuses ``rollout.weight_sync=shared_memory``
        here). Raises ``ValueError``."""
        raise ValueError("rollout.weight_sync=shared_memory writes into the memory of the project's rollout server "
                         "processes; the embedded engine takes its weights in the driver's process: set "
                         "rollout.weight_sync=distributed (or rollout.backend=server).")

    def close_shared_update(self, version: str, *, written: bool = True) -> None:
        """Not for this engine (see :meth:`open_shared_update`): raises ``ValueError``."""
        self.open_shared_update()

    def set_weight_sync(self, mode: str) -> None:
        """No-op: one transport, a copy in this process (:meth:`update_weights`), whatever ``mode``."""

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Free the model's weights on its device (their values move to host memory) while the trainer trains on
        the same device (``rollout.offload_train``); the KV cache lives only inside ``generate``. Not with shared-
        memory weights (``share_weights``), whose memory other processes map."""
        from nsr_megatron.host_offload import HostOffload

        if self._shared is not None or self._released is not None or (tags is not None and "weights" not in tags):
            return
        for p in self.model.parameters():  # weights still mapped from their safetensors file get memory of their own
            if not p.untyped_storage().resizable():
                p.data = p.data.clone()
        self._released = HostOffload(self.device)
        self._released.offload(self.model.parameters())

    def resume_memory(self, tags: list[str]) -> None:
        """Give the weights their memory and values back (tag ``weights``; ``kv_cache`` has nothing to resume)."""
        if "weights" in tags and self._released is not None:
            self._released.onload()
            self._released = None

    def close(self) -> None:
        """No-op: the engine lives in this process."""


def _causal_lm_class(model_type: str) -> Any:
    """The transformers class that runs ``model_type``: its family's (:mod:`nsr_megatron.models.families`), else
    ``AutoModelForCausalLM`` (a model of no family runs as transformers builds it, without per-expert names or
    routed experts)."""
    import transformers

    family = find_family(model_type)
    return getattr(transformers, family.hf_class) if family is not None else transformers.AutoModelForCausalLM


def _model_from_config(config: Any, *, init_seed: int, **kwargs: Any) -> torch.nn.Module:
    """A random model of ``config`` (the class :func:`_causal_lm_class` names) with a seeded init that leaves the
    global RNG untouched."""
    import transformers

    family = find_family(config.model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if family is None:
            return transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        return getattr(transformers, family.hf_class)._from_config(config, **kwargs)  # as the auto class does


def _weight_targets(model: torch.nn.Module) -> dict[str, tuple[Tensor, tuple[Any, ...]]]:
    """HF name -> (parameter, index into it) for every name :meth:`EmbeddedEngine.update_weights` accepts."""
    targets: dict[str, tuple[Tensor, tuple[Any, ...]]] = {
        name: (param, ()) for name, param in model.named_parameters(remove_duplicate=False)
    }
    # buffers a checkpoint carries (a router's expert bias), not those derived from the config (rotary inv_freq)
    saved = set(model.state_dict())
    targets.update({name: (buf, ()) for name, buf in model.named_buffers(remove_duplicate=False) if name in saved})
    family = find_family(getattr(getattr(model, "config", None), "model_type", ""))
    if family is None or not family.hf_fused_experts:
        return targets
    for name, (tensor, _) in list(targets.items()):
        if name.endswith("experts.gate_up_proj") and tensor.dim() == 3:
            prefix, half = name[: -len("gate_up_proj")], tensor.shape[1] // 2
            for e in range(tensor.shape[0]):  # gate_up_proj: [E, 2I, H]
                targets[f"{prefix}{e}.gate_proj.weight"] = (tensor, (e, slice(0, half)))
                targets[f"{prefix}{e}.up_proj.weight"] = (tensor, (e, slice(half, 2 * half)))
        elif name.endswith("experts.down_proj") and tensor.dim() == 3:
            prefix = name[: -len("down_proj")]
            for e in range(tensor.shape[0]):  # down_proj: [E, H, I]
                targets[f"{prefix}{e}.down_proj.weight"] = (tensor, (e,))
    return targets


def _fill_holes(hit_a: Tensor) -> tuple[Tensor, Tensor]:
    """For a batch whose rows ``hit_a`` [A] (bool) finished: (holes, movers), the finished rows among the first
    ``A_new`` (those that stay) and the unfinished rows after them, which move into the holes; then the rows still
    generating are exactly the first ``A_new``."""
    num_left = int((~hit_a).sum())
    holes = hit_a[:num_left].nonzero().squeeze(1)
    movers = (~hit_a[num_left:]).nonzero().squeeze(1) + num_left
    return holes, movers


class _SlabCache:
    """The KV cache of :class:`EmbeddedEngine`'s ``static`` mode: a transformers ``Cache`` whose layers keep K and V
    in preallocated [rows, kv_heads, capacity, head_dim] slabs (see :func:`_slab_classes`)."""

    @staticmethod
    def supports(config: Any) -> bool:
        """Full attention in every layer (no sliding window) and transformers' layered cache API."""
        try:
            from transformers.cache_utils import Cache, DynamicLayer  # noqa: F401
        except ImportError:
            return False
        types = getattr(config, "layer_types", None) or []
        return getattr(config, "sliding_window", None) is None and all(t == "full_attention" for t in types)

    @staticmethod
    def build(config: Any, *, capacity: int) -> Any:
        cache_class, layer_class = _slab_classes()
        return cache_class(layers=[layer_class(capacity) for _ in range(int(config.num_hidden_layers))])


@lru_cache(maxsize=1)
def _slab_classes() -> tuple[type, type]:
    """(cache, layer) classes over transformers' ``Cache`` and ``DynamicLayer`` (imported when first needed).

    The layer keeps K and V in slabs of ``capacity`` positions, allocated at its first update: ``update`` writes
    the new positions in place and returns views of the filled part, and the batch is always the slab's first
    ``rows`` rows. ``batch_select_indices`` (prefill rows -> sample rows) gathers once; ``move_rows`` copies only
    the rows that move."""
    from transformers.cache_utils import Cache, DynamicLayer

    class SlabLayer(DynamicLayer):  # type: ignore[misc]
        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity, self.length, self.rows = capacity, 0, 0
            self.k_slab = self.v_slab = torch.empty(0)

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            self.device = key_states.device
            rows, heads, _, dim = key_states.shape
            self.k_slab = key_states.new_zeros(rows, heads, self.capacity, dim)
            self.v_slab = value_states.new_zeros(rows, heads, self.capacity, value_states.shape[-1])
            self.rows, self.is_initialized = rows, True

        def _views(self) -> tuple[Tensor, Tensor]:
            keys = self.k_slab[: self.rows, :, : self.length]
            values = self.v_slab[: self.rows, :, : self.length]
            self.keys, self.values = keys, values
            return keys, values

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity or key_states.shape[0] != self.rows:
                raise RuntimeError(f"KV slab: {key_states.shape[0]} rows x {end} positions do not fit the slab's "
                                   f"{self.rows} rows x {self.capacity} positions")
            self.k_slab[: self.rows, :, self.length : end] = key_states
            self.v_slab[: self.rows, :, self.length : end] = value_states
            self.length = end
            return self._views()

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: Tensor) -> None:
            if self.is_initialized:
                self.k_slab, self.v_slab = self.k_slab[indices], self.v_slab[indices]
                self.rows = int(indices.numel())
                self._views()

        def move_rows(self, holes: Tensor, movers: Tensor, rows: int) -> None:
            if holes.numel():
                self.k_slab[holes, :, : self.length] = self.k_slab[movers, :, : self.length]
                self.v_slab[holes, :, : self.length] = self.v_slab[movers, :, : self.length]
            self.rows = rows
            self._views()

    class SlabCache(Cache):  # type: ignore[misc]
        def move_rows(self, holes: Tensor, movers: Tensor, rows: int) -> None:
            """Rows ``movers`` take the places ``holes``; the batch becomes the first ``rows`` rows."""
            for layer in self.layers:
                layer.move_rows(holes, movers, rows)  # type: ignore[union-attr]

    return SlabCache, SlabLayer
