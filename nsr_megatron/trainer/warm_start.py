"""``nsr-megatron quickstart --task arithmetic``: a task where RL starts from a partly competent model, as in the
paper's setting (RLVR from a pretrained base), on a CPU.

Before RL, for the run's ``run.seed``:

1. the task's files (:mod:`nsr_megatron.data.arithmetic`, from ``data.seed``): SFT pairs with worked solutions and
   RL prompts with reasoning-gym answers, the held-out questions disjoint from the training ones;
2. a tiny random MoE (``model.tiny``, seeded by ``run.seed``) with the text tokenizer (printable ASCII);
3. its SFT warm start (``configs/arithmetic-sft.yaml``: the SFT steps, optimizer and batch), on the run's model and
   layout.

Each lands in a cache folder (default ``<run_dir>/../warm-start``) named by a hash of everything that makes it
(task seed, model shape, SFT settings, run seed), written atomically; a run that finds it reuses it, so the losses
of a comparison start from the same SFT checkpoint for each seed and only the first run pays for it. Then RL starts
from the SFT checkpoint (``checkpoint.load``), evaluates it before the first step (``eval.at_start``, the
held-out pass@1 the warm start reached) and every ``eval.interval`` steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from nsr_megatron.cli import _rank, _wait_for
from nsr_megatron.config import Config, load_config, to_dict

log = logging.getLogger(__name__)

__all__ = ["SFT_CONFIG", "prepare_arithmetic"]

SFT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "arithmetic-sft.yaml"


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _model(cache: Path, config: Config) -> Path:
    """The tiny random model of ``model.tiny`` and ``run.seed``, with the text tokenizer."""
    from nsr_megatron.data.tokenizer import save_synthetic_tokenizer
    from nsr_megatron.models.tiny import create_tiny_hf_checkpoint

    hf_dir = cache / f"hf-init-{_digest(config.model.tiny, 'text')}-seed{config.run.seed}"
    if _rank() == 0 and not (hf_dir / "config.json").exists():
        tmp = hf_dir.with_name(f".{hf_dir.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        create_tiny_hf_checkpoint(tmp, seed=config.run.seed, **config.model.tiny)
        save_synthetic_tokenizer(tmp, charset="text")
        try:
            os.replace(tmp, hf_dir)
        except OSError:
            if not (hf_dir / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another run of this seed made the same model first
    _wait_for(hf_dir / "config.json")
    return hf_dir


@contextlib.contextmanager
def _exclusive(path: Path, *, enabled: bool) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (released when the process dies, so a killed run leaves no stale lock)."""
    if not enabled:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_arithmetic(config: Config, *, sft_config: str | os.PathLike[str] | None = None,
                       cache: str | os.PathLike[str] | None = None, progress: bool | None = None,
                       world_size: int = 1) -> Config:
    """Fill in the arithmetic task's data, model and SFT checkpoint (made once per cache key, see the module
    docstring); returns ``config`` pointing at them. Collective under torchrun (the SFT trains on every rank)."""
    from nsr_megatron.data.arithmetic import FORMAT, make_arithmetic_task
    from nsr_megatron.trainer.checkpoint import latest_checkpoint, read_meta
    from nsr_megatron.trainer.sft import SFTRunConfig, sft

    root = Path(cache) if cache else Path(config.run.run_dir).resolve().parent / "warm-start"
    data_dir = root / f"data-{FORMAT}-seed{config.data.seed}"
    if _rank() == 0:
        make_arithmetic_task(data_dir, seed=config.data.seed)
    files = {name: data_dir / f"{name}.jsonl" for name in ("sft-train", "sft-eval", "rl-train", "rl-eval")}
    for path in files.values():
        _wait_for(path, timeout_s=1800.0)
    hf_dir = Path(config.model.hf_path) if config.model.hf_path else _model(root, config)
    if not config.data.path:
        config.data.path = str(files["rl-train"])
    if config.eval.data in ("", "generate"):
        config.eval.data = str(files["rl-eval"])
    config.model.hf_path = str(hf_dir)
    tiny = config.model.tiny
    config.model.tiny = {}  # it shaped the generated model (named in warm_start.json); the run reads model.hf_path
    if config.checkpoint.load:
        return config  # started from a checkpoint of the user's choice: no warm start
    sft_path = Path(sft_config) if sft_config else SFT_CONFIG
    with open(sft_path, encoding="utf-8") as f:
        sft_yaml = yaml.safe_load(f) or {}
    key = _digest(sft_yaml, hf_dir.name, _file_digest(files["sft-train"]), _file_digest(files["sft-eval"]),
                  config.run.seed, config.model.params_dtype)
    sft_dir = root / f"sft-{key}-seed{config.run.seed}"
    overrides = [f"model.hf_path={hf_dir}", f"run.run_dir={sft_dir}", f"run.seed={config.run.seed}",
                 f"data.path={files['sft-train']}", f"sft.eval_data={files['sft-eval']}", "checkpoint.resume=auto",
                 f"model.params_dtype={config.model.params_dtype}"]
    sft_cfg = load_config(sft_path, overrides, cls=SFTRunConfig)
    sft_cfg = dataclasses.replace(sft_cfg, parallel=config.parallel,
                                  model=dataclasses.replace(config.model, hf_path=str(hf_dir)))
    # Runs of one seed started at once (``compare --jobs``) make the SFT once: the first holds the lock while it
    # trains, the others wait and reuse its checkpoint. Under torchrun every rank trains the SFT collectively, so
    # one job's ranks must decide alike; there the lock is not taken (run such jobs one after another).
    with _exclusive(root / f".sft-{key}-seed{config.run.seed}.lock", enabled=world_size == 1):
        latest = latest_checkpoint(sft_dir / "checkpoints")
        done = latest is not None and int(read_meta(latest)["meta"]["step"]) >= sft_cfg.run.steps
        if done:
            log.info("warm start: reusing the SFT checkpoint %s", latest)
        else:
            if _rank() == 0:
                print(f"warm start: SFT of {hf_dir.name} for {sft_cfg.run.steps} steps into {sft_dir} (made once, "
                      f"then reused)", flush=True)
            sft(sft_cfg, world_size=world_size, progress=progress)
            latest = latest_checkpoint(sft_dir / "checkpoints")
    assert latest is not None, f"the SFT in {sft_dir} saved no checkpoint"
    config.checkpoint.load = str(latest)
    if _rank() == 0:
        (Path(config.run.run_dir)).mkdir(parents=True, exist_ok=True)
        (Path(config.run.run_dir) / "warm_start.json").write_text(json.dumps(
            {"sft_checkpoint": str(latest), "model": str(hf_dir), "tiny": tiny, "sft_config": to_dict(sft_cfg),
             "data": {k: str(v) for k, v in files.items()}},
            indent=1, default=str), encoding="utf-8")
    return config
