"""Every check a run can make before any process group or model exists; ``validate`` and ``train`` share it.

:func:`preflight` reads only files: the HF ``config.json`` and safetensors headers, the tokenizer, the prompt file,
the reward's module, and checkpoint metadata. Each mistake is a :class:`~nsr_megatron.config.ConfigError` with a
one-line message that names the setting, the value and the fix, so a bad input costs seconds and never a
traceback from inside megatron. It returns what it loaded (tokenizer, tokenized dataset, stop tokens, resume
point) so that the run does not load it twice.

Checks, in order:

1. ``model.hf_path``: a folder with ``config.json`` of a supported architecture; the layout fits the world size;
   its weights (when the run starts from them) are complete: every shard an index lists exists and the tensors
   match the config. The rollout settings fit the backend, and a ``rollout.backend=module:Factory`` imports.
2. ``checkpoint.resume=auto``: the newest complete checkpoint is not past ``run.steps`` and holds this model
   (another parallel layout is fine: it reshards). Without ``resume``, a run folder that already holds checkpoints
   is refused rather than overwritten. ``checkpoint.load``: exists, is complete, holds this model.
3. The tokenizer (``model.tokenizer_path``, default the model folder): its files exist, it loads, it is not empty
   and fits the model's vocabulary.
4. ``reward.name`` imports.
5. ``data.*``: the file exists and parses (or ``data.source=reasoning_gym``'s tasks and generator settings exist
   and generate), the keys are there, every prompt tokenizes; ``rollout.prompts_per_step`` fits the dataset; the
   longest prompt plus ``rollout.max_new_tokens`` fits ``max_position_embeddings``; reasoning-gym prompts go with
   ``reward.name=reasoning_gym`` and no held-out question (``eval.data``, or the ``eval_seed`` set) is a training
   question.
6. Settings the run would ignore are named in a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nsr_megatron.config import Config, ConfigError, ModelConfig, read_hf_config
from nsr_megatron.data.datasets import PromptDataset
from nsr_megatron.models.hf_config import ArchSpec, arch_from_hf, validate_layout

log = logging.getLogger(__name__)

__all__ = ["RunInputs", "arch_difference", "ignored_settings", "load_tokenizer", "preflight", "stop_token_ids"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# Fields of ArchSpec that may differ between a checkpoint and the run (they change no weight's meaning).
_ARCH_FREE = frozenset({"init_std", "max_position_embeddings"})


@dataclass(kw_only=True)
class RunInputs:
    """What :func:`preflight` checked and loaded, handed to the run."""

    arch: ArchSpec
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    dataset: PromptDataset
    stop_token_ids: tuple[int, ...]
    resume_from: Path | None  # the checkpoint checkpoint.resume=auto continues from
    eval_dataset: PromptDataset | None = None  # eval.data, when eval.interval > 0


def preflight(config: Config, *, world_size: int) -> RunInputs:
    """Run every check of the module docstring; raise :class:`ConfigError` at the first problem."""
    hf_dir = _model_dir(config.model)
    arch = arch_from_hf(read_hf_config(hf_dir))
    validate_layout(arch, config.model, config.parallel, world_size)
    _check_rollout(config)
    _check_optimizer(config)
    if config.algorithm.routing_replay != "off" and not arch.is_moe:
        raise ConfigError(f"algorithm.routing_replay={config.algorithm.routing_replay} replays MoE routing, but "
                          f"model.hf_path holds a dense {arch.model_type} model; set algorithm.routing_replay=off.")
    if config.profile.routing != "off" and not arch.is_moe:
        raise ConfigError(f"profile.routing={config.profile.routing} profiles MoE routers, but model.hf_path holds a "
                          f"dense {arch.model_type} model; set profile.routing=off.")
    resume_from = _resume_point(config, arch)
    if config.checkpoint.load:
        _check_checkpoint(Path(config.checkpoint.load), arch, setting="checkpoint.load")
    # The policy starts from the HF weights unless it resumes or loads a checkpoint; so does the reference.
    from_hf = not config.checkpoint.load and (resume_from is None or config.loss.kl_coef > 0)
    _check_weights(config, hf_dir, arch, needed=from_hf)
    tokenizer = load_tokenizer(config.model, arch)
    _check_reward(config)
    dataset = _load_dataset(config, tokenizer)
    _check_batch_and_lengths(config, arch, dataset)
    _check_reasoning_gym_answers(config, dataset)
    eval_dataset = _load_eval_dataset(config, tokenizer) if config.eval.interval else None
    _check_held_out(config, dataset, eval_dataset)
    for message in ignored_settings(config):
        log.warning("%s", message)
    return RunInputs(arch=arch, tokenizer=tokenizer, dataset=dataset, resume_from=resume_from,
                     stop_token_ids=stop_token_ids(hf_dir, tokenizer, arch.vocab_size), eval_dataset=eval_dataset)


# ------------------------------------------------------------------------------------------------ model

def _model_dir(model: ModelConfig) -> Path:
    if not model.hf_path:
        raise ConfigError("model.hf_path is empty: set it to a Hugging Face checkpoint folder (config.json, "
                          "safetensors, tokenizer), or run `nsr-megatron quickstart` to generate one.")
    path = Path(model.hf_path)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if not path.is_dir():
        raise ConfigError(f"model.hf_path={model.hf_path!r} does not exist; point it at a Hugging Face "
                          f"checkpoint folder.")
    read_hf_config(path)  # a clear error when config.json is missing
    return path


def _check_weights(config: Config, hf_dir: Path, arch: ArchSpec, *, needed: bool) -> None:
    """The HF weights are complete (every indexed shard exists, tensors match the config) when present, and
    present when the run starts from them."""
    from nsr_megatron.convert.io import INDEX_FILE, SINGLE_FILE, HFCheckpoint
    from nsr_megatron.convert.mapping import ConvertError, check_hf_tensors, weight_rules

    if not any((hf_dir / name).is_file() for name in (INDEX_FILE, SINGLE_FILE)):
        if needed:
            raise ConfigError(
                f"model.hf_path={str(hf_dir)!r} holds no weights ({SINGLE_FILE} or {INDEX_FILE}); the run starts "
                f"from them. Point it at a checkpoint with safetensors weights, or set checkpoint.load to a "
                f"converted checkpoint (python tools/convert.py hf-to-mcore).")
        return
    try:
        ckpt = HFCheckpoint(hf_dir)
        try:
            check_hf_tensors(weight_rules(arch), ckpt.shapes(), tied=arch.tie_word_embeddings,
                             where=f"model.hf_path={str(hf_dir)!r}")
        finally:
            ckpt.close()
    except ConvertError as exc:
        raise ConfigError(f"model.hf_path={str(hf_dir)!r}: {exc}") from None


def load_tokenizer(model: ModelConfig, arch: ArchSpec) -> Any:
    """The run's tokenizer (``model.tokenizer_path`` or the model folder), checked to exist and be usable."""
    from transformers import AutoTokenizer

    setting, where = ("model.tokenizer_path", model.tokenizer_path) if model.tokenizer_path else (
        "model.hf_path", model.hf_path)
    folder = Path(where)
    if not folder.is_dir() or not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{setting}={where!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); copy the base "
            f"model's tokenizer into it, or set model.tokenizer_path to a folder that has one.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the message carries the reason
        raise ConfigError(f"{setting}={where!r}: transformers could not load its tokenizer "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).") from None
    size = len(tokenizer)
    if size < 2:
        raise ConfigError(f"{setting}={where!r}: the tokenizer is empty ({size} tokens); copy the base model's "
                          f"tokenizer files into it.")
    if size > arch.vocab_size:
        raise ConfigError(f"{setting}={where!r}: the tokenizer has {size} tokens but the model's vocab_size is "
                          f"{arch.vocab_size}; use the model's own tokenizer.")
    return tokenizer


