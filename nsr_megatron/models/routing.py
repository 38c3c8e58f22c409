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

__all__ = ["RoutingProfiler", "RoutingReplay", "router_order"]


def router_order(per_token: torch.Tensor, tokens: int, sequence_parallel: bool) -> torch.Tensor:
    """A [B, S, ...] tensor in the router's token order on this rank, [N, ...]: sequence-major (``n = s * B + b``),
    this tensor-parallel rank's slice of the sequence under sequence parallelism."""
    B, S = per_token.shape[:2]
    s0, s1 = 0, S
    if sequence_parallel:
        from megatron.core import parallel_state as mpu

        local = S // mpu.get_tensor_model_parallel_world_size()
        s0 = mpu.get_tensor_model_parallel_rank() * local
        s1 = s0 + local
    out = per_token[:, s0:s1].transpose(0, 1).reshape((s1 - s0) * B, *per_token.shape[2:])
    if out.shape[0] != tokens:
        raise RuntimeError(f"routing: {tokens} router tokens but the micro-batch gives {out.shape[0]}.")
    return out


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
        return router_order(per_token, tokens, self.sequence_parallel)

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
            bias = getattr(router, "expert_bias", None)
            entropy, margin = router_entropy_and_margin(
                logits.reshape(n, -1).float().cpu(), self.topk,
                score_function=getattr(router.config, "moe_router_score_function", "softmax"),
                expert_bias=bias.detach().float().cpu() if isinstance(bias, torch.Tensor) else None)
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


class RoutingReplay:
    """Routing replay (``algorithm.routing_replay``) on megatron-core's ``RouterReplay`` (the model is built with
    ``moe_enable_routing_replay``): each router's top-k selection can be recorded or replaced.

    - ``R2``: the ``old`` pass records each router's top-k per micro-batch; the ``train`` pass of the same
      micro-batch replays it, so the training forward routes exactly as the forward that produced the old
      log-probs did (the router still gets gradients through the replayed experts' probabilities).
    - ``R3``: the ``train`` pass replays the rollout engine's choices (``batch["rollout_topk"]`` [B, S, L, k]).
      Megatron replays a whole [N, k] table; tokens the engine never ran (each sample's last token, padding) take
      the choice the ``old`` pass recorded (the experts 0..k-1 when there was no old pass). No loss position
      depends on them (causal attention: nothing after them is trained).

    Per-router instances are driven directly (megatron's static helpers address every router of the process,
    the reference model's included).
    """

    def __init__(self, model: torch.nn.Module, moe_layers: list[int], topk: int, *, mode: str,
                 sequence_parallel: bool) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.mode, self.topk, self.sequence_parallel = mode, topk, sequence_parallel
        rows = {layer: i for i, layer in enumerate(moe_layers)}
        self.routers = [(rows[int(r.layer_number) - 1], r) for r in model.modules()
                        if isinstance(r, TopKRouter) and r.router_replay is not None]
        if not self.routers:
            raise ValueError(f"algorithm.routing_replay={mode} needs an MoE model built with routing replay.")
        self._recorded: dict[Any, list[torch.Tensor]] = {}

    @contextmanager
    def micro_batch(self, key: Any, phase: str, batch: dict[str, torch.Tensor]) -> Iterator[None]:
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        if phase == "old":  # R2 replays this; R3 takes the tokens the engine never ran from it
            for _, r in self.routers:
                r.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
            try:
                yield
            finally:
                self._recorded[key] = [r.router_replay.get_recorded_indices() for _, r in self.routers]
                for _, r in self.routers:
                    r.router_replay.clear_router_replay_action()
            return
        targets = self._targets(key, batch) if phase == "train" else None
        if targets is None:
            yield
            return
        for (_, r), target in zip(self.routers, targets, strict=True):
            r.router_replay.set_target_indices(target)  # also queued for activation recompute in the backward
            r.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        try:
            yield
        finally:
            # A recomputed layer (model.recompute) routes again in the backward pass: it takes the queued tables
            # in micro-batch order, which is the backward order under every pipeline schedule.
            for _, r in self.routers:
                r.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)

    def _targets(self, key: Any, batch: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
        if self.mode == "R2":
            return self._recorded.pop(key, None)
        rollout = batch.get("rollout_topk")
        if rollout is None:
            raise RuntimeError("algorithm.routing_replay=R3 needs the rollout engine's routed experts, and this "
                               "micro-batch has none.")
        recorded = self._recorded.pop(key, None)
        out = []
        for i, (row, _) in enumerate(self.routers):
            per_token = rollout[:, :, row]  # [B, S, k]
            n = per_token.shape[0] * (per_token.shape[1] // self._tp())
            table = router_order(per_token, n, self.sequence_parallel).long().clone()  # [N, k], a copy: filled below
            unknown = (table < 0).any(dim=-1)
            if recorded is not None and recorded[i] is not None:
                table[unknown] = recorded[i].to(table.device)[unknown].long()
            else:
                table[unknown] = torch.arange(self.topk, device=table.device)
            out.append(table)
        return out

    def _tp(self) -> int:
        if not self.sequence_parallel:
            return 1
        from megatron.core import parallel_state as mpu

        return int(mpu.get_tensor_model_parallel_world_size())

    def clear(self) -> None:
        """Forget what the step recorded and queued (after its training passes)."""
        self._recorded.clear()
        for _, r in self.routers:
            r.router_replay.clear_router_replay_action()
            r.router_replay.clear_indices()
