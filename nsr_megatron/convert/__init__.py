"""HF <-> Megatron-Core checkpoint conversion, streamed (see ``tools/convert.py`` for the CLI).

- :func:`hf_to_mcore`: HF safetensors folder -> ``<out>/step_00000000/``, a megatron dist checkpoint
  of the canonical tensors that ``nsr_megatron.trainer.checkpoint.load_checkpoint`` loads under any
  TP / PP / EP / expert-TP layout the model allows. The HF config and tokenizer files are kept in
  ``<step>/hf_config/`` so the way back needs nothing else.
- :func:`mcore_to_hf`: a checkpoint folder (converted, or saved by training under any layout) ->
  HF safetensors shards + ``model.safetensors.index.json`` + config / generation config / tokenizer.

The name and shape mapping is :mod:`nsr_megatron.convert.mapping`; the streamed file formats are
:mod:`nsr_megatron.convert.io`. Neither direction builds a model or needs a process group, and
memory stays bounded by one piece (a tensor, or one expert of a stacked expert tensor) plus one
read group (``read_budget_bytes``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nsr_megatron.config import read_hf_config
from nsr_megatron.convert.io import (
    INDEX_FILE,
    WEIGHT_SUFFIXES,
    DistCheckpointReader,
    HFCheckpoint,
    PieceJob,
    SafetensorsWriter,
    commit_checkpoint_dir,
    copy_hf_side_files,
    fsync_files,
    write_dist_checkpoint,
    write_hf_index,
)
from nsr_megatron.convert.mapping import (
    ConvertError,
    Piece,
    TensorRule,
    canonical_to_hf,
    canonical_to_hf_state,
    check_canonical_tensors,
    check_hf_tensors,
    extra_state_keys,
    hf_state_to_canonical,
    hf_to_canonical,
    model_order,
    piece_from_hf,
    piece_to_hf,
    uses_stacked_layers,
    weight_rules,
)
from nsr_megatron.models.hf_config import ArchSpec, arch_from_hf

__all__ = [
    "ConvertError",
    "HF_CONFIG_DIR",
    "TensorRule",
    "canonical_to_hf",
    "canonical_to_hf_state",
    "find_hf_config",
    "hf_state_to_canonical",
    "hf_to_canonical",
    "hf_to_mcore",
    "mcore_to_hf",
    "parse_dtype",
    "weight_rules",
]

HF_CONFIG_DIR = "hf_config"  # inside a converted step folder: config.json, tokenizer files, ...
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_BYTES = 4 * 2**30
DEFAULT_READ_BUDGET = 64 * 2**20


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"bf16"`` / ``"fp32"`` / ``"fp16"`` -> torch dtype; ``None`` / ``"auto"`` -> None (keep)."""
    if name in (None, "", "auto"):
        return None
    if name not in DTYPES:
        raise ConvertError(f"--dtype {name!r} is not one of {['auto', *DTYPES]}.")
    return DTYPES[name]


def _arch(config: dict[str, Any], where: Path) -> ArchSpec:
    try:
        return arch_from_hf(config)
    except KeyError as e:
        raise ConvertError(
            f"{where}/config.json lacks {e.args[0]!r}; it is not a complete model config."
        ) from None


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)