def stop_token_ids(hf_dir: str | Path, tokenizer: Any, vocab_size: int) -> tuple[int, ...]:
    """Where responses end: every id of ``generation_config.json``'s ``eos_token_id`` (an int or a list; chat
    models list the end-of-turn token, e.g. Qwen's ``<|im_end|>``) plus the tokenizer's EOS."""
    import json

    ids: list[int] = []
    path = Path(hf_dir) / "generation_config.json"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    out = tuple(dict.fromkeys(i for i in ids if 0 <= i < vocab_size))
    if len(out) < len(set(ids)):
        log.warning("stop tokens %s lie outside the model's vocabulary (%d) and are ignored.",
                    sorted(set(ids) - set(out)), vocab_size)
    if not out:
        log.warning("no stop token: neither generation_config.json nor the tokenizer names an EOS token, so every "
                    "response runs to rollout.max_new_tokens.")
    return out


def _check_rollout(config: Config) -> None:
    import shutil

    import torch

    r = config.rollout
    if ":" in r.backend:  # a backend of your own: it imports now, not after the models are built
        from nsr_megatron.trainer.runtime import rollout_backend

        rollout_backend(r.backend)
    if r.backend == "sglang" and r.sglang.colocate and not torch.cuda.is_available():
        raise ConfigError(
            "rollout.sglang.colocate=true shares the training GPUs with the SGLang engines (memory saver, release and "
            "resume around training) and needs CUDA; this machine has none. Set rollout.sglang.colocate=false: the "
            "engines then run beside the trainer (on CPU here).")
    if r.offload_train == "true" and (r.backend == "server" or r.urls or (r.backend == "sglang" and not r.sglang.colocate)):
        engines = ("engines attached with rollout.urls" if r.urls else "the project's rollout server processes"
                   if r.backend == "server" else "SGLang engines without rollout.sglang.colocate=true")
        raise ConfigError(
            f"rollout.offload_train=true frees the training state while engines that share the training devices "
            f"generate, for engines that release their memory between rollouts (the embedded engine, or "
            f"rollout.backend=sglang with rollout.sglang.colocate=true); {engines} cannot release theirs: set "
            f"rollout.offload_train=auto.")
    if r.backend == "sglang" and config.algorithm.routing_replay == "R3" and not torch.cuda.is_available():
        raise ConfigError(
            "algorithm.routing_replay=R3 replays the experts the rollout engine routed to, and SGLang returns them "
            "only on CUDA (--enable-return-routed-experts registers a pinned host buffer with CUDA; SGLang's CPU "
            "engine dies at start with it). On this machine use algorithm.routing_replay=R2, or rollout.backend=server "
            "or embedded, which return routed experts on CPU.")
    if r.weight_sync == "tensor" and not (r.backend == "sglang" and r.sglang.colocate and torch.cuda.is_available()):
        raise ConfigError(
            "rollout.weight_sync=tensor hands weights to SGLang engines on the same GPUs as CUDA IPC handles: it "
            "needs rollout.backend=sglang, rollout.sglang.colocate=true and CUDA; use rollout.weight_sync=distributed "
            "(or disk) otherwise.")
    if r.weight_sync == "shared_memory":
        from nsr_megatron.trainer.runtime import ranks_span_nodes, remote_urls

        remote = remote_urls(r.urls)
        if ranks_span_nodes():
            raise ConfigError(
                "rollout.weight_sync=shared_memory needs every trainer rank on the engines' host, but this run has "
                f"{os.environ['WORLD_SIZE']} ranks over several nodes (LOCAL_WORLD_SIZE="
                f"{os.environ['LOCAL_WORLD_SIZE']}); use rollout.weight_sync=distributed.")
        if r.backend != "server" or remote or not hasattr(os, "memfd_create"):
            raise ConfigError(
                "rollout.weight_sync=shared_memory lets every trainer rank write its shards straight into the memory "
                "of the project's rollout server on the same host (Linux): it needs rollout.backend=server with "
                f"engines on this host{f', not {remote}' if remote else ''}. SGLang engines, engines on other hosts "
                "and the embedded engine take rollout.weight_sync=distributed (or disk).")
    if r.backend == "sglang" and not r.urls:
        from nsr_megatron.trainer.runtime import sglang_python

        python = sglang_python(config)
        if not (Path(python).is_file() or shutil.which(python)):
            raise ConfigError(
                f"rollout.backend=sglang launches engines with rollout.sglang.python={python!r}, which does not exist; "
                "build SGLang's venv with `bash scripts/setup_sglang.sh` and set rollout.sglang.python to the "
                "python it prints.")


