"""Typed run configuration: YAML files plus ``key.sub=value`` overrides, validated before any work.

Every section is a keyword-only dataclass validated in ``__post_init__`` (single-field checks).
Checks that need the model's shape and the world size (heads divisible by TP, experts by EP, ...)
live in :func:`validate_layout`, which reads only the HF ``config.json``: it runs before any model
is built or any process group is created.

Errors are :class:`ConfigError` (a ``ValueError``) naming the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from nsr_megatron.data.datasets import DataConfig
from nsr_megatron.losses.policy import PolicyLossConfig
from nsr_megatron.losses.rng import derive_seed
from nsr_megatron.rewards.scorer import RewardConfig

__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "Config",
    "RolloutConfig",
    "SGLangConfig",
    "ConfigError",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "ProfileConfig",
    "RunConfig",
    "SmokeBatchConfig",
    "SmokeConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "loss_draws",
    "read_hf_config",
    "to_dict",
]


class ConfigError(ValueError):
    """A user-facing configuration mistake: the message names field, value and fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(kw_only=True)
class ModelConfig:
    """Which model to build and how.

    ``hf_path`` is a Hugging Face checkpoint directory (or its ``config.json``); the architecture
    (Qwen2 / Qwen2.5, Qwen3, Qwen3-MoE) is read from it. ``transformer_impl="auto"`` uses Transformer
    Engine layers when TE imports, megatron-core's local layers otherwise.
    """

    hf_path: str = ""
    tokenizer_path: str = ""  # a folder with the tokenizer files; empty: hf_path
    # With hf_path empty, smoke / quickstart generate a tiny random Qwen3-MoE; these override its config.json.
    tiny: dict[str, Any] = field(default_factory=dict)
    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    moe_aux_loss_coeff: float = 0.0  # RL default: no load-balancing loss
    moe_router_dtype: Literal["fp32", "fp64"] = "fp32"
    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    moe_grouped_gemm: bool = False
    fp8: Literal["", "e4m3", "hybrid"] = ""  # "" = off
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise"] = "delayed"
    fp8_param: bool = False
    recompute: Literal["", "full", "selective"] = ""
    offload_reference: bool = False  # keep the frozen reference model in host memory between uses
    # Log-probs and entropy straight from the last hidden states and the (vocab-parallel) output weight, in chunks
    # of tokens: no [tokens, vocab / TP] logits tensor of a whole micro-batch exists (the backward recomputes each
    # chunk). false: the model's logits and the logits op (kept for comparison).
    fused_logprobs: bool = True

    def __post_init__(self) -> None:
        _require(
            self.moe_aux_loss_coeff >= 0.0,
            f"model.moe_aux_loss_coeff={self.moe_aux_loss_coeff} is negative; use 0 (off, the RL default) "
            "or a small positive value such as 1e-3.",
        )
        _require(
            not self.fp8_param or bool(self.fp8),
            "model.fp8_param=true needs model.fp8 set to 'e4m3' or 'hybrid'; set model.fp8 or drop fp8_param.",
        )
        _require(
            not self.fp8 or self.params_dtype == "bf16",
            f"model.fp8={self.fp8!r} needs model.params_dtype=bf16 (got {self.params_dtype!r}); "
            "set model.params_dtype=bf16.",
        )


