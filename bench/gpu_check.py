"""The GPU check: a few minutes on one NVIDIA GPU that measure what the CPU machines cannot.

Parts (each one's result, or its error, goes into the JSON; one failing part does not stop the others):

1. ``env``: torch, CUDA, the GPU, megatron-core and transformers versions.
2. ``layouts``: the megatron-core policy on CUDA (NCCL, world size 1) against the Hugging Face model's logits, fp32
   and bf16, on a tiny Qwen3-MoE; with two or more GPUs also ``torchrun`` smoke runs under TP=2 + sequence
   parallel and EP=2 (NCCL refuses two ranks on one GPU, so one GPU runs world size 1 only).
3. ``rl``: the quickstart RL loop on CUDA (embedded engine and trainer on the GPU): learned or not, step time.
4. ``train``: bf16 forward+backward+optimizer tokens/s of a 1.16B-parameter Qwen3-MoE (random tokens, the ``smoke``
   command) and its MFU: 6 x active parameters + attention FLOPs per token, over the GPU's dense bf16 peak.
5. ``logprob_op``: the loss's log-prob + entropy op (:func:`nsr_megatron.losses.vocab_parallel_logprobs_entropy`)
   forward+backward at [8192 x 151936] bf16 logits (Qwen3's vocabulary), against ``log_softmax`` + ``gather``:
   milliseconds and peak memory.
6. ``engine``: the embedded rollout engine on CUDA (static and dynamic KV cache) against ``transformers``'
   ``generate``: tokens/s.
7. ``memory``: the planner against the GPU. Qwen3-30B-A3B's real widths (hidden 2048, 128 experts of 768, top-8,
   vocabulary 151,936) with as few layers as one GPU holds (2), bf16, one training step per variant in a fresh
   process: measured peak (``torch.cuda.max_memory_allocated``) against the plan's training peak with optimizer
   offload off and on, and with the fused log-probs off and on; the bytes ``rollout.offload_train`` frees; and the
   fused log-prob op against the logits op at 8192 tokens x 151,936 (peak memory, milliseconds).

Usage (what ``bench/gpu_check.sh`` runs): ``python bench/gpu_check.py --out results.json``.
``--dry-run`` runs every part at toy sizes on the CPU (a check of the script itself, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 peak of the GPUs the recipes target (TFLOP/s, without sparsity); others report no MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}

# 1.16B parameters (0.30B active per token, the output layer included): 16 layers, hidden 1024, 32 experts of 512, top-4, Qwen3's 151936 vocabulary.
MOE_1B = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=1024,
              intermediate_size=3072, moe_intermediate_size=512, num_hidden_layers=16, num_attention_heads=16,
              num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True,
              decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1000000.0,
              max_position_embeddings=4096, tie_word_embeddings=False, hidden_act="silu", attention_bias=False)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn`` (synchronized) over ``repeats`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cli(args: list[str], env: dict[str, str] | None = None, nproc: int = 1, timeout: int = 900) -> str:
    """Run the project's CLI (under torchrun when ``nproc`` > 1); its output, or an error with its tail."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1
                else [sys.executable])
    proc = subprocess.run([*launcher, "-m", "nsr_megatron.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------------- parts

def part_env(small: bool) -> dict[str, Any]:
    import megatron.core
    import torch
    import transformers

    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers":
                           transformers.__version__, "megatron_core": getattr(megatron.core, "__version__", "?"),
                           "gpus": torch.cuda.device_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                   multiprocessors=props.multi_processor_count)
    return out


def _layout_worker(hf_dir: str, out: str) -> None:
    """World size 1 on this machine's device: megatron's logits against the HF model's, fp32 and bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig, read_hf_config
    from nsr_megatron.convert.sharded import load_hf_sharded
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.trainer import actor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    arch = arch_from_hf(read_hf_config(hf_dir))
    state = parallel.initialize(ParallelConfig(), seed=1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (2, 32), generator=g)
    result: dict[str, Any] = {"backend": state.backend, "device": str(state.device)}
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(input_ids=tokens).logits.float()
    for dtype in ("fp32", "bf16"):
        bundle = build_model(arch, model=ModelConfig(hf_path=hf_dir, params_dtype=dtype), parallel=ParallelConfig(),
                             optimizer=OptimizerConfig())
        load_hf_sharded(bundle.module, arch, hf_dir)
        got = actor.forward_logits(bundle, [{"tokens": tokens.to(device), "targets": tokens.to(device)}])
        assert got is not None
        logits = got[0].float().cpu()
        result[f"{dtype}_rel_err"] = float((logits - want).norm() / want.norm())
    parallel.destroy()
    Path(out).write_text(json.dumps(result), encoding="utf-8")


def part_layouts(small: bool) -> dict[str, Any]:
    import torch

    from nsr_megatron.models.tiny import create_tiny_hf_checkpoint

    with tempfile.TemporaryDirectory() as d:
        hf_dir = create_tiny_hf_checkpoint(Path(d) / "tiny", seed=3)
        out = Path(d) / "layout.json"
        code = f"from bench.gpu_check import _layout_worker; _layout_worker({str(hf_dir)!r}, {str(out)!r})"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
        result: dict[str, Any] = {"world1": json.loads(out.read_text(encoding="utf-8"))}
        result["world1"]["fp32_ok"] = result["world1"]["fp32_rel_err"] < 1e-4
        result["world1"]["bf16_ok"] = result["world1"]["bf16_rel_err"] < 5e-2
        if torch.cuda.device_count() >= 2:
            for name, layout in {"tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
                                 "ep2": ["parallel.ep=2"]}.items():
                text = _cli(["smoke", "--no-progress", "run.steps=4", *layout], nproc=2)
                result[name] = re.findall(r"final loss [0-9.]+.*", text)[-1]
        else:
            result["multi_rank"] = "not run: one GPU (NCCL allows one rank per GPU)"
    return result


def part_rl(small: bool) -> dict[str, Any]:
    steps = 6 if small else 60
    with tempfile.TemporaryDirectory() as d:
        text = _cli(["quickstart", "--no-progress", f"run.run_dir={d}/run", f"run.steps={steps}",
                     "checkpoint.save_interval=0"])
        rows = [json.loads(line) for line in open(f"{d}/run/metrics.jsonl", encoding="utf-8")]
    verdict = next((line for line in text.splitlines() if line.startswith("train: ")), "")
    timing = {k: statistics.median(r[k] for r in rows[1:]) for k in rows[0] if k.startswith("timing/")}
    return {"steps": steps, "verdict": verdict, "reward_first5": statistics.fmean(r["reward/mean"] for r in rows[:5]),
            "reward_last5": statistics.fmean(r["reward/mean"] for r in rows[-5:]),
            "median_timing_s": timing}


def _flops_per_token(cfg: dict[str, Any], seq: int) -> tuple[float, float]:
    """(active parameters, training FLOPs per token): 6 x the active matmul parameters (the embedding lookup is
    free, the output layer is not) + 12 x layers x query width x sequence for attention (causal: half of it)."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    attn = h * q * 2 + h * kv * 2
    experts = cfg["num_experts_per_tok"] * 3 * h * cfg["moe_intermediate_size"] + h * cfg["num_experts"]
    active = layers * (attn + experts) + h * cfg["vocab_size"]
    return float(active), 6.0 * active + 6.0 * layers * q * seq


def part_train(small: bool) -> dict[str, Any]:
    import torch

    cfg = dict(MOE_1B)
    seq, mbs, gbs, steps = (2048, 4, 8, 8) if not small else (32, 2, 2, 3)
    if small:
        cfg.update(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                   num_experts_per_tok=2)
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    with tempfile.TemporaryDirectory() as d:
        Path(d, "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        text = _cli(["smoke", "--no-progress", f"model.hf_path={d}", f"model.params_dtype={dtype}",
                     f"batch.seq_length={seq}", f"batch.micro_batch_size={mbs}", f"batch.global_batch_size={gbs}",
                     f"run.steps={steps}"])
    rate = float(re.findall(r"throughput ([0-9.]+) tokens/s", text)[-1])
    params = re.findall(r"smoke: \S+ ([0-9.]+)M params", text)
    active, flops = _flops_per_token(cfg, seq)
    result: dict[str, Any] = {"dtype": dtype, "seq_length": seq, "micro_batch": mbs, "global_batch": gbs,
                              "total_params_M": float(params[0]) if params else None, "active_params_M": active / 1e6,
                              "tokens_per_s": rate, "model_tflops": rate * flops / 1e12}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        result["mfu"] = result["model_tflops"] / peak if peak else None
        result["peak_bf16_tflops"] = peak
    return result