def _check_optimizer(config: Config) -> None:
    """``optimizer.cpu_offload`` / ``precision_aware`` against what megatron-core accepts (``build_model`` makes the
    same check, for the commands that skip preflight)."""
    from nsr_megatron.models.provider import validate_optimizer

    validate_optimizer(config.optimizer, config.parallel, config.model)


# ------------------------------------------------------------------------------------------------ checkpoints

def arch_difference(saved: dict[str, Any], arch: ArchSpec) -> list[str]:
    """``["hidden_size 64 vs 128", ...]``: the fields where a checkpoint's model differs from ``arch``."""
    mine = dataclasses.asdict(arch)
    out = []
    for key, value in mine.items():
        theirs = saved.get(key)
        if key in _ARCH_FREE or key not in saved:
            continue
        if isinstance(value, tuple):
            theirs = tuple(theirs or ())
        if theirs != value:
            out.append(f"{key} {theirs!r} vs {value!r}")
    return out


def _check_checkpoint(path: Path, arch: ArchSpec, *, setting: str) -> dict[str, Any]:
    """A complete checkpoint folder holding this model; returns its metadata."""
    from nsr_megatron.convert.io import META_FILE
    from nsr_megatron.trainer.checkpoint import checkpoint_arch, read_meta

    if not path.exists():
        raise ConfigError(f"{setting}={str(path)!r} does not exist; pass a step_* folder of a checkpoint (or set "
                          f"checkpoint.resume=auto to continue this run from its newest checkpoint).")
    if not (path / META_FILE).is_file():
        newest = sorted(p.name for p in path.glob("step_*") if (p / META_FILE).is_file()) if path.is_dir() else []
        hint = f" It holds {newest[-1]}: pass {path / newest[-1]}." if newest else ""
        raise ConfigError(f"{setting}={str(path)!r} is not a complete checkpoint (no {META_FILE}).{hint}")
    meta = read_meta(path)
    saved = checkpoint_arch(path)
    if saved is not None:
        diff = arch_difference(saved, arch)
        if diff:
            raise ConfigError(
                f"{setting}={str(path)!r} holds another model than model.hf_path ({'; '.join(diff)}; checkpoint vs "
                f"this run). Point {setting} at a checkpoint of this model, or model.hf_path at the checkpoint's.")
    return meta