@dataclass(kw_only=True)
class ParallelConfig:
    """Tensor (tp), pipeline (pp), expert (ep), expert-tensor (etp) and context (cp) parallel sizes.

    Data parallelism is what is left: ``world_size / (tp * pp * cp)``.
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 0  # expert tensor parallel size; 0 = same as tp (megatron's default)
    cp: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        _require(
            isinstance(self.etp, int) and self.etp >= 0,
            f"parallel.etp={self.etp!r} must be a positive integer, or 0 for 'same as tp'.",
        )
        if self.etp == 0:
            self.etp = self.tp
        for name in ("tp", "pp", "ep", "etp", "cp"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value >= 1,
                f"parallel.{name}={value!r} must be a positive integer; use 1 to disable it.",
            )
        _require(
            not self.sequence_parallel or self.tp > 1,
            "parallel.sequence_parallel=true needs parallel.tp > 1 (it splits the sequence over TP ranks); "
            "set parallel.sequence_parallel=false or raise parallel.tp.",
        )


@dataclass(kw_only=True)
class OptimizerConfig:
    """Adam with decoupled weight decay, linear warm-up and a cosine or constant schedule.

    ``cpu_offload``: megatron-core's hybrid-device optimizer keeps ``offload_fraction`` of the optimizer state
    (fp32 master weights and Adam's moments) in host memory and runs its update there; ``offload_overlap``
    overlaps the gradient and parameter copies with the host update (CUDA). ``precision_aware``: megatron's
    precision-aware optimizer with the four dtypes below (they apply only with it; bf16 moments by default, as
    slime runs); it needs Transformer Engine's fused Adam, or ``cpu_offload=true``.
    """

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    cpu_offload: bool = False
    offload_fraction: float = 1.0
    offload_overlap: bool = True
    precision_aware: bool = False
    main_grads_dtype: Literal["fp32", "bf16"] = "fp32"
    main_params_dtype: Literal["fp32", "fp16"] = "fp32"
    exp_avg_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    exp_avg_sq_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optimizer.lr={self.lr} must be > 0 (e.g. 1e-6 for RL fine-tuning).")
        _require(
            0 <= self.min_lr <= self.lr,
            f"optimizer.min_lr={self.min_lr} must lie in [0, optimizer.lr={self.lr}].",
        )
        _require(self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0.")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"optimizer.{name}={value} must lie in [0, 1), e.g. 0.9 / 0.999.")
        _require(self.adam_eps > 0, f"optimizer.adam_eps={self.adam_eps} must be > 0, e.g. 1e-8.")
        _require(self.clip_grad >= 0, f"optimizer.clip_grad={self.clip_grad} must be >= 0 (0 disables it).")
        _require(self.warmup_steps >= 0, f"optimizer.warmup_steps={self.warmup_steps} must be >= 0.")
        _require(0.0 <= self.offload_fraction <= 1.0,
                 f"optimizer.offload_fraction={self.offload_fraction} must lie in [0, 1] (the share of the optimizer "
                 "state kept in host memory; 1.0 = all of it).")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where and how often to save; ``resume="auto"`` continues from the newest complete checkpoint."""

    save_interval: int = 0  # steps; 0 = only at the end
    resume: Literal["", "auto"] = ""
    load: str = ""  # an explicit checkpoint folder to start from
    keep_last: int = 2

    def __post_init__(self) -> None:
        _require(self.save_interval >= 0, f"checkpoint.save_interval={self.save_interval} must be >= 0.")
        _require(self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last} must be >= 1.")


@dataclass(kw_only=True)
class RunConfig:
    """Run-level settings: output folder, seed, number of RL steps, and the no-learning-signal alarm."""

    run_dir: str = "runs/default"
    seed: int = 1234
    steps: int = 10
    # Warn when this many steps in a row had no learning signal (every group's rewards equal); 0 = never.
    warn_no_signal_steps: int = 5

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"run.steps={self.steps} must be >= 1.")
        _require(
            self.warn_no_signal_steps >= 0,
            f"run.warn_no_signal_steps={self.warn_no_signal_steps} must be >= 0 (0 turns the warning off).",
        )


