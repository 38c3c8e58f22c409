"""Per-GPU memory of a training layout, from ``config.json`` and the run config alone (``nsr-megatron plan``).

Nothing here imports megatron or touches a GPU. The estimate follows how this project builds the model:

- **parameters**: each rank holds its pipeline stage's layers; attention and dense MLPs split over TP, experts over
  EP x ETP, the embedding (vocabulary-parallel) on the first stage and the output layer on the last (one copy when
  tied and PP = 1), the router and norms whole on every rank. The worst stage is reported.
- **gradients**: megatron DDP's buffer, fp32 (``grad_reduce_in_fp32``; the precision-aware optimizer's
  ``main_grads_dtype``).
- **optimizer**: Adam's two moments, plus master weights when the parameters are bf16/fp16, 4 bytes each (the
  precision-aware optimizer's dtypes where it is on), divided over the data-parallel ranks with the distributed
  optimizer (experts over the expert-data-parallel ranks). ``optimizer.cpu_offload`` moves ``offload_fraction`` of
  it to host memory (megatron's hybrid-device optimizer: an fp32 copy and fp32 moments there, 12 bytes a parameter
  whatever the precision-aware dtypes, and fp32 AdamW on the share it leaves on the GPU too); of the offloaded
  share only the distributed optimizer's fp32 master shards of 16-bit parameters stay on the GPU, and the
  precision-aware optimizer drops those.
- **activations** of one micro-batch of ``batch`` sequences of ``seq`` tokens per layer: the tensors autograd keeps,
  per token (Korthikanti et al. 2022; flash attention, no ``s x s`` term: TE's, or torch's SDPA in this project's
  local layers; TE also fuses the norms, while the local layers, as without TE, also keep the norms' outputs). In
  the parameters' dtype (bf16 on GPUs; fp32 in the CPU check). Divided over TP with sequence parallelism. 1F1B
  keeps up to PP micro-batches in flight on the first stage. Full recompute keeps only each layer's input plus one
  layer's full set.
- **logits**: the last stage's ``[tokens, vocab / TP]`` fp32 logits, their softmax and gradient (3 copies) and the
  per-token log-prob buffers. With ``model.fused_logprobs`` no such tensor exists: one chunk's ``[C, vocab / TP]``
  temporaries (the op's chunk, :data:`FUSED_CHUNK_ELEMENTS` logits) and the last hidden states it keeps for the
  backward.
- **rollout engine** (SGLang colocated): ``rollout.sglang.mem_fraction`` of the GPU while it generates (weights and
  KV cache), on top of what the trainer keeps resident then: its weights, gradients and optimizer state, or nothing
  with ``rollout.offload_train`` (they wait in host memory). The engine releases its memory while the trainer
  trains; its weights come back for the weight sync, beside the trainer's resident state. The peak is the largest
  of the three phases.
- **FP8** (Transformer Engine): an FP8 copy of every GEMM weight (1 byte) and GEMM inputs saved in FP8.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nsr_megatron.models.arch import ArchSpec
from nsr_megatron.models.families import family

GiB = 1024**3
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# The fused log-prob op's chunk on GPUs, in logits (losses/fused_logprobs.py): its [C, vocab / TP] temporaries.
FUSED_CHUNK_ELEMENTS = 1 << 25
FUSED_TEMPORARIES = 3  # fp32 [C, vocab / TP] tensors alive at once in the op (logits, exp / probabilities, gradient)


@dataclass
class MemoryOptions:
    """The memory-saving options a plan assumes (each maps to a config key; ``from_config`` reads them)."""

    optimizer_offload: float = 0.0  # share of the optimizer state in host memory (optimizer.cpu_offload x fraction)
    precision_aware: bool = False  # optimizer.precision_aware: the dtypes below apply
    main_grads_bytes: int = 4  # the DDP gradient buffer (fp32: grad_reduce_in_fp32)
    main_params_bytes: int = 4
    exp_avg_bytes: int = 4
    exp_avg_sq_bytes: int = 4
    offload_train: bool = False  # rollout.offload_train: nothing of the trainer stays on the GPU while engines generate
    fused_logprobs: bool = False  # model.fused_logprobs: no [tokens, vocab / TP] logits
    engine_tp: int = 1  # rollout.sglang.tp_size: a colocated engine's weights are split over this many GPUs

    @classmethod
    def from_config(cls, config: Any) -> MemoryOptions:
        opt = config.optimizer
        aware = bool(opt.precision_aware) and not opt.cpu_offload  # the hybrid optimizer keeps fp32 moments
        b = {"fp32": 4, "bf16": 2, "fp16": 2}
        r = config.rollout
        colocated = r.backend == "sglang" and r.sglang.colocate and not r.urls
        offload_train = r.offload_train == "true" or (r.offload_train == "auto" and colocated)
        return cls(optimizer_offload=opt.offload_fraction if opt.cpu_offload else 0.0,
                   precision_aware=bool(opt.precision_aware),
                   main_grads_bytes=4,  # megatron DDP reduces gradients in fp32 (grad_reduce_in_fp32)
                   main_params_bytes=b[opt.main_params_dtype] if aware else 4,
                   exp_avg_bytes=b[opt.exp_avg_dtype] if aware else 4,
                   exp_avg_sq_bytes=b[opt.exp_avg_sq_dtype] if aware else 4,
                   offload_train=offload_train, fused_logprobs=bool(config.model.fused_logprobs),
                   engine_tp=r.sglang.tp_size)

    def describe(self) -> str:
        aware = ("off" if not self.precision_aware else "on (in the hybrid optimizer: fp32 moments on the host, no "
                 "fp32 master shards on the GPU)" if self.optimizer_offload else
                 f"on (main params {self.main_params_bytes} B, moments {self.exp_avg_bytes} + "
                 f"{self.exp_avg_sq_bytes} B, through TE's fused Adam)")
        return (f"optimizer.cpu_offload={'on, ' + format(self.optimizer_offload, 'g') + ' of the state' if self.optimizer_offload else 'off'}; "
                f"optimizer.precision_aware={aware}; rollout.offload_train={'on' if self.offload_train else 'off'}; "
                f"model.fused_logprobs={'on' if self.fused_logprobs else 'off'}")


@dataclass
class ParamCounts:
    """Parameter counts of the whole model (global, unsharded)."""

    total: int
    active: int  # used per token: attention, dense MLPs, the k routed experts, embeddings and output layer
    embedding: int
    output: int  # 0 when tied to the embedding
    attention_per_layer: int
    dense_mlp_per_layer: int
    experts_per_layer: int  # all experts of one MoE layer
    router_per_layer: int
    norms_per_layer: int


def count_parameters(arch: ArchSpec) -> ParamCounts:
    """The model's parameters, from its family's per-layer counts."""
    fam = family(arch.model_type)
    h = arch.hidden_size
    attention = fam.attention_parameters(arch)
    norms = fam.norm_parameters(arch)
    dense_mlp = fam.dense_mlp_parameters(arch)
    one_expert = fam.expert_parameters(arch)
    experts = arch.num_experts * one_expert
    router = fam.router_parameters(arch)
    embedding = arch.vocab_size * h
    output = 0 if arch.tie_word_embeddings else arch.vocab_size * h
    moe_layers = sum(arch.moe_layers) if arch.is_moe else 0
    dense_layers = arch.num_layers - moe_layers
    total = (embedding + output + h + arch.num_layers * (attention + norms)
             + moe_layers * (experts + router) + dense_layers * dense_mlp)
    active = (embedding + output + h + arch.num_layers * (attention + norms)
              + moe_layers * (arch.moe_topk * one_expert + router) + dense_layers * dense_mlp)
    return ParamCounts(total=total, active=active, embedding=embedding, output=output, attention_per_layer=attention,
                       dense_mlp_per_layer=dense_mlp, experts_per_layer=experts, router_per_layer=router,
                       norms_per_layer=norms)


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    world: int = 1
    sequence_parallel: bool = False

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def expert_dp(self) -> int:
        return self.world // (self.ep * self.etp * self.pp)


@dataclass
class Plan:
    """One GPU's memory (bytes) on the worst pipeline stage, by part."""

    layout: Layout
    params: ParamCounts
    parts: dict[str, float] = field(default_factory=dict)  # resident while training
    stage: int = 0  # the pipeline stage these parts are of (the one with the highest training peak)
    rollout_share: float = 0.0  # the colocated engine's share while it generates (released while training)
    engine_weights: float = 0.0  # the colocated engine's weights, back on the GPU for the weight sync
    options: MemoryOptions = field(default_factory=MemoryOptions)
    host_optimizer: float = 0.0  # bytes of optimizer state this GPU's rank keeps in host memory (cpu_offload)
    activations_without_recompute: float = 0.0
    activations_with_recompute: float = 0.0
    fp8_note: str = ""

    @property
    def training_peak(self) -> float:
        return sum(self.parts.values())

    @property
    def resident(self) -> float:  # the trainer's state between steps: weights, gradients, optimizer state
        return sum(v for k, v in self.parts.items() if k in ("parameters", "gradients", "optimizer", "fp8 weights"))

    @property
    def while_generating(self) -> float:
        """The GPU while a colocated engine generates: its share, plus the trainer's resident state unless
        ``rollout.offload_train`` moved it to host memory."""
        if not self.rollout_share:
            return 0.0
        return self.rollout_share + (0.0 if self.options.offload_train else self.resident)

    @property
    def weight_sync(self) -> float:
        """The GPU during the weight sync of a colocated engine: the trainer's state and the engine's weights."""
        return self.resident + self.engine_weights if self.rollout_share else 0.0

    @property
    def peak(self) -> float:
        return max(self.training_peak, self.while_generating, self.weight_sync)

    @property
    def largest(self) -> tuple[str, float]:
        """The largest single term of the peak phase's parts."""
        return max(self.parts.items(), key=lambda kv: kv[1])