def _resume_point(config: Config, arch: ArchSpec) -> Path | None:
    from nsr_megatron.trainer.checkpoint import latest_checkpoint

    root = Path(config.run.run_dir) / "checkpoints"
    latest = latest_checkpoint(root)
    if latest is None:
        return None
    if config.checkpoint.resume != "auto":
        raise ConfigError(
            f"run.run_dir={config.run.run_dir!r} already holds checkpoints (newest: {latest.name}); set "
            f"checkpoint.resume=auto to continue that run, or choose a new run.run_dir (nothing is overwritten).")
    meta = _check_checkpoint(latest, arch, setting="checkpoint.resume=auto: the newest checkpoint")
    step = int(meta["step"])
    if step > config.run.steps:
        raise ConfigError(
            f"checkpoint.resume=auto: {latest} is at step {step}, past run.steps={config.run.steps}; set run.steps "
            f"above {step} to continue that run, or choose a new run.run_dir.")
    return latest


# ------------------------------------------------------------------------------------------------ reward, data

def _check_reward(config: Config) -> None:
    from nsr_megatron.rewards.builtin import BUILTIN_REWARDS
    from nsr_megatron.rewards.scorer import resolve_reward_fn

    try:
        resolve_reward_fn(BUILTIN_REWARDS.get(config.reward.name, config.reward.name))
    except (ImportError, ValueError, TypeError) as exc:
        raise ConfigError(f"reward.name={config.reward.name!r}: {exc}") from None


def _load_dataset(config: Config, tokenizer: Any, *, split: Literal["train", "eval"] = "train") -> PromptDataset:
    try:
        return PromptDataset(config.data, tokenizer, split=split)
    except (ValueError, FileNotFoundError, ImportError) as exc:  # ImportError: an optional reader (pyarrow,
        raise ConfigError(str(exc)) from None                      # reasoning-gym), its message names the pip command


def _load_eval_dataset(config: Config, tokenizer: Any) -> PromptDataset:
    """``eval.data``: a prompt file read like ``data.path``, or ``reasoning_gym``: the held-out set of
    ``data.source=reasoning_gym`` (``data.reasoning_gym.eval_size`` / ``eval_seed``)."""
    first = config.eval.max_problems or None
    if config.eval.data == "generate":
        raise ConfigError("eval.data=generate: only `nsr-megatron quickstart` generates a held-out set (of its "
                          "synthetic task); for `train`, pass eval.data=<a JSONL or Parquet prompt file>, or "
                          "eval.data=reasoning_gym with data.source=reasoning_gym.")
    if config.eval.data == "reasoning_gym":
        if config.data.source != "reasoning_gym":
            raise ConfigError("eval.data=reasoning_gym evaluates on the held-out set of data.source=reasoning_gym "
                              "(data.reasoning_gym.eval_size / eval_seed), but data.source=file; set "
                              "data.source=reasoning_gym, or point eval.data at a prompt file.")
        held_out = dataclasses.replace(config.data, path="", max_samples=first, shuffle=False)
        return _load_dataset(dataclasses.replace(config, data=held_out), tokenizer, split="eval")
    eval_config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, source="file", path=config.eval.data, max_samples=first, shuffle=False))
    try:
        return _load_dataset(eval_config, tokenizer)
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text.replace("data.path=", "eval.data=") if "data.path=" in text
                          else f"eval.data={config.eval.data!r}: {text}") from None