@dataclass(kw_only=True)
class SmokeBatchConfig:
    """Random-token batches of ``nsr-megatron smoke`` (the throughput check; RL runs size their batches in
    ``rollout`` and ``algorithm``)."""

    seq_length: int = 128
    micro_batch_size: int = 4
    global_batch_size: int = 16

    def __post_init__(self) -> None:
        _require(self.seq_length >= 2, f"batch.seq_length={self.seq_length} must be >= 2.")
        _require(self.micro_batch_size >= 1, f"batch.micro_batch_size={self.micro_batch_size} must be >= 1.")
        _require(
            self.global_batch_size >= self.micro_batch_size,
            f"batch.global_batch_size={self.global_batch_size} must be >= batch.micro_batch_size="
            f"{self.micro_batch_size}.",
        )


@dataclass(kw_only=True)
class SGLangConfig:
    """Engines of ``rollout.backend=sglang``: how the trainer launches ``python -m sglang.launch_server``.

    ``python`` is the interpreter of SGLang's own virtual environment (``scripts/setup_sglang.sh`` builds one;
    default: ``.venv-sglang/bin/python`` when it exists, else ``python3``). On a machine without CUDA the engines
    run SGLang's CPU engine (``--device cpu``, torch-native attention); ``env`` adds environment variables to the
    engines (e.g. a ``PYTHONPATH``). ``colocate=true`` shares the training GPUs: the engines start with
    ``--enable-memory-saver`` and release their memory while the trainer trains (CUDA only).
    """

    python: str = ""
    tp_size: int = 1
    mem_fraction: float = 0.8  # --mem-fraction-static on GPUs (CPU engines use a small fixed pool)
    base_gpu_id: int = 0  # the first GPU of engine 0; engine k starts at base_gpu_id + k * tp_size
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    colocate: bool = False

    def __post_init__(self) -> None:
        _require(self.tp_size >= 1, f"rollout.sglang.tp_size={self.tp_size} must be >= 1.")
        _require(0 < self.mem_fraction <= 1, f"rollout.sglang.mem_fraction={self.mem_fraction} must lie in (0, 1].")
        _require(self.base_gpu_id >= 0, f"rollout.sglang.base_gpu_id={self.base_gpu_id} must be >= 0.")
        _require(isinstance(self.extra_args, list) and all(isinstance(a, str) for a in self.extra_args),
                 f"rollout.sglang.extra_args={self.extra_args!r} must be a list of strings, e.g. [--dp-size, '2'].")


ROLLOUT_BACKENDS = ("embedded", "server", "sglang")  # the built-in values of rollout.backend