# ------------------------------------------------------------------------------------------------
# HF -> megatron
# ------------------------------------------------------------------------------------------------
def hf_to_mcore(
    hf_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    step: int = 0,
    stacked_layers: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert an HF checkpoint folder into ``<out>/step_<step>/``; return that folder.

    ``dtype`` casts the tensors (``None`` keeps each tensor's stored dtype); ``stacked_layers`` picks
    the layer key form (default: megatron-core's for this architecture, see
    :func:`~nsr_megatron.convert.mapping.weight_rules`). Written atomically like ``save_checkpoint``
    (``.tmp-step_*`` renamed into place after ``nsr_meta.json``).
    """
    hf_dir, root = Path(hf_dir), Path(out)
    if not (hf_dir / "config.json").is_file():
        raise ConvertError(
            f"no config.json in {hf_dir}; pass a Hugging Face checkpoint folder (config.json + safetensors)."
        )
    config = read_hf_config(hf_dir)
    arch = _arch(config, hf_dir)
    hf = HFCheckpoint(hf_dir)
    rules = weight_rules(arch, stacked_layers=stacked_layers)
    check_hf_tensors(rules, hf.shapes(), tied=arch.tie_word_embeddings, where=f"HF checkpoint {hf_dir}")

    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if final.exists() and not overwrite:
        raise ConvertError(f"{final} already exists; pass --force to replace it, or choose another --out.")
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)

    # Shard by shard: order the pieces by the first HF shard their tensors live in, then like the model.
    shard_of = {p: i for i, p in enumerate(hf.shards)}
    jobs = []
    for rule, piece in model_order(rules):
        target = dtype if dtype is not None else hf.tensors[rule.hf_names[0]].dtype
        jobs.append(
            PieceJob(rule=rule, piece=piece, dtype=target, produce=_producer(hf, rule, piece, target))
        )
    jobs.sort(key=lambda j: min(shard_of[hf.tensors[j.rule.hf_names[i]].file] for i in j.piece.hf_index))
    stacked = any(r.stacked for r in rules)
    with _bar(sum(j.nbytes for j in jobs), "hf-to-mcore", progress) as bar:
        try:
            write_dist_checkpoint(tmp, jobs, extra_state_keys(arch, stacked_layers=stacked), bar.update)
        finally:
            hf.close()
    copy_hf_side_files(hf_dir, tmp / HF_CONFIG_DIR)
    info = {
        "step": step,
        "layout": {"tp": 1, "pp": 1, "ep": 1, "dp": 1},
        "has_optimizer": False,
        "arch": dataclasses.asdict(arch),
        "meta": {
            "converted_from": str(hf_dir.resolve()),
            "model_type": arch.model_type,
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else "as stored",
        },
    }
    return commit_checkpoint_dir(tmp, final, info)


def _producer(hf: HFCheckpoint, rule: TensorRule, piece: Any, dtype: torch.dtype) -> Any:
    def produce() -> torch.Tensor:
        sources = [hf.read(rule.hf_names[j]) for j in piece.hf_index]
        return piece_from_hf(rule, piece, [t.to(dtype) for t in sources])

    return produce


# ------------------------------------------------------------------------------------------------
# megatron -> HF
# ------------------------------------------------------------------------------------------------
def find_hf_config(step_dir: Path, hf_config: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the model's ``config.json``: ``hf_config`` when given, else the copy a
    conversion recorded in the checkpoint, else the ``model.hf_path`` of the training run's
    ``config.yaml`` (``<run_dir>/checkpoints/step_*`` -> ``<run_dir>/config.yaml``)."""
    if hf_config:
        path = Path(hf_config)
        folder = path.parent if path.is_file() else path
        if not (folder / "config.json").is_file():
            raise ConvertError(
                f"--hf-config {path}: no config.json there; pass the HF folder or its config.json."
            )
        return folder
    recorded = step_dir / HF_CONFIG_DIR
    if (recorded / "config.json").is_file():
        return recorded
    for run_config in (step_dir.parent.parent / "config.yaml", step_dir.parent / "config.yaml"):
        if run_config.is_file():
            import yaml

            with open(run_config, encoding="utf-8") as f:
                hf_path = ((yaml.safe_load(f) or {}).get("model") or {}).get("hf_path")
            if hf_path and (Path(hf_path) / "config.json").is_file():
                return Path(hf_path)
    raise ConvertError(
        f"{step_dir} records no HF config (no {HF_CONFIG_DIR}/config.json, no run config.yaml with model.hf_path); "
        "pass --hf-config with the HF folder (or config.json) of the model it was trained from."
    )


def _output_dtype(dtype: torch.dtype | None, config: dict[str, Any], stored: torch.dtype) -> torch.dtype:
    if dtype is not None:
        return dtype
    name = config.get("dtype") or config.get("torch_dtype")
    return _HF_DTYPE_NAMES.get(str(name), stored)


def _plan_shards(work: list[tuple[TensorRule, Piece]], dtype: torch.dtype, max_bytes: int) -> list[list[Any]]:
    """Consecutive pieces per output file, each file at most ``max_bytes`` (a larger piece gets its own)."""
    item = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[TensorRule, Piece]]] = [[]]
    size = 0
    for rule, piece in work:
        nbytes = sum(_numel(rule.hf_shapes[j]) for j in piece.hf_index) * item
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((rule, piece))
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def mcore_to_hf(
    step_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    hf_config: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    read_budget_bytes: int = DEFAULT_READ_BUDGET,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert the dist checkpoint in ``step_dir`` (saved under any layout) into an HF folder ``out``.

    The output dtype is ``dtype``, else the config's ``dtype`` / ``torch_dtype``, else the stored one.
    """
    step_dir, out_dir = Path(step_dir), Path(out)
    config_dir = find_hf_config(step_dir, hf_config)
    config = read_hf_config(config_dir)
    arch = _arch(config, config_dir)
    reader = DistCheckpointReader(step_dir)
    rules = weight_rules(arch, stacked_layers=uses_stacked_layers(reader.shapes()))
    stored = check_canonical_tensors(rules, reader.shapes(), where=f"checkpoint {step_dir}")
    out_dtype = _output_dtype(dtype, config, reader.dtype(stored[rules[0].key]))

    if out_dir.exists() and any(
        p.name.endswith(WEIGHT_SUFFIXES) or p.name == INDEX_FILE for p in out_dir.iterdir()
    ):
        if not overwrite:
            raise ConvertError(
                f"{out_dir} already holds weights; pass --force to replace them, or choose another --out."
            )
        for p in out_dir.iterdir():
            if p.name.endswith(WEIGHT_SUFFIXES) or p.name == INDEX_FILE:
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)

    shards = _plan_shards(model_order(rules), out_dtype, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    item = torch.empty((), dtype=out_dtype).element_size()
    with _bar(sum(_numel(s) for r in rules for s in r.hf_shapes) * item, "mcore-to-hf", progress) as bar:
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            entries = [(r.hf_names[j], out_dtype, r.hf_shapes[j]) for r, p in shard for j in p.hf_index]
            writer = SafetensorsWriter(out_dir / file, entries)
            rule_of = {stored[r.key]: r for r, _ in shard}
            for key, piece, block in reader.iter_pieces(
                [(stored[r.key], p) for r, p in shard], read_budget_bytes
            ):
                rule = rule_of[key]
                for j, tensor in zip(piece.hf_index, piece_to_hf(rule, piece, block), strict=True):
                    n = writer.write(rule.hf_names[j], tensor.to(out_dtype))
                    bar.update(n)
                    total += n
            writer.close(sync=False)
            weight_map.update({n: file for n, _, _ in entries})
        fsync_files(out_dir / f for f in sorted(set(weight_map.values())))
    write_hf_index(out_dir, weight_map, total)
    copy_hf_side_files(config_dir, out_dir)
    _set_config_dtype(out_dir / "config.json", out_dtype)
    return out_dir


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    """Make config.json's ``dtype`` (transformers 5) / ``torch_dtype`` (4.x) name the written dtype."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    if all(config.get(k) == name for k in keys):
        return
    for k in keys:
        config[k] = name
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
