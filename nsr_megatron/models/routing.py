"""The routing profiler's capture: hooks on a megatron model's MoE routers (megatron-core 0.16 ``TopKRouter``).

:class:`RoutingProfiler` is created only when ``profile.routing`` is not ``off``; then, per router, it wraps the
instance's ``gating`` (to see the logits) and adds a forward hook (to see the ``routing_map`` [N, E] it returns).
With ``off`` nothing is installed, so the cost is exactly zero.

The trainer tells it which micro-batch and which pass a forward belongs to (:meth:`RoutingProfiler.micro_batch`):
``old`` (the forward that produces the old log-probs) or ``train`` (the training forward). Per router it then
accumulates, over the micro-batch's real tokens (padding left out), the sums of
:class:`~nsr_megatron.telemetry.routing.RoutingSums`: expert load, router entropy and top-k margin, and the share of
tokens whose top-k set changed between the ``old`` and ``train`` passes of the same micro-batch (and, when the
micro-batch carries the rollout engine's routing, between rollout and training). In ``full`` mode it also keeps
the training pass's top-k per token until the loss's per-token masks (band, clipped, rescued) are known
(:meth:`attribute`), and counts them per expert.

Token order: a router sees its rank's tokens sequence-major (``n = s * B + b``); under sequence parallelism a
tensor-parallel rank holds the contiguous slice ``s in [r * S / tp, (r + 1) * S / tp)``. Every rank counts its own
tokens of its own layers, so :meth:`step_sums` sums over the whole world (a few hundred numbers).

Shape legend: B rows of a micro-batch, S sequence, T = S - 1 loss positions, N = S_local * B router tokens,
E experts, k experts per token, L MoE layers of the model (all stages).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from nsr_megatron.telemetry.routing import RoutingSums, expert_load, router_entropy_and_margin, topk_changed

__all__ = ["RoutingProfiler"]


class RoutingProfiler:
    """Capture of the routing of ``model`` (see the module docstring). ``moe_layers`` lists the global (0-based)
    indices of the model's MoE layers; ``full`` keeps per-token top-k for the per-expert band/clip/rescue counts."""

    def __init__(self, model: torch.nn.Module, moe_layers: list[int], num_experts: int, topk: int, *,
                 full: bool, sequence_parallel: bool) -> None:
        self.layers = {layer: i for i, layer in enumerate(moe_layers)}  # global layer -> row of the sums
        self.experts, self.topk, self.full = num_experts, topk, full
        self.sequence_parallel = sequence_parallel
        self.sums = RoutingSums.zeros(len(moe_layers), num_experts)
        self._current: tuple[Any, str, torch.Tensor | None, torch.Tensor | None] | None = None
        self._old: dict[tuple[Any, int], torch.Tensor] = {}  # (micro-batch, row) -> top-k [N, k] of the old pass
        self._train: dict[tuple[Any, int], tuple[torch.Tensor, torch.Tensor]] = {}  # -> (top-k, valid [N])
        self._handles: list[Any] = []
        self._install(model)

    # -------------------------------------------------------------------------------------------- hooks
    def _install(self, model: torch.nn.Module) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        self._routers = routers
        if not routers:
            raise ValueError("profile.routing is on but the model has no MoE router (a dense model): set "
                             "profile.routing=off.")
        for router in routers:
            row = self.layers[int(router.layer_number) - 1]
            gating = router.gating

            def capture_logits(x: torch.Tensor, _gating: Any = gating, _router: Any = router) -> torch.Tensor:
                logits = _gating(x)
                _router._nsr_logits = logits.detach()
                return logits

            router.gating = capture_logits  # an instance attribute: only this router, only while profiling
            self._handles.append(router.register_forward_hook(
                lambda module, args, out, _row=row: self._on_route(_row, module, out)))

    def remove(self) -> None:
        """Take every hook and wrapper off again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for router in self._routers:
            router.__dict__.pop("gating", None)  # back to the class's method
            router.__dict__.pop("_nsr_logits", None)

    @contextmanager
    def micro_batch(self, key: Any, phase: str, batch: dict[str, torch.Tensor]) -> Iterator[None]:
        """Attribute the routers' forwards inside the block to micro-batch ``key`` in pass ``phase`` (``old`` or
        ``train``). ``batch["valid"]`` [B, S] marks real tokens; ``batch["rollout_topk"]`` [B, S, L, k]
        (optional) holds the rollout engine's choices."""
        self._current = (key, phase, batch.get("valid"), batch.get("rollout_topk"))
        try:
            yield
        finally:
            self._current = None

    def _router_order(self, per_token: torch.Tensor, tokens: int) -> torch.Tensor:
        """A [B, S, ...] tensor in the router's token order of this rank: [N, ...]."""
        B, S = per_token.shape[:2]
        s0, s1 = 0, S
        if self.sequence_parallel:
            from megatron.core import parallel_state as mpu

            local = S // mpu.get_tensor_model_parallel_world_size()
            s0 = mpu.get_tensor_model_parallel_rank() * local
            s1 = s0 + local
        out = per_token[:, s0:s1].transpose(0, 1).reshape((s1 - s0) * B, *per_token.shape[2:])
        if out.shape[0] != tokens:
            raise RuntimeError(f"routing profiler: {tokens} router tokens but the micro-batch gives {out.shape[0]}.")
        return out

    @torch.no_grad()
    def _on_route(self, row: int, router: Any, out: Any) -> None:
        if self._current is None:
            return  # a forward outside the trainer's passes (e.g. a reference model sharing nothing): ignored
        key, phase, valid_bs, rollout = self._current
        routing_map = out[1]  # [N, E] bool
        n = routing_map.shape[0]
        topk = routing_map.float().topk(self.topk, dim=-1).indices.cpu()  # [N, k]
        valid = (self._router_order(valid_bs, n) if valid_bs is not None
                 else torch.ones(n, dtype=torch.bool)).cpu()  # [N]
        if phase == "old":
            self._old[(key, row)] = topk
            return
        s = self.sums
        chosen = topk[valid]
        s.load[row] += expert_load(chosen, self.experts)
        s.tokens[row] += float(valid.sum())
        logits = getattr(router, "_nsr_logits", None)
        if logits is not None:
            entropy, margin = router_entropy_and_margin(logits.reshape(n, -1).float().cpu(), self.topk)
            s.entropy_sum[row] += entropy[valid].sum()
            s.margin_sum[row] += margin[valid].sum()
        old = self._old.pop((key, row), None)
        if old is not None:
            s.drift_old[row] += torch.tensor([float(topk_changed(old[valid], chosen).sum()), float(valid.sum())],
                                             dtype=torch.float64)
        if rollout is not None:
            theirs = self._router_order(rollout[:, :, row], n).cpu()  # [N, k]; -1 where the engine routed nothing
            known = valid & (theirs >= 0).all(dim=-1)
            s.drift_rollout[row] += torch.tensor(
                [float(topk_changed(theirs[known], topk[known]).sum()), float(known.sum())], dtype=torch.float64)
        if self.full:
            self._train[(key, row)] = (topk, valid)

    # -------------------------------------------------------------------------------------------- the loss's view
    def attribute(self, masks: dict[Any, dict[str, torch.Tensor]], shapes: dict[Any, tuple[int, int]]) -> None:
        """Count, per layer and expert, the training tokens the loss marked ``band`` / ``clipped`` / ``rescued``
        (``masks[key][name]`` [B, T] bool for each micro-batch; ``shapes[key]`` its (B, S))."""
        for (key, row), (topk, valid) in self._train.items():
            if key not in masks:
                continue
            B, S = shapes[key]
            for name, counts in (("band", self.sums.band), ("clipped", self.sums.clipped),
                                 ("rescued", self.sums.rescued)):
                m = torch.zeros(B, S, dtype=torch.bool)
                m[:, : S - 1] = masks[key][name].bool().cpu()  # loss position t belongs to input token t
                chosen = topk[self._router_order(m, topk.shape[0]) & valid]
                counts[row] += expert_load(chosen, self.experts)
        self._train.clear()

    def step_sums(self) -> RoutingSums:
        """The step's sums over every rank (a collective); the profiler starts the next step from zero."""
        flat = self.sums.flat()
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
            flat = flat.to(device) if device is not None else flat
            dist.all_reduce(flat)
        total = RoutingSums.zeros(*self.sums.load.shape)
        total.load_flat(flat.cpu())
        self.sums = RoutingSums.zeros(*self.sums.load.shape)
        self._old.clear()
        self._train.clear()
        return total