@dataclass(kw_only=True)
class RolloutConfig:
    """How responses are sampled (G samples for each of ``prompts_per_step`` prompts) and by which engines.

    ``backend``: ``embedded`` (default) runs the engine in the trainer's driver process; ``server`` runs
    ``num_engines`` processes of the project's rollout server, launched and supervised by the trainer (the
    multi-engine path that runs on CPU); ``sglang`` launches SGLang engines the same way. With ``urls`` the trainer
    attaches to engines that are already running instead (server or SGLang). ``module:Factory`` is a backend of
    your own: ``Factory(EngineSetup)`` returns a ``RolloutEngine`` (README, "Adding a rollout backend"). Weights
    reach the engines through ``weight_sync``: ``distributed`` (a broadcast over a process group the engines
    join), ``disk`` (a safetensors folder the engines load) or ``tensor`` (CUDA IPC handles, for SGLang engines
    colocated on the training GPUs), in buckets of ``update_bucket_mb``; or ``shared_memory`` (the project's server
    on the trainer's host: every rank writes its own shards straight into the engines' weights, no buckets).
    ``auto`` (default): ``shared_memory`` for the project's server when the engines and every rank share this host
    (Linux), falling back to ``distributed`` if the engines' memory cannot be mapped; ``distributed`` otherwise.
    """

    backend: str = "embedded"  # embedded | server | sglang | module:Factory
    num_engines: int = 1
    urls: list[str] = field(default_factory=list)
    api_token: str = ""  # bearer token of the engines' weight endpoints (default: a fresh one per run)
    weight_sync: Literal["auto", "distributed", "disk", "tensor", "shared_memory"] = "auto"
    # The address engines reach the trainer's weight-update group at: "" = 127.0.0.1 when every engine is on
    # loopback, else this host's name (engines on other nodes, rollout.urls).
    weight_group_host: str = ""
    update_bucket_mb: int = 512
    max_restarts: int = 3  # engine restarts allowed over the run before it stops
    request_timeout_s: float = 600.0
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_batch_size: int = 256
    # Seed of the sampling draws (each step's prompts get seeds derived from it and the step). None: run.seed.
    sampling_seed: int | None = None
    # One-step off-policy: the driver samples step k+1 (from the weights before step k's update) in the background
    # while step k trains, so rollout time hides behind training when the engines have cores or GPUs of their own.
    # Those samples are one update stale (rollout/staleness = 1); correct with loss.tis_cap / loss.mis_*.
    overlap: bool = False
    # Train-state offload while the engines generate: the policy's parameters, gradient buffers and optimizer state
    # (and the reference model) move to host memory before each rollout and come back, bit for bit, after it.
    # auto: on when the engines share the training GPUs (rollout.backend=sglang with rollout.sglang.colocate=true).
    offload_train: Literal["auto", "true", "false"] = "auto"

    def __post_init__(self) -> None:
        module, colon, factory = self.backend.partition(":")
        _require(self.backend in ROLLOUT_BACKENDS or bool(
            colon and all(p.isidentifier() for p in module.split(".") + factory.split("."))),
            f"rollout.backend={self.backend!r} is not one of {list(ROLLOUT_BACKENDS)} nor 'module:Factory' (a rollout "
            "backend of your own; see the README, \"Adding a rollout backend\").")
        _require(self.prompts_per_step >= 1, f"rollout.prompts_per_step={self.prompts_per_step} must be >= 1.")
        _require(
            self.samples_per_prompt >= 2,
            f"rollout.samples_per_prompt={self.samples_per_prompt} must be >= 2 (group advantages need a group).",
        )
        _require(self.max_new_tokens >= 1, f"rollout.max_new_tokens={self.max_new_tokens} must be >= 1.")
        _require(self.temperature > 0, f"rollout.temperature={self.temperature} must be > 0 (1.0 samples the policy).")
        _require(0 < self.top_p <= 1, f"rollout.top_p={self.top_p} must lie in (0, 1].")
        _require(self.num_engines >= 1, f"rollout.num_engines={self.num_engines} must be >= 1.")
        _require(self.update_bucket_mb >= 1, f"rollout.update_bucket_mb={self.update_bucket_mb} must be >= 1.")
        _require(self.max_restarts >= 0, f"rollout.max_restarts={self.max_restarts} must be >= 0.")
        _require(self.request_timeout_s > 0, f"rollout.request_timeout_s={self.request_timeout_s} must be > 0.")
        _require(isinstance(self.urls, list) and all(isinstance(u, str) and u.startswith("http") for u in self.urls),
                 f"rollout.urls={self.urls!r} must be a list of engine URLs, e.g. [http://127.0.0.1:30000].")
        _require(
            not self.urls or self.backend in ("server", "sglang"),
            "rollout.urls names running engines: set rollout.backend=server (the project's server) or sglang.",
        )
        _require(not (self.overlap and self.sglang.colocate),
                 "rollout.overlap=true samples while the policy trains, so the engines need devices of their own: "
                 "it cannot be combined with rollout.sglang.colocate=true (engines on the training GPUs).")
        _require(not (self.overlap and self.offload_train == "true"),
                 "rollout.overlap=true samples while the policy trains, so the training state cannot wait in host "
                 "memory during the rollout: set rollout.offload_train=auto (or false) or rollout.overlap=false.")


