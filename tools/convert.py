"""HF <-> Megatron-Core checkpoint conversion for nsr-megatron (any TP / PP / EP layout).

Usage::

    # HF folder -> CKPT/step_00000000 (loads under any TP/PP/EP/expert-TP the model allows)
    python tools/convert.py hf-to-mcore --hf-dir HF --out CKPT [--dtype auto|bf16|fp32|fp16] [--force]

    # checkpoint (a step_* folder, or a root whose newest complete step_* is used; converted or
    # saved by training under any layout) -> HF safetensors shards + index + config + tokenizer
    python tools/convert.py mcore-to-hf --ckpt CKPT --out HF2 [--hf-config HF] [--dtype ...] [--max-shard-size 4GB]

    # run the HF model and the megatron model (under the given layout) on the same random tokens
    python tools/convert.py verify --hf-dir HF --ckpt CKPT [--tp N --pp N --ep N --etp N] [--tol 1e-3]

``verify`` with a layout of more than one process spawns its own gloo (CPU) / NCCL (GPU) workers
on this machine (world size = lcm(tp*pp, ep*etp*pp)); launched under ``torchrun`` instead it uses
the processes torchrun started. It prints the largest logit and log-prob differences and exits 1
when either exceeds ``--tol``. Errors in the inputs print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2


def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*CPU RNG state changed within GPU RNG context.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * scale)
    if t.isdigit():
        return int(t)
    raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4GB, 500MB or 1000000")


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A ``step_*`` folder as given, or the newest complete one under a checkpoint root."""
    from nsr_megatron.convert import ConvertError
    from nsr_megatron.convert.io import META_FILE, latest_checkpoint

    p = Path(path)
    if (p / META_FILE).is_file() or (p / ".metadata").is_file():
        return p
    if not p.exists():
        raise ConvertError(f"--ckpt {p} does not exist.")
    latest = latest_checkpoint(p)
    if latest is None:
        raise ConvertError(
            f"--ckpt {p} holds no complete checkpoint (no {META_FILE}, no step_* folder with one); pass a "
            "step_* folder written by save_checkpoint or hf-to-mcore, or the root that contains them."
        )
    return latest


# ------------------------------------------------------------------------------------------------
# hf-to-mcore / mcore-to-hf
# ------------------------------------------------------------------------------------------------
def cmd_hf_to_mcore(args: argparse.Namespace) -> int:
    from nsr_megatron.convert import hf_to_mcore, parse_dtype

    step = hf_to_mcore(
        args.hf_dir,
        args.out,
        dtype=parse_dtype(args.dtype),
        step=args.step,
        overwrite=args.force,
        progress=not args.no_progress,
    )
    print(f"wrote {step} (load it with load_checkpoint({str(step)!r}, model) under any layout)")
    return 0


def cmd_mcore_to_hf(args: argparse.Namespace) -> int:
    from nsr_megatron.convert import mcore_to_hf, parse_dtype

    step = resolve_checkpoint(args.ckpt)
    out = mcore_to_hf(
        step,
        args.out,
        hf_config=args.hf_config,
        dtype=parse_dtype(args.dtype),
        max_shard_bytes=args.max_shard_size,
        overwrite=args.force,
        progress=not args.no_progress,
    )
    print(f"wrote {out} from {step}")
    return 0


# ------------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------------
def _layout(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "tp": args.tp,
        "pp": args.pp,
        "ep": args.ep,
        "etp": args.etp or args.tp,
        "sequence_parallel": args.tp > 1,
    }


def _world(layout: dict[str, Any]) -> int:
    return math.lcm(layout["tp"] * layout["pp"], layout["ep"] * layout["etp"] * layout["pp"])


def _tokens(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf_dir: str, hf_class: str, tokens: torch.Tensor) -> torch.Tensor:
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = getattr(transformers, hf_class).from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.to(device).eval()
    with torch.no_grad():
        return model(tokens.to(device)).logits.float().cpu()  # [B, S, V]