def _check_reasoning_gym_answers(config: Config, dataset: PromptDataset) -> None:
    """reasoning-gym prompts and ``reward.name=reasoning_gym`` go together: the reward reads the payload answers
    that only that source (or its command line's files) writes, and no other built-in reward can score them."""
    from nsr_megatron.data.reasoning_gym import decode_payload, require_reasoning_gym
    from nsr_megatron.rewards.builtin import BUILTIN_REWARDS

    name = config.reward.name
    if name == "reasoning_gym":
        try:
            require_reasoning_gym()
        except ImportError as exc:
            raise ConfigError(f"reward.name=reasoning_gym: {exc}") from None
        record = dataset[0]
        if decode_payload(record.answer) is None:
            raise ConfigError(
                f"reward.name=reasoning_gym scores the answers that data.source=reasoning_gym (or python -m "
                f"nsr_megatron.data.reasoning_gym) writes, a JSON payload with the task and its entry; "
                f"{dataset.source} (line {record.source_line}) has the answer {record.answer!r:.60}. Use such data, "
                f"or another reward.")
    elif config.data.source == "reasoning_gym" and name in BUILTIN_REWARDS:
        raise ConfigError(f"data.source=reasoning_gym stores each prompt's reasoning-gym entry as its answer (a JSON "
                          f"payload), which reward.name={name} cannot score; set reward.name=reasoning_gym.")


def _check_held_out(config: Config, dataset: PromptDataset, eval_dataset: PromptDataset | None) -> None:
    """No held-out question is a training question, for reasoning-gym data: the questions of ``eval.data`` when the
    run evaluates, else those of the ``eval_seed`` set of ``data.source=reasoning_gym``. (Other data is not checked:
    the synthetic quickstart tasks have ten distinct prompts, shared by design.)"""
    from nsr_megatron.data.reasoning_gym import overlap, question_of

    rg = config.data.reasoning_gym
    if config.data.source != "reasoning_gym" and config.reward.name != "reasoning_gym":
        return
    if eval_dataset is not None:
        held_out, what = eval_dataset, f"eval.data={config.eval.data}"
    elif config.data.source == "reasoning_gym":
        data = dataclasses.replace(config.data, path="", max_samples=None, shuffle=False)
        held_out = _load_dataset(dataclasses.replace(config, data=data), None, split="eval")
        what = f"the held-out set (data.reasoning_gym.eval_seed={rg.eval_seed}, eval_size={rg.eval_size})"
    else:
        return
    count, first = overlap((question_of(r.answer, r.prompt) for r in dataset.records),
                           [question_of(r.answer, r.prompt) for r in held_out.records])
    if count:
        raise ConfigError(
            f"{count} of the {len(held_out)} questions of {what} also occur in the training set, {dataset.source}; "
            f"the first: {first!r:.200}. Held-out questions must be unseen: widen the tasks' generator settings "
            f"(data.reasoning_gym.configs) so that questions repeat less, or draw fewer (data.reasoning_gym.size, "
            f"eval_size, eval.max_problems).")


def _check_batch_and_lengths(config: Config, arch: ArchSpec, dataset: PromptDataset) -> None:
    n, per_step = len(dataset), config.rollout.prompts_per_step
    if per_step > n:
        raise ConfigError(f"rollout.prompts_per_step={per_step} is larger than the dataset ({n} prompts in "
                          f"{dataset.source}); lower it to at most {n} or use more prompts.")
    longest, line = dataset.longest_prompt()
    limit, new = arch.max_position_embeddings, config.rollout.max_new_tokens
    if longest + new > limit:
        fitting = sum(len(r.prompt_ids) + new <= limit for r in dataset.records)
        fixes = [f"lower rollout.max_new_tokens to at most {limit - longest}"] if longest < limit else []
        if fitting:
            fixes.append(f"skip the {n - fitting} longer prompts with data.max_prompt_tokens={limit - new}")
        if not fixes:
            fixes.append("use shorter prompts or a model with more positions")
        raise ConfigError(
            f"the longest prompt ({dataset.source}, line {line}: {longest} tokens) plus rollout.max_new_tokens="
            f"{new} exceeds the model's max_position_embeddings={limit}; {', or '.join(fixes)}.")