@dataclass(kw_only=True)
class AlgorithmConfig:
    """GRPO-style advantages, DAPO dynamic sampling, and how each rollout batch is trained on."""

    normalize_std: bool = True  # False = Dr.GRPO advantages (no std division)
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal, sample more prompts
    max_sampling_rounds: int = 3
    old_logprobs: Literal["recompute", "rollout"] = "recompute"
    # One optimizer step per rollout batch (recompute): the old log-probs are the training forward's own, detached,
    # so the separate old-log-prob forward is skipped (as TRL does). Not with TIS/MIS, R2 replay or the routing
    # profiler, which need that forward; false always runs it.
    on_policy_shortcut: bool = True
    mini_batches: int = 2  # optimizer steps per rollout batch (>1 makes clipping, and NSR, matter)
    # MoE routing replay in the training forward: R2 replays the old-log-prob forward's routing, R3 the rollout
    # engine's (megatron-core's RouterReplay).
    routing_replay: Literal["off", "R2", "R3"] = "off"
    max_tokens_per_micro_batch: int = 4096

    def __post_init__(self) -> None:
        _require(self.max_sampling_rounds >= 1, f"algorithm.max_sampling_rounds={self.max_sampling_rounds} must be >= 1.")
        _require(self.mini_batches >= 1, f"algorithm.mini_batches={self.mini_batches} must be >= 1.")
        _require(
            self.max_tokens_per_micro_batch >= 16,
            f"algorithm.max_tokens_per_micro_batch={self.max_tokens_per_micro_batch} must be >= 16.",
        )


@dataclass(kw_only=True)
class ProfileConfig:
    """What the run measures beyond its metrics.

    ``routing``: the MoE routing profiler. ``off`` (default) installs nothing, so it costs nothing; ``counters``
    adds the ``routing/*`` scalars (expert load imbalance, router entropy and top-k margin, routing drift between
    the old-log-prob and training forwards, and between rollout and training); ``full`` also writes per-step,
    per-layer, per-expert counts to ``<run_dir>/routing.jsonl`` (with the experts of the tokens the loss clipped,
    rescued or saw in the rescue band) and draws the routing plots.
    """

    routing: Literal["off", "counters", "full"] = "off"


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation inside training: every ``interval`` steps (0 = never) the driver samples ``k`` responses per
    problem of ``data`` (read like ``data.path``, with the ``data`` section's keys and template) from the current
    weights and logs ``eval/avg@k``, ``eval/pass@1``, ``eval/pass@k``, ``eval/maj@k`` with that step's metrics
    (``nsr_megatron.evaluation``). ``max_problems`` (0 = all) takes the file's first problems; ``max_new_tokens``
    0 = ``rollout.max_new_tokens``. The schedule is by step number, so a resumed run keeps it. ``data: generate``
    (the quickstart only) writes a held-out set of the synthetic task, drawn with ``data.seed + 1``. ``at_start``
    also evaluates the starting weights, before the first step of a run that is not resumed, and writes that
    summary to ``run_dir/eval_start.json`` (the same keys, without the ``eval/`` prefix)."""

    interval: int = 0
    at_start: bool = False
    data: str = ""
    k: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 0
    max_problems: int = 0
    seed: int = 0
    correct_threshold: float = 1.0

    def __post_init__(self) -> None:
        _require(self.interval >= 0, f"eval.interval={self.interval} must be >= 0 (0 = no evaluation).")
        _require(self.k >= 1, f"eval.k={self.k} must be >= 1.")
        _require(not self.interval or bool(self.data),
                 f"eval.interval={self.interval} needs eval.data: the prompt file to evaluate on.")


def _default_data() -> DataConfig:
    return DataConfig()


@dataclass(kw_only=True)
class Config:
    """The whole run: one section per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=_default_data)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        # run.seed varies every draw of the run unless a stream's seed is set (loss.seed: see load_config).
        if self.data.shuffle_seed is None:
            self.data.shuffle_seed = derive_seed(self.run.seed, f"shuffle/{self.data.seed}")
        if self.rollout.sampling_seed is None:
            self.rollout.sampling_seed = self.run.seed