def _stage_layers(arch: ArchSpec, pp: int) -> list[list[int]]:
    per = arch.num_layers // pp
    return [list(range(s * per, (s + 1) * per)) for s in range(pp)]


def plan_memory(arch: ArchSpec, layout: Layout, *, params_dtype: str, micro_batch_tokens: int,
                recompute: str = "", fp8: bool = False, te: bool = True,
                colocated_fraction: float = 0.0, gpu_bytes: float = 0.0,
                options: MemoryOptions | None = None) -> Plan:
    """The memory plan of ``arch`` under ``layout`` with ``micro_batch_tokens`` tokens per micro-batch (attention
    is flash attention, so no term grows with the sequence length) and the memory ``options``."""
    o = options or MemoryOptions()
    counts = count_parameters(arch)
    pbytes = _BYTES[params_dtype]
    tp, pp, ep, etp = layout.tp, layout.pp, layout.ep, layout.etp
    h = arch.hidden_size
    worst: dict[str, float] = {}
    worst_total = -1.0
    best_act: tuple[float, float] = (0.0, 0.0)
    worst_stage = 0
    host_opt = 0.0
    for stage, layers in enumerate(_stage_layers(arch, pp)):
        dense_params = 0.0  # split over TP, reduced over the data-parallel ranks
        expert_params = 0.0  # split over EP x ETP, reduced over the expert-data-parallel ranks
        for layer in layers:
            dense_params += (counts.attention_per_layer / tp + counts.norms_per_layer)
            if arch.is_moe and arch.moe_layers[layer]:
                expert_params += counts.experts_per_layer / (ep * etp)
                dense_params += counts.router_per_layer
            else:
                dense_params += counts.dense_mlp_per_layer / tp
        if stage == 0:
            dense_params += counts.embedding / tp
        if stage == pp - 1:
            dense_params += (counts.output if counts.output or pp > 1 else 0) / tp + h  # final norm
        n = dense_params + expert_params
        grads = o.main_grads_bytes * n
        shard = dense_params / layout.dp + expert_params / layout.expert_dp  # this rank's optimizer shard
        sixteen = pbytes < 4  # bf16/fp16 parameters have master copies
        f = o.optimizer_offload
        # On the device: the share left there (without offload Transformer Engine's fused Adam honours the
        # precision-aware dtypes; megatron's hybrid optimizer runs fp32 AdamW on both of its shares), and for the
        # offloaded share the distributed optimizer's fp32 master shards of 16-bit parameters, which the
        # precision-aware path leaves to the host copy.
        kept = (o.exp_avg_bytes + o.exp_avg_sq_bytes + (o.main_params_bytes if sixteen else 0) if not f
                else (1.0 - f) * (8 + (4 if sixteen else 0)))
        opt = shard * (kept + f * (4 if sixteen and not o.precision_aware else 0))
        host = shard * f * (4 + 8)  # the hybrid optimizer's fp32 copy and fp32 moments of the offloaded share
        act_full, act_rc = _activations(arch, layers, layout, micro_batch_tokens, fp8=fp8,
                                        in_flight=pp - stage, act_bytes=pbytes, te=te)
        parts = {"parameters": pbytes * n, "gradients": grads, "optimizer": opt,
                 "activations": act_rc if recompute == "full" else act_full}
        if fp8:
            gemm = n - sum(counts.norms_per_layer for _ in layers) - (counts.embedding / tp if stage == 0 else 0)
            parts["fp8 weights"] = 1.0 * gemm
        if stage == pp - 1:
            parts["logits"] = _logits_bytes(arch, layout, micro_batch_tokens, pbytes, o.fused_logprobs)
        total = sum(parts.values())
        if total > worst_total:
            worst, worst_total, best_act, worst_stage = parts, total, (act_full, act_rc), stage
            host_opt = host
    plan = Plan(layout=layout, params=counts, parts=worst, stage=worst_stage,
                activations_without_recompute=best_act[0], activations_with_recompute=best_act[1], options=o,
                host_optimizer=host_opt)
    plan.rollout_share = colocated_fraction * gpu_bytes
    if colocated_fraction:
        plan.engine_weights = 2.0 * counts.total / max(1, o.engine_tp)  # bf16 weights, split over the engine's GPUs
    if fp8:
        plan.fp8_note = "FP8: +1 byte per GEMM weight (its FP8 copy); GEMM inputs saved in FP8 (1 byte, not 2)"
    return plan