def ignored_settings(config: Config) -> list[str]:
    """One message per setting that the run will not use with the rest of this config."""
    defaults = Config()
    out: list[str] = []

    def changed(section: str, key: str) -> bool:
        return bool(getattr(getattr(config, section), key) != getattr(getattr(defaults, section), key))

    hf = Path(config.model.hf_path) if config.model.hf_path else None
    if config.model.tiny and hf is not None and hf.name != "hf-init":  # hf-init: the model tiny generated
        out.append("model.tiny is ignored: model.hf_path is set (tiny only shapes the generated quickstart model).")
    r = config.rollout
    if r.backend == "embedded":
        for key in ("num_engines", "weight_sync", "update_bucket_mb", "max_restarts", "api_token"):
            if changed("rollout", key):
                out.append(f"rollout.{key} is ignored: rollout.backend=embedded (one engine in the driver process).")
    if r.backend != "sglang" and r.sglang != defaults.rollout.sglang:
        out.append(f"rollout.sglang.* is ignored: rollout.backend={r.backend}.")
    if r.urls and changed("rollout", "num_engines"):
        out.append("rollout.num_engines is ignored: rollout.urls names the engines.")
    if r.backend == "sglang" and changed("rollout", "max_batch_size"):
        out.append("rollout.max_batch_size is ignored: rollout.backend=sglang (SGLang batches on its own).")
    if not config.algorithm.dynamic_sampling and changed("algorithm", "max_sampling_rounds"):
        out.append("algorithm.max_sampling_rounds is ignored: algorithm.dynamic_sampling=false.")
    if config.model.offload_reference and config.loss.kl_coef == 0:
        out.append("model.offload_reference is ignored: loss.kl_coef=0 builds no reference model.")
    if config.optimizer.lr_schedule == "constant" and changed("optimizer", "min_lr"):
        out.append("optimizer.min_lr is ignored: optimizer.lr_schedule=constant.")
    o = config.optimizer
    if not o.cpu_offload and (changed("optimizer", "offload_fraction") or changed("optimizer", "offload_overlap")):
        out.append("optimizer.offload_fraction / offload_overlap are ignored: optimizer.cpu_offload=false.")
    kept_fp32 = [f"{name}={getattr(o, name)}" for name in ("main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype")
                 if getattr(o, name) != "fp32"]
    if o.precision_aware and o.cpu_offload and kept_fp32:
        out.append(f"optimizer.{', '.join(kept_fp32)} {'is' if len(kept_fp32) == 1 else 'are'} ignored with "
                   "optimizer.cpu_offload=true: megatron-core's hybrid CPU optimizer keeps Adam's moments and the master "
                   "weights in fp32 (torch AdamW); precision_aware then saves the device's fp32 copy of 16-bit weights.")
    if o.precision_aware and o.main_grads_dtype != "fp32":
        out.append(f"optimizer.main_grads_dtype={o.main_grads_dtype} is ignored: gradients are reduced and kept in "
                   "fp32 (the DDP buffers' grad_reduce_in_fp32).")
    d = config.data
    if d.source == "reasoning_gym":
        out += [f"data.{key} is ignored: data.source=reasoning_gym generates the prompts."
                for key in ("format", "prompt_key", "answer_key", "skip_invalid") if changed("data", key)]
    elif d.reasoning_gym != defaults.data.reasoning_gym:
        out.append("data.reasoning_gym.* is ignored: data.source=file (set data.source=reasoning_gym to use it).")
    if config.reward.executor == "thread" and changed("reward", "start_method"):
        out.append("reward.start_method is ignored: reward.executor=thread.")
    if config.algorithm.old_logprobs == "rollout" and (
            config.loss.tis_cap is not None or config.loss.mis_low is not None or config.loss.mis_high is not None):
        out.append("loss.tis_cap / mis_low / mis_high do nothing with algorithm.old_logprobs=rollout (the old and "
                   "rollout log-probs are the same, so every weight is 1); use old_logprobs=recompute.")
    return out
