"""Everything a run needs, built once from the config and the checked inputs of :mod:`.preflight`: process groups,
run directory, sampler, rewards, rollout engine, policy and reference models (each rank reads only its own slices
of the HF weights), and the resume point. The loop
(``loop.py``) only uses it."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import yaml

from nsr_megatron.config import Config, ConfigError, RolloutConfig, to_dict
from nsr_megatron.data.datasets import EpochSampler, PromptDataset
from nsr_megatron.host_offload import HostOffload
from nsr_megatron.models.hf_config import ArchSpec
from nsr_megatron.parallel import ParallelState
from nsr_megatron.rewards.scorer import RewardScorer
from nsr_megatron.rollout.engine import EngineSetup, RolloutEngine
from nsr_megatron.rollout.weight_sync import SharedMappings
from nsr_megatron.telemetry.routing import RoutingLog
from nsr_megatron.trainer.preflight import RunInputs

if TYPE_CHECKING:
    from nsr_megatron.convert.sharded import HFExport
    from nsr_megatron.models.provider import ModelBundle

log = logging.getLogger(__name__)

__all__ = ["COUNTERS", "Runtime", "build_runtime", "lr_at"]

# Run-long counts kept in every checkpoint, so a resumed run continues them.
COUNTERS = ("rollout/empty_steps", "train/skipped_steps", "no_signal_streak")


@dataclass(kw_only=True)
class Runtime:
    config: Config
    arch: ArchSpec
    state: ParallelState
    run_dir: Path
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    dataset: PromptDataset
    sampler: EpochSampler
    scorer: RewardScorer | None  # the driver rank's (rank 0); None elsewhere
    engine: RolloutEngine | None  # the driver rank's; None elsewhere
    policy: ModelBundle
    export: HFExport  # the policy's weights as HF tensors, gathered group-locally onto the driver
    reference: ModelBundle | None = None
    eval_dataset: PromptDataset | None = None  # eval.data (eval.interval > 0)
    stop_token_ids: tuple[int, ...] = ()
    routing_log: RoutingLog | None = None  # routing.jsonl (profile.routing=full, the logging rank)
    routed_experts: bool = False  # the engine returns each token's experts (routing profiler, R3 replay)
    dp_ranks: list[int] | None = None  # each world rank's data-parallel rank (the driver's hand-out of samples)
    prefetch: Any = None  # rollout.overlap: the next step's samples, sampled in the background (loop.Prefetch)
    restarts_seen: int = 0  # engine restarts already counted in a step's rollout/restarts
    weight_sync: str = "distributed"  # rollout.weight_sync with ``auto`` resolved (weight_sync_mode)
    # The engines share the training devices: they release their memory while the trainer trains (colocated SGLang,
    # or the embedded engine with rollout.offload_train on).
    colocated: bool = False
    train_offload: HostOffload | None = None  # rollout.offload_train: the training state's host copy
    # rollout.weight_sync=shared_memory: this rank's mappings of the engines' weights, kept between syncs
    shared_weights: SharedMappings = field(default_factory=SharedMappings)
    start_step: int = 0
    resumed: bool = False
    counters: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0.0))

    @property
    def is_logger(self) -> bool:
        return self.state.rank == 0

    def train_state(self) -> list[torch.Tensor]:
        """The tensors ``rollout.offload_train`` moves to host memory while the engines generate: the policy's
        parameters, gradient buffers and optimizer state, and the reference model's weights."""
        from nsr_megatron.models.state import train_state_tensors

        tensors = list(train_state_tensors(self.policy.module, self.policy.optimizer))
        if self.reference is not None:
            tensors += list(self.reference.module.parameters())
        return tensors

    def close(self) -> None:
        """Stop what the run started: the routing log, the reward workers and the rollout engines."""
        if self.prefetch is not None:
            self.prefetch.thread.join()
        if self.routing_log is not None:
            self.routing_log.close()
        if self.scorer is not None:
            self.scorer.close()
        if self.engine is not None:
            self.engine.close()


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int, schedule: str) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then constant / cosine / linear."""
    import math

    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    return lr + (min_lr - lr) * progress


def _embedded(config: Config, run_dir: Path, device: str) -> RolloutEngine:
    from nsr_megatron.rollout import EmbeddedEngine

    setup = engine_setup(config, run_dir, device)
    return EmbeddedEngine(setup.hf_path, device=setup.device, dtype=setup.dtype, max_batch_size=setup.max_batch_size)


def _pool(config: Config, run_dir: Path, device: str) -> RolloutEngine:
    """Engines of the project's rollout server or of SGLang, launched here (or attached to ``rollout.urls``)."""
    import secrets

    from nsr_megatron.config import read_hf_config
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.rollout.pool import EnginePool, server_launchers, sglang_launchers

    r = config.rollout
    arch = arch_from_hf(read_hf_config(config.model.hf_path))
    token = r.api_token or secrets.token_hex(16)
    log_dir = run_dir / "engines"
    launchers = []
    if not r.urls and r.backend == "server":
        launchers = server_launchers(config.model.hf_path, r.num_engines, token=token, log_dir=log_dir,
                                     dtype="bfloat16" if config.model.params_dtype == "bf16" else "float32",
                                     max_batch_size=r.max_batch_size,
                                     threads=max(1, (os.cpu_count() or 2) // (r.num_engines + 1)))
    elif not r.urls:
        launchers = sglang_launchers(config.model.hf_path, r.num_engines, token=token, log_dir=log_dir,
                                     python=sglang_python(config), tp_size=r.sglang.tp_size,
                                     mem_fraction=r.sglang.mem_fraction, base_gpu_id=r.sglang.base_gpu_id,
                                     colocate=r.sglang.colocate, extra_args=r.sglang.extra_args, env=r.sglang.env,
                                     routed_experts=wants_routed_experts(config, arch))
    pool = EnginePool(launchers=launchers, urls=r.urls, token=r.api_token if r.urls else token,
                      weight_sync=weight_sync_mode(r), bucket_bytes=r.update_bucket_mb << 20,
                      weights_dir=run_dir / "rollout_weights", hf_path=config.model.hf_path,
                      max_restarts=r.max_restarts, request_timeout_s=r.request_timeout_s,
                      colocate=r.backend == "sglang" and r.sglang.colocate, topk=arch.moe_topk,
                      group_host=weight_group_host(r.weight_group_host, r.urls))
    return pool.start()


def remote_urls(urls: list[str]) -> list[str]:
    """The engine URLs that are not on loopback (engines on other hosts)."""
    from urllib.parse import urlparse

    return [u for u in urls if urlparse(u).hostname not in ("127.0.0.1", "localhost", "::1")]


def ranks_span_nodes() -> bool:
    """Whether this run's ranks are on several nodes (torchrun's ``WORLD_SIZE`` > ``LOCAL_WORLD_SIZE``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def weight_sync_mode(r: RolloutConfig) -> str:
    """``rollout.weight_sync`` with ``auto`` resolved: ``shared_memory`` for the project's server when its engines
    (launched here, or attached on loopback) and every rank of the run share this host, on Linux; else
    ``distributed``."""
    if r.weight_sync != "auto":
        return r.weight_sync
    shared = r.backend == "server" and not remote_urls(r.urls) and not ranks_span_nodes()
    return "shared_memory" if shared and hasattr(os, "memfd_create") else "distributed"


def offload_train_on(r: RolloutConfig) -> bool:
    """``rollout.offload_train`` with ``auto`` resolved: on when launched engines share the training GPUs
    (``rollout.backend=sglang`` with ``rollout.sglang.colocate=true``)."""
    if r.offload_train != "auto":
        return r.offload_train == "true"
    return r.backend == "sglang" and r.sglang.colocate and not r.urls


def weight_group_host(configured: str, urls: list[str]) -> str:
    """The address engines reach the weight-update group at (``rollout.weight_group_host``)."""
    if configured:
        return configured
    if not remote_urls(urls):
        return "127.0.0.1"
    import socket

    return socket.getfqdn()


def sglang_python(config: Config) -> str:
    """The SGLang venv's interpreter: ``rollout.sglang.python``, else ``$NSR_SGLANG_PYTHON``, else
    ``.venv-sglang/bin/python`` under the working directory when it exists, else ``python3``."""
    local = Path.cwd() / ".venv-sglang" / "bin" / "python"
    return (config.rollout.sglang.python or os.environ.get("NSR_SGLANG_PYTHON")
            or (str(local) if local.exists() else "python3"))


def wants_routed_experts(config: Config, arch: ArchSpec) -> bool:
    """Whether the rollout engine must return each token's experts: for the routing profiler's rollout drift and
    for R3 replay (MoE models only). SGLang returns them only on CUDA: on CPU the profiler goes without
    ``routing/drift_rollout_train`` (and preflight refuses R3)."""
    if config.rollout.backend == "sglang" and not torch.cuda.is_available():
        return False
    return arch.is_moe and (config.profile.routing != "off" or config.algorithm.routing_replay == "R3")


def engine_setup(config: Config, run_dir: Path, device: str) -> EngineSetup:
    """What a rollout backend is built from, for the driver rank on ``device`` (``cuda`` or ``cpu``)."""
    return EngineSetup(hf_path=config.model.hf_path, device=device,
                       dtype=torch.bfloat16 if config.model.params_dtype == "bf16" else torch.float32,
                       max_batch_size=config.rollout.max_batch_size, num_engines=config.rollout.num_engines,
                       log_dir=run_dir / "engines")


# rollout.backend -> the driver rank's engine; any other value is "module:Factory" (rollout_backend)
BACKENDS: dict[str, Callable[[Config, Path, str], RolloutEngine]] = {
    "embedded": _embedded, "server": _pool, "sglang": _pool}


def rollout_backend(name: str) -> Callable[[Config, Path, str], RolloutEngine]:
    """The builder of ``rollout.backend=name``: a built-in one, or ``module:Factory``, a class or function of your
    own called with an :class:`~nsr_megatron.rollout.engine.EngineSetup` that returns a
    :class:`~nsr_megatron.rollout.engine.RolloutEngine`. Raises ``ConfigError`` when it does not import."""
    import importlib

    if name in BACKENDS:
        return BACKENDS[name]
    module_name, _, attr = name.partition(":")
    try:
        factory: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"rollout.backend={name!r}: cannot import {attr!r} from {module_name!r} ({exc}); is the "
                          "module on PYTHONPATH?") from exc
    if not callable(factory):
        raise ConfigError(f"rollout.backend={name!r} is a {type(factory).__name__}, not a class or function that "
                          "takes an EngineSetup.")
    return lambda config, run_dir, device: factory(engine_setup(config, run_dir, device))


def standalone_engine(config: Config, run_dir: Path) -> RolloutEngine:
    """The engine of ``rollout.backend`` outside a training run (``nsr-megatron eval``): on this process's device,
    engines it launches logging under ``run_dir``."""
    return rollout_backend(config.rollout.backend)(config, run_dir, "cuda" if torch.cuda.is_available() else "cpu")


def _write_resolved_config(config: Config, run_dir: Path) -> None:
    tmp = run_dir / "config.yaml.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
    os.replace(tmp, run_dir / "config.yaml")


def build_runtime(config: Config, inputs: RunInputs, *, world_size: int) -> Runtime:
    """Build every component from checked inputs (:func:`.preflight.preflight`). Collective under torchrun."""
    from nsr_megatron import parallel
    from nsr_megatron.convert.sharded import HFExport, load_hf_sharded
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.trainer.checkpoint import load_checkpoint, read_meta

    arch, run_dir = inputs.arch, Path(config.run.run_dir)
    state = parallel.initialize(config.parallel, seed=config.run.seed)
    if state.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_resolved_config(config, run_dir)
    assert config.data.shuffle_seed is not None, "Config.__post_init__ derives data.shuffle_seed from run.seed"
    sampler = EpochSampler(len(inputs.dataset), config.rollout.prompts_per_step, seed=config.data.shuffle_seed,
                           shuffle=config.data.shuffle)
    replay = config.algorithm.routing_replay
    policy = build_model(arch, model=config.model, parallel=config.parallel, role="policy", optimizer=config.optimizer,
                         routing_replay=replay != "off")
    reference = None
    if config.loss.kl_coef > 0:
        reference = build_model(arch, model=config.model, parallel=config.parallel, role="reference")

    moe_layers = [i for i, moe in enumerate(arch.moe_layers) if moe]
    if replay != "off":
        from nsr_megatron.models.routing import RoutingReplay

        policy.replay = RoutingReplay(policy.gpt, moe_layers, arch.moe_topk, mode=replay,
                                      sequence_parallel=config.parallel.sequence_parallel)
    if config.profile.routing != "off":  # hooks on the policy's routers; with "off" nothing is installed
        from nsr_megatron.models.routing import RoutingProfiler

        policy.routing = RoutingProfiler(
            policy.gpt, moe_layers, arch.num_experts, arch.moe_topk,
            full=config.profile.routing == "full", sequence_parallel=config.parallel.sequence_parallel)
    counters = dict.fromkeys(COUNTERS, 0.0)
    start_step = 0
    if inputs.resume_from is not None:
        saved = read_meta(inputs.resume_from)
        load_checkpoint(inputs.resume_from, policy.module, policy.optimizer if saved["has_optimizer"] else None)
        meta = saved["meta"]
        start_step = int(meta["step"])
        sampler.load_state_dict(meta["sampler"])
        counters.update({k: float(v) for k, v in meta.get("counters", {}).items() if k in counters})
        log.info("resumed from %s (step %d)", inputs.resume_from, start_step)
    elif config.checkpoint.load:
        load_checkpoint(config.checkpoint.load, policy.module)
    else:  # every rank reads only the slices of the HF weights it owns
        load_hf_sharded(policy.module, arch, config.model.hf_path)
    if reference is not None:  # the reference is the initial model, also when resuming
        if config.checkpoint.load:
            load_checkpoint(config.checkpoint.load, reference.module)
        else:
            load_hf_sharded(reference.module, arch, config.model.hf_path)
        if reference.offload:
            reference.offload_weights()
    if dist.is_initialized():
        dist.barrier()
    weight_sync = weight_sync_mode(config.rollout)
    if state.rank == 0 and config.rollout.backend != "embedded":
        log.info("rollout: weights reach the engines by %s (rollout.weight_sync=%s)", weight_sync,
                 config.rollout.weight_sync)
    return Runtime(
        config=config,
        arch=arch,
        state=state,
        run_dir=run_dir,
        tokenizer=inputs.tokenizer,
        dataset=inputs.dataset,
        eval_dataset=inputs.eval_dataset,
        sampler=sampler,
        scorer=RewardScorer(config.reward) if state.rank == 0 else None,
        engine=(rollout_backend(config.rollout.backend)(config, run_dir, "cuda" if state.device.type == "cuda"
                                                        else "cpu") if state.rank == 0 else None),
        policy=policy,
        export=HFExport(policy.module, arch),
        reference=reference,
        stop_token_ids=inputs.stop_token_ids,
        routing_log=(RoutingLog(run_dir, resume_step=start_step if inputs.resume_from is not None else None)
                     if config.profile.routing == "full" and state.rank == 0 else None),
        routed_experts=wants_routed_experts(config, arch),
        weight_sync=weight_sync,
        colocated=offload_train_on(config.rollout) or (config.rollout.backend == "sglang"
                                                        and config.rollout.sglang.colocate),
        train_offload=HostOffload(state.device) if offload_train_on(config.rollout) else None,
        start_step=start_step,
        resumed=inputs.resume_from is not None,
        counters=counters,
    )