@dataclass(kw_only=True)
class SmokeConfig:
    """``nsr-megatron smoke``: a model trained a few steps on random tokens (no data, rewards or rollout)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    batch: SmokeBatchConfig = field(default_factory=SmokeBatchConfig)


def read_hf_config(hf_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse ``config.json`` from an HF checkpoint directory (or the file itself)."""
    path = Path(hf_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"model.hf_path={str(hf_path)!r}: no config.json found there; point it at a Hugging Face "
            "checkpoint directory (one containing config.json)."
        )
    with open(path, encoding="utf-8") as f:
        return dict(json.load(f))


# --------------------------------------------------------------------------------------------
# dict / YAML <-> dataclasses
# --------------------------------------------------------------------------------------------
T = TypeVar("T")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool):  # YAML 1.1 reads a bare off / on (and true / false) as a boolean
            value = next((w for w in (("on", "true") if value else ("off", "false")) if w in choices), value)
        _require(value in choices, f"{where}={value!r} is not one of {list(choices)}.")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if hint is bool:
        _require(isinstance(value, bool), f"{where}={value!r} must be true or false.")
        return value
    if hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), f"{where}={value!r} must be an integer.")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}={value!r} must be a number."
        )
        return float(value)
    if hint is str:
        _require(isinstance(value, (str, int, float)), f"{where}={value!r} must be a string.")
        return str(value)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        _require(isinstance(value, dict), f"{where} must be a mapping of fields, got {value!r}.")
        return from_dict(hint, value, prefix=where + ".")
    return value


# Keys that no longer exist, with where their meaning went.
_MOVED = {
    "rollout.engine": "Choose the engines with rollout.backend (embedded | server | sglang); attach to running ones "
    "with rollout.urls=[http://host:port, ...].",
    "rollout.url": "Attach to running engines with rollout.urls=[http://host:port, ...] and rollout.backend=server "
    "(or sglang).",
    **{f"run.{k}": f"It is not an RL setting (RL batches are sized by rollout.prompts_per_step, samples_per_prompt "
    f"and max_new_tokens); `nsr-megatron smoke` takes it as batch.{k}."
    for k in ("seq_length", "micro_batch_size", "global_batch_size")},
}


def from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            moved = _MOVED.get(prefix + key)
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" Did you mean {prefix}{close[0]}?" if close else f" Valid keys: {sorted(fields)}."
            raise ConfigError(f"unknown config key {prefix + key!r}.{' ' + moved if moved else hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a component's own validation (e.g. the loss config)
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML scalars) to a nested dict, in order."""
    result = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. optimizer.lr=1e-5).")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section.")
        node[parts[-1]] = value
    return result


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None, cls: type[T] = Config) -> T:  # type: ignore[assignment]
    """Read YAML ``path`` (or start from defaults), apply overrides, and validate every field."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file.")
        with open(p, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level.")
        data = loaded
    data = apply_overrides(data, overrides or [])
    config = from_dict(cls, data)
    if isinstance(config, Config):
        _derive_rescue_seed(config, explicit="seed" in (data.get("loss") or {}))
    return config


def loss_draws(loss: PolicyLossConfig) -> bool:
    """Whether the loss draws random numbers from ``loss.seed`` (NSR's stochastic rescue, Clip-Cov's selection):
    the seed is not among the fields the loss ignores."""
    return "seed" not in loss._ignored()


def _derive_rescue_seed(config: Config, *, explicit: bool) -> None:
    """The loss's draws follow ``run.seed`` unless ``loss.seed`` is set. An unset ``loss.seed`` takes the preset's
    value (0) in ``PolicyLossConfig``, so only the loaded mapping tells whether it was set. Assigned, not passed to
    the constructor: a loss that draws nothing keeps its preset seed and warns about nothing."""
    if not explicit and loss_draws(config.loss):
        config.loss.seed = derive_seed(config.run.seed, "rescue")