def compare_logits(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Largest absolute differences of logits and of log-probs (log_softmax over the vocabulary)."""
    return {
        "max_logit_diff": float((got - ref).abs().max()),
        "max_logprob_diff": float((got.log_softmax(-1) - ref.log_softmax(-1)).abs().max()),
        "max_abs_logit": float(ref.abs().max()),
    }


def verify_worker(
    rank: int, world: int, init_method: str | None, opts: dict[str, Any]
) -> dict[str, Any] | None:
    """One process of ``verify``: build the model under the layout (the model provider), load its shards of the
    checkpoint (the converter), run the tokens; the reporting rank (last stage, first TP / DP rank) then runs the
    HF model (its family's class) and compares."""
    _quiet()
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, ParallelConfig, read_hf_config
    from nsr_megatron.convert.sharded import load_mcore_sharded
    from nsr_megatron.models.families import family
    from nsr_megatron.models.hf_config import arch_from_hf, validate_layout
    from nsr_megatron.models.provider import build_model, forward_logits

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    par = ParallelConfig(**opts["layout"])
    model_cfg = ModelConfig(transformer_impl="local" if not torch.cuda.is_available() else "auto")
    arch = arch_from_hf(read_hf_config(opts["config_dir"]))
    validate_layout(arch, model_cfg, par, world)
    parallel.initialize(par, seed=opts["seed"], rank=rank, world_size=world, init_method=init_method)
    try:
        bundle = build_model(arch, model=model_cfg, parallel=par, role="reference")
        load_mcore_sharded(bundle.module, arch, opts["ckpt"])
        tokens = _tokens(arch.vocab_size, opts["batch"], opts["seq_len"], opts["seed"])
        logits = forward_logits(bundle, tokens)
        del bundle
        reporter = (
            logits is not None
            and mpu.get_tensor_model_parallel_rank() == 0
            and mpu.get_data_parallel_rank() == 0
        )
        result = None
        if reporter:
            assert logits is not None
            result = compare_logits(logits.cpu(), _hf_logits(opts["hf_dir"], family(arch.model_type).hf_class, tokens))
            result["failed"] = (
                result["max_logit_diff"] > opts["tol"] or result["max_logprob_diff"] > opts["tol"]
            )
            if opts.get("result_file"):
                with open(opts["result_file"], "w", encoding="utf-8") as f:
                    json.dump(result, f)
        failed = torch.tensor([1 if result and result["failed"] else 0])
        dist.all_reduce(failed)
        if result is None:
            result = {"failed": bool(failed.item())}
        return result
    finally:
        parallel.destroy()


def _spawn_entry(rank: int, world: int, init_file: str, opts: dict[str, Any]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    verify_worker(rank, world, f"file://{init_file}", opts)


def cmd_verify(args: argparse.Namespace) -> int:
    from nsr_megatron.config import ModelConfig, ParallelConfig, read_hf_config
    from nsr_megatron.convert import ConvertError
    from nsr_megatron.models.hf_config import arch_from_hf, validate_layout

    step = resolve_checkpoint(args.ckpt)
    layout = _layout(args)
    if layout["tp"] > 1 and args.seq_len % layout["tp"]:
        raise ConvertError(
            f"--seq-len {args.seq_len} must be a multiple of --tp {layout['tp']} (sequence parallelism)."
        )
    torchrun_world = int(os.environ.get("WORLD_SIZE", "0")) if "LOCAL_RANK" in os.environ else 0
    world = torchrun_world or _world(layout)
    arch = arch_from_hf(read_hf_config(args.hf_dir))
    validate_layout(arch, ModelConfig(transformer_impl="local"), ParallelConfig(**layout), world)
    opts = {
        "layout": layout,
        "hf_dir": str(args.hf_dir),
        "ckpt": str(step),
        "config_dir": str(args.hf_dir),
        "seed": args.seed,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tol": args.tol,
    }
    if os.environ.get("RANK", "0") == "0":
        print(
            f"verify: {step} vs {args.hf_dir} under tp={layout['tp']} pp={layout['pp']} ep={layout['ep']} "
            f"etp={layout['etp']} ({world} process{'es' if world > 1 else ''}), tokens [{args.batch}, {args.seq_len}]"
        )
    with tempfile.TemporaryDirectory() as scratch:
        if torchrun_world:  # every rank runs here; the reporting rank prints
            result = verify_worker(int(os.environ["RANK"]), world, None, opts)
        elif world == 1:
            result = verify_worker(0, 1, f"file://{os.path.join(scratch, 'init')}", opts)
        else:
            import torch.multiprocessing as mp

            opts["result_file"] = os.path.join(scratch, "result.json")
            mp.spawn(_spawn_entry, args=(world, os.path.join(scratch, "init"), opts), nprocs=world, join=True)
            with open(opts["result_file"], encoding="utf-8") as f:
                result = json.load(f)
    return _report(result, args.tol)


def _report(result: dict[str, Any] | None, tol: float) -> int:
    if result is None or "max_logit_diff" not in result:  # a torchrun rank that does not report
        return EXIT_MISMATCH if result and result["failed"] else 0
    print(f"max |logit diff|   = {result['max_logit_diff']:.3e}  (max |logit| {result['max_abs_logit']:.3e})")
    print(f"max |logprob diff| = {result['max_logprob_diff']:.3e}")
    if result["failed"]:
        print(f"FAILED: a difference exceeds --tol {tol:g}", file=sys.stderr)
        return EXIT_MISMATCH
    print(f"OK (tolerance {tol:g})")
    return 0


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    dtypes = ["auto", "bf16", "fp32", "fp16"]

    a = sub.add_parser("hf-to-mcore", help="HF safetensors folder -> megatron dist checkpoint")
    a.add_argument("--hf-dir", required=True, help="HF checkpoint folder (config.json + safetensors)")
    a.add_argument("--out", required=True, help="checkpoint root; writes OUT/step_<step>/")
    a.add_argument(
        "--dtype", default="auto", choices=dtypes, help="cast the weights (auto: keep the stored dtype)"
    )
    a.add_argument("--step", type=int, default=0, help="step number of the written folder (default 0)")
    a.add_argument("--force", action="store_true", help="replace an existing OUT/step_<step>/")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(fn=cmd_hf_to_mcore)

    b = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint (any layout) -> HF safetensors folder")
    b.add_argument(
        "--ckpt", required=True, help="a step_* folder, or a root (its newest complete step_* is used)"
    )
    b.add_argument("--out", required=True, help="HF output folder")
    b.add_argument(
        "--hf-config",
        default=None,
        help="HF folder or config.json of the model (default: the copy recorded by hf-to-mcore, or the "
        "training run's model.hf_path)",
    )
    b.add_argument("--dtype", default="auto", choices=dtypes, help="output dtype (auto: config.json's dtype)")
    b.add_argument("--max-shard-size", type=_size, default="4GB", help="largest output shard (default 4GB)")
    b.add_argument("--force", action="store_true", help="replace weights already in --out")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(fn=cmd_mcore_to_hf)

    c = sub.add_parser("verify", help="compare logits of the HF model and the converted megatron model")
    c.add_argument("--hf-dir", required=True)
    c.add_argument(
        "--ckpt", required=True, help="a step_* folder, or a root (its newest complete step_* is used)"
    )
    for name in ("tp", "pp", "ep"):
        c.add_argument(f"--{name}", type=int, default=1)
    c.add_argument("--etp", type=int, default=0, help="expert tensor parallel size (default: same as --tp)")
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--seq-len", type=int, default=16)
    c.add_argument("--seed", type=int, default=1234)
    c.add_argument(
        "--tol", type=float, default=1e-3, help="largest allowed |logit| and |log-prob| difference"
    )
    c.set_defaults(fn=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet()
    args = build_parser().parse_args(argv)
    from nsr_megatron.config import ConfigError
    from nsr_megatron.convert import ConvertError

    try:
        return int(args.fn(args))
    except (ConvertError, ConfigError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"convert.py {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