def _logits_bytes(arch: ArchSpec, layout: Layout, tokens: int, pbytes: int, fused: bool) -> float:
    """The last stage's log-prob memory for ``tokens`` tokens: three fp32 ``[tokens, vocab / TP]`` copies (logits,
    softmax, gradient) and six per-token buffers; fused, one chunk's temporaries and the gathered last hidden
    states the op keeps for its backward."""
    v = arch.vocab_size / layout.tp
    per_token = tokens * 4 * 6
    if not fused:
        return tokens * v * 4 * 3 + per_token
    chunk = min(tokens, max(1, int(FUSED_CHUNK_ELEMENTS // v)))
    return chunk * v * 4 * FUSED_TEMPORARIES + tokens * arch.hidden_size * pbytes + per_token


def _activations(arch: ArchSpec, layers: list[int], layout: Layout, tokens: int, *, fp8: bool,
                 in_flight: int, act_bytes: int = 2, te: bool = True) -> tuple[float, float]:
    """(without recompute, with full recompute) activation bytes of one pipeline stage."""
    fam = family(arch.model_type)
    h, a = arch.hidden_size, act_bytes  # bytes of an activation (the parameters' dtype)
    g = 1 if fp8 else a  # bytes of a saved GEMM input
    sp = layout.tp if layout.sequence_parallel else 1
    per_layer = [fam.layer_activations(arch, layer, act_bytes=a, gemm_bytes=g, tp=layout.tp, sp=sp, etp=layout.etp,
                                       te=te) for layer in layers]  # per token
    full = tokens * sum(per_layer) * in_flight
    recompute = tokens * (len(layers) * h * a / sp * in_flight + max(per_layer))
    return full, recompute


def fits(plan: Plan, gpu_bytes: float, headroom: float = 0.9) -> bool:
    """Whether the peak fits in ``headroom`` of the GPU (the rest: CUDA context, NCCL buffers, fragmentation)."""
    return plan.peak <= headroom * gpu_bytes


def candidate_layouts(arch: ArchSpec, world: int) -> list[Layout]:
    """Layouts that divide the model and ``world``: tp | heads and kv heads, pp | layers, ep | experts."""
    out = []
    for tp in (1, 2, 4, 8):
        if arch.num_heads % tp or arch.num_kv_heads % tp or arch.vocab_size % tp or world % tp:
            continue
        for pp in (1, 2, 4, 8, 16):
            if arch.num_layers % pp or world % (tp * pp):
                continue
            for ep in ((1, 2, 4, 8, 16, 32, 64) if arch.is_moe else (1,)):
                if arch.is_moe and arch.num_experts % ep:
                    continue
                if world % (ep * tp * pp):  # expert TP = TP here
                    continue
                out.append(Layout(tp=tp, pp=pp, ep=ep, etp=tp, world=world, sequence_parallel=tp > 1))
    return out


def describe(plan: Plan, gpu_bytes: float) -> list[str]:
    """The plan as lines of text."""
    p, lay = plan.params, plan.layout
    lines = [f"model: {p.total / 1e9:.2f}B parameters, {p.active / 1e9:.2f}B active per token",
             f"layout: tp={lay.tp} pp={lay.pp} ep={lay.ep} etp={lay.etp} on {lay.world} GPUs (dp={lay.dp}, "
             f"expert dp={lay.expert_dp}); per GPU, worst pipeline stage:"]
    for name, value in plan.parts.items():
        lines.append(f"  {name:<22} {value / GiB:8.2f} GiB")
    lines.append(f"  {'(activations, no recompute / full recompute':<22} {plan.activations_without_recompute / GiB:.2f}"
                 f" / {plan.activations_with_recompute / GiB:.2f} GiB)")
    lines.append(f"  {'training peak':<22} {plan.training_peak / GiB:8.2f} GiB")
    if plan.rollout_share:
        kept = ("nothing of the trainer's (rollout.offload_train: its state waits in host memory)"
                if plan.options.offload_train else
                f"{plan.resident / GiB:.2f} GiB of the trainer's weights, gradients and optimizer state")
        lines.append(f"  {'while generating':<22} {plan.while_generating / GiB:8.2f} GiB: the engine's "
                     f"{plan.rollout_share / GiB:.2f} GiB and {kept}")
        lines.append(f"  {'weight sync':<22} {plan.weight_sync / GiB:8.2f} GiB: the trainer's state and the engine's "
                     f"{plan.engine_weights / GiB:.2f} GiB of weights")
    if plan.rollout_share and plan.options.offload_train:
        lines.append(f"  {'(host memory)':<22} {plan.resident / GiB:8.2f} GiB of training state per GPU while the engine "
                     "generates (rollout.offload_train)")
    if plan.host_optimizer:
        lines.append(f"  {'(host memory)':<22} {plan.host_optimizer / GiB:8.2f} GiB of optimizer state per GPU "
                     "(optimizer.cpu_offload)")
    if plan.fp8_note:
        lines.append(f"  {plan.fp8_note}")
    name, value = plan.largest
    lines.append(f"  {'largest term':<22} {name}, {value / GiB:.2f} GiB")
    lines.append(f"  {'peak':<22} {plan.peak / GiB:8.2f} GiB of {gpu_bytes / GiB:.0f} GiB")
    lines.append(f"options: {plan.options.describe()}")
    return lines


def plan_from_config(config: Any, arch: ArchSpec, world: int, gpu_bytes: float, layout: Layout | None = None) -> Plan:
    """The plan of a run config (``Config``) for ``world`` GPUs of ``gpu_bytes`` each."""
    par = config.parallel
    lay = layout or Layout(tp=par.tp, pp=par.pp, ep=par.ep, etp=par.etp or par.tp, world=world,
                           sequence_parallel=par.sequence_parallel)
    # A sample: the longest prompt the data allows (1024 tokens when data.max_prompt_tokens is unset) and the
    # longest response. A micro-batch packs samples up to algorithm.max_tokens_per_micro_batch, at least one.
    seq = min(arch.max_position_embeddings, (config.data.max_prompt_tokens or 1024) + config.rollout.max_new_tokens)
    tokens = max(config.algorithm.max_tokens_per_micro_batch, seq)
    colocated = config.rollout.backend == "sglang" and config.rollout.sglang.colocate and not config.rollout.urls
    return plan_memory(arch, lay, params_dtype=config.model.params_dtype, micro_batch_tokens=tokens,
                       recompute=config.model.recompute,
                       fp8=bool(config.model.fp8), te=config.model.transformer_impl != "local",
                       colocated_fraction=config.rollout.sglang.mem_fraction if colocated else 0.0,
                       gpu_bytes=gpu_bytes, options=MemoryOptions.from_config(config))


# Options ``suggest`` may turn on: (override, whether it is off in a config and may be turned on there).
_SWITCHES: list[tuple[str, Any]] = [
    ("model.fused_logprobs=true", lambda c: not c.model.fused_logprobs),
    ("model.recompute=full", lambda c: c.model.recompute != "full"),
    ("optimizer.cpu_offload=true", lambda c: not c.optimizer.cpu_offload),
    ("optimizer.precision_aware=true", lambda c: not c.optimizer.precision_aware),
    ("rollout.offload_train=true", lambda c: c.rollout.offload_train != "true" and c.rollout.backend == "sglang"
     and c.rollout.sglang.colocate and not c.rollout.urls),
]


def suggest(config: Any, arch: ArchSpec, world: int, gpu_bytes: float) -> str:
    """The fitting settings nearest the config's, as overrides: the fewest changed settings (layout sizes and the
    memory options of ``_SWITCHES`` turned on), then the lowest peak. Empty when nothing fits."""
    import itertools

    from nsr_megatron.config import apply_overrides, from_dict, to_dict

    par = config.parallel
    now = (par.tp, par.pp, par.ep)
    switches = [text for text, off in _SWITCHES if off(config)]
    best: tuple[int, float, str] | None = None
    for k in range(len(switches) + 1):
        for chosen in itertools.combinations(switches, k):
            changed = from_dict(type(config), apply_overrides(to_dict(config), list(chosen))) if chosen else config
            for lay in [None, *candidate_layouts(arch, world)]:  # the config's own layout first
                c = plan_from_config(changed, arch, world, gpu_bytes, layout=lay)
                if not fits(c, gpu_bytes):
                    continue
                lay = c.layout
                moved = sum(a != b for a, b in zip(now, (lay.tp, lay.pp, lay.ep), strict=True))
                layout = (f"parallel.tp={lay.tp} parallel.pp={lay.pp} parallel.ep={lay.ep} parallel.etp={lay.etp} "
                          f"parallel.sequence_parallel={str(lay.sequence_parallel).lower()}") if moved else ""
                text = " ".join(x for x in (layout, *chosen) if x) + f" (peak {c.peak / GiB:.1f} GiB)"
                if best is None or (moved + k, c.peak) < best[:2]:
                    best = (moved + k, c.peak, text)
    return best[2] if best else ""