def _time_and_peak(result: dict[str, Any], variants: dict[str, Callable[[], None]], small: bool) -> None:
    """``<name>_ms`` (median) and, on CUDA, ``<name>_peak_extra_gib`` (peak allocated above the start) of each
    variant, into ``result``."""
    import torch

    cuda = torch.cuda.is_available()
    for name, fn in variants.items():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        result[f"{name}_ms"] = _timed(fn, repeats=3 if small else 10) * 1e3
        if cuda:
            result[f"{name}_peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30


def part_logprob_op(small: bool) -> dict[str, Any]:
    import torch

    from nsr_megatron.losses import vocab_parallel_logprobs_entropy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, vocab = (8192, 151936) if not small else (64, 1000)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(tokens, vocab, device=device, dtype=dtype, generator=g).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=g)

    def ours() -> None:
        lp, ent = vocab_parallel_logprobs_entropy(logits, targets)
        (lp.sum() + ent.sum()).backward()
        logits.grad = None

    def plain() -> None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        lp = logp.gather(-1, targets[:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        (lp.sum() + ent.sum()).backward()
        logits.grad = None

    result: dict[str, Any] = {"shape": [tokens, vocab], "dtype": str(dtype)}
    _time_and_peak(result, {"ours": ours, "log_softmax_gather": plain}, small)
    with torch.no_grad():  # the two agree
        lp, ent = vocab_parallel_logprobs_entropy(logits, targets)
        logp = torch.log_softmax(logits.float(), dim=-1)
        result["max_abs_diff_logprob"] = float((lp.float() - logp.gather(-1, targets[:, None]).squeeze(-1)).abs().max())
    return result


def part_engine(small: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from nsr_megatron.models.tiny import tiny_moe_config
    from nsr_megatron.rollout import EmbeddedEngine, SamplingParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    values = tiny_moe_config()
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()
    prompts_n, n, new = (64, 8, 64) if not small else (4, 2, 8)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, config.vocab_size, (prompts_n, 16), generator=g)
    params = SamplingParams(max_new_tokens=new, temperature=1.0)
    engines = {kind: EmbeddedEngine.from_model(model, kv_cache=kind) for kind in ("static", "dynamic")}
    total = prompts_n * n * new
    result: dict[str, Any] = {"device": device, "batch": f"{prompts_n} prompts x {n} samples x {new} new tokens"}
    for kind, engine in engines.items():
        seconds = _timed(lambda engine=engine: engine.generate(prompts.tolist(), params, n=n, seed=0),
                         repeats=2 if small else 5, warmup=1)
        result[f"embedded_{kind}_tok_s"] = total / seconds

    def hf() -> None:
        with torch.inference_mode():
            model.generate(input_ids=prompts.to(device), attention_mask=torch.ones_like(prompts, device=device),
                           do_sample=True, num_return_sequences=n, max_new_tokens=new, min_new_tokens=new,
                           eos_token_id=None, pad_token_id=0)

    result["hf_generate_tok_s"] = total / _timed(hf, repeats=2 if small else 5, warmup=1)
    result["static_vs_hf"] = result["embedded_static_tok_s"] / result["hf_generate_tok_s"]
    return result


# Qwen3-30B-A3B's widths with 2 of its 48 layers (1.9B parameters: the embedding and output layer are most of the rest).
QWEN3_30B_2L = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
                    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=2,
                    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                    num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                    rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                    tie_word_embeddings=False, hidden_act="silu", attention_bias=False)


def _memory_worker(hf_dir: str, out: str, tokens: int, offload: bool, fused: bool) -> None:
    """One bf16 training step (two micro-batches) of the model in ``hf_dir`` at world size 1: the device's peak
    allocated bytes from before the model is built, and what train-state offload frees after the step."""
    import torch

    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig, read_hf_config
    from nsr_megatron.host_offload import HostOffload
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.state import train_state_tensors
    from nsr_megatron.trainer import actor

    arch = arch_from_hf(read_hf_config(hf_dir))
    state = parallel.initialize(ParallelConfig(), seed=1)
    cuda = state.device.type == "cuda"
    dtype = "bf16" if cuda else "fp32"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    from nsr_megatron.models.provider import build_model

    policy = build_model(arch, model=ModelConfig(hf_path=hf_dir, params_dtype=dtype, fused_logprobs=fused,
                                                 transformer_impl="local"),
                         parallel=ParallelConfig(), optimizer=OptimizerConfig(lr=1e-5, cpu_offload=offload))
    g = torch.Generator().manual_seed(0)
    micro = []
    for _ in range(2):
        t = torch.randint(0, arch.vocab_size, (1, tokens), generator=g)
        micro.append({"tokens": t, "targets": t[:, 1:].clone()})

    def loss(output: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lp, _ = actor._next_token_logprobs(output, batch["targets"].to(state.device), group=None, temperature=1.0)
        return -lp.mean(), {}

    _, grad_norm = actor.train_step(policy, micro, actor.HeadLoss(loss), lr=1e-5)
    result: dict[str, Any] = {"grad_norm": grad_norm, "device": str(state.device)}
    if cuda:
        torch.cuda.synchronize()
        result["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        before = torch.cuda.memory_allocated()
        off = HostOffload(state.device)
        result["offload_train_freed_bytes"] = off.offload(train_state_tensors(policy.module, policy.optimizer))
        result["allocated_after_offload_bytes"] = torch.cuda.memory_allocated() - base
        result["allocated_before_offload_bytes"] = before - base
        off.onload()
    parallel.destroy()
    Path(out).write_text(json.dumps(result), encoding="utf-8")


def part_memory(small: bool) -> dict[str, Any]:
    import torch

    from nsr_megatron.config import read_hf_config
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.memory import Layout, MemoryOptions, plan_memory

    cfg = dict(QWEN3_30B_2L)
    tokens = 8192
    if small:
        cfg.update(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)
        tokens = 64
    result: dict[str, Any] = {"config": {k: cfg[k] for k in ("hidden_size", "num_experts", "num_hidden_layers",
                                                             "vocab_size")}, "tokens_per_micro_batch": tokens}
    with tempfile.TemporaryDirectory() as d:
        Path(d, "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        arch = arch_from_hf(read_hf_config(d))
        for offload in (False, True):
            for fused in (False, True):
                name = f"offload_{'on' if offload else 'off'}_fused_{'on' if fused else 'off'}"
                out = Path(d) / f"{name}.json"
                code = (f"from bench.gpu_check import _memory_worker; "
                        f"_memory_worker({d!r}, {str(out)!r}, {tokens}, {offload}, {fused})")
                proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                      timeout=900)
                if proc.returncode != 0:
                    result[name] = {"error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}
                    continue
                got = json.loads(out.read_text(encoding="utf-8"))
                plan = plan_memory(arch, Layout(world=1), params_dtype="bf16" if torch.cuda.is_available() else "fp32",
                                   micro_batch_tokens=tokens, te=False,
                                   options=MemoryOptions(optimizer_offload=1.0 if offload else 0.0,
                                                         fused_logprobs=fused))
                got["planned_training_peak_bytes"] = plan.training_peak
                got["planned_resident_bytes"] = plan.resident
                if "peak_bytes" in got:
                    got["measured_over_planned"] = got["peak_bytes"] / plan.training_peak
                    got["freed_over_planned_resident"] = got["offload_train_freed_bytes"] / plan.resident
                result[name] = got
    result["fused_op"] = _fused_op_compare(small)
    return result


def _fused_op_compare(small: bool) -> dict[str, Any]:
    """The fused log-prob op (hidden states and output weight in) against the logits GEMM + the logits op, forward
    and backward, at 8192 tokens x 151,936 (bf16 on CUDA): peak extra memory and milliseconds."""
    import torch

    from nsr_megatron.losses import fused_logprobs_entropy, vocab_parallel_logprobs_entropy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, vocab, hidden = (8192, 151936, 2048) if not small else (64, 1000, 32)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g) * 0.5).requires_grad_(True)
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype, generator=g) * 0.05).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=g)

    def old() -> None:
        lp, ent = vocab_parallel_logprobs_entropy(h @ w.T, targets)
        (lp.sum() + ent.sum()).backward()
        h.grad = w.grad = None

    def fused() -> None:
        lp, ent = fused_logprobs_entropy(h, w, targets)
        (lp.sum() + ent.sum()).backward()
        h.grad = w.grad = None

    result: dict[str, Any] = {"shape": [tokens, vocab, hidden], "dtype": str(dtype)}
    _time_and_peak(result, {"old": old, "fused": fused}, small)
    result["time_ratio"] = result["fused_ms"] / result["old_ms"]
    if device == "cuda":
        result["memory_ratio"] = result["fused_peak_extra_gib"] / result["old_peak_extra_gib"]
    with torch.no_grad():
        a, _ = fused_logprobs_entropy(h, w, targets)
        b, _ = vocab_parallel_logprobs_entropy(h @ w.T, targets)
        result["max_abs_diff_logprob"] = float((a - b).abs().max())
    return result


PARTS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "env": part_env, "layouts": part_layouts, "rl": part_rl, "train": part_train, "logprob_op": part_logprob_op,
    "engine": part_engine, "memory": part_memory}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json", help="JSON of the results (default: %(default)s)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes, CPU allowed: checks the script, measures "
                    "nothing")
    args = ap.parse_args()
    if not args.dry_run and not _cuda():
        print("gpu_check: no CUDA device; run it on a GPU machine, or pass --dry-run to check the script here",
              file=sys.stderr)
        return 2
    results: dict[str, Any] = {"dry_run": args.dry_run, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    failed = []
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            results[name] = PARTS[name](args.dry_run)
        except Exception as exc:  # a failed part is recorded; the others still run
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            failed.append(name)
        results[name]["seconds"] = time.perf_counter() - t0
        Path(args.out).write_text(json.dumps(results, indent=1), encoding="utf-8")  # what finished survives a kill
        shown = {k: v for k, v in results[name].items() if k != "traceback"}
        print(f"gpu_check {name}: {json.dumps(shown)[:1500]}", flush=True)
    print(f"gpu_check: wrote {args.out}; failed parts: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
