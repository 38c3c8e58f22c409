"""reasoning-gym's procedural tasks as a prompt source, and what their verifier needs.

reasoning-gym (``pip install 'reasoning-gym==0.1.25'``, the ``tasks`` extra) generates question / answer items from
a task name, a generator config (a dataclass per task) and a seed; each task scores an answer with its own
``score_answer(answer, entry)``. It is optional and imported only when a task is used.

**Items.** ``generate_entries`` draws each item's task with probability proportional to its weight
(``random.Random("nsr-megatron-reasoning-gym:<seed>")``) and takes the items of one task in order from that task's
generator at :func:`task_seed` ``(seed, task)``: a 32-bit hash, because reasoning-gym draws item ``i`` from
``Random(seed + i)``, so generators at seeds 0 and 1 share all items but one. The items are a pure function of
(tasks, weights, configs, size, seed).

**What the verifier needs travels as the answer.** A prompt's ground truth reaches the reward as one string
(``PromptRecord.answer``), in the reward's worker process, so each item's answer is a JSON *payload*::

    {"reasoning_gym": {"task": "chain_sum", "config": {"max_terms": 3}, "entry": {"question": ..., "answer": ...,
     "metadata": ...}}}

the task, its generator config (the reward rebuilds the task's dataset from these two to call its
``score_answer``; some tasks' scoring reads the config) and the whole reasoning-gym entry. Tuples and dicts with
non-string keys, which JSON would turn into lists and string keys, are tagged (``{"__tuple__": [...]}``,
``{"__items__": [[key, value], ...]}``) and restored, so the entry the task scores is the one it generated (the ARC
tasks compare tuple boards). ``reward.name=reasoning_gym`` (``nsr_megatron.rewards.reasoning_gym``) reads it.

**Command line** (the same items as ``data.source=reasoning_gym`` with one task, written as the JSONL that
``data.path`` reads with its default keys, ``{"prompt", "answer", "task"}``)::

    python -m nsr_megatron.data.reasoning_gym --task chain_sum --size 1000 --seed 0 \\
        --config '{"min_terms": 2, "max_terms": 3}' --out data/chain_sum.jsonl
    python -m nsr_megatron.data.reasoning_gym --list
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

PIN = "reasoning-gym==0.1.25"
INSTALL = f"pip install '{PIN}' (or pip install -e '.[tasks]')"
PAYLOAD_KEY = "reasoning_gym"
# Tasks that are not one generator: ``composite`` mixes others (use the weights of data.reasoning_gym instead).
_NOT_TASKS = frozenset({"composite"})

Row = dict[str, str]


def require_reasoning_gym() -> ModuleType:
    """The ``reasoning_gym`` module; a missing package is an ``ImportError`` that names the pip command."""
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ImportError(f"reasoning-gym is not installed (it is optional); install it with {INSTALL}.") from exc
    return reasoning_gym


def _registry() -> dict[str, tuple[type, type]]:
    """reasoning-gym's task registry: name -> (dataset class, config dataclass)."""
    require_reasoning_gym()
    from reasoning_gym.factory import DATASETS

    return {name: classes for name, classes in DATASETS.items() if name not in _NOT_TASKS}


def task_names() -> list[str]:
    """Every reasoning-gym task name, sorted."""
    return sorted(_registry())


CONFIG_LABELS = ("data.reasoning_gym.tasks", "data.reasoning_gym.configs.{task}")  # how messages name the settings
CLI_LABELS = ("--task", "--config")


def check_task(task: str, config: Mapping[str, Any], *, labels: tuple[str, str] = CONFIG_LABELS) -> None:
    """Raise ``ValueError`` (one line: the setting, the value, close matches or the valid keys) unless ``task`` is a
    reasoning-gym task and ``config`` a valid config of it: keys that are fields of its config dataclass, values
    its ``validate()`` accepts. ``labels`` name the task and config settings in the message."""
    registry = _registry()
    task_label, config_label = labels[0], labels[1].format(task=task)
    if task not in registry:
        close = difflib.get_close_matches(task, sorted(registry), n=4, cutoff=0.5)
        hint = (f"close matches: {close}" if close else
                "no close match; python -m nsr_megatron.data.reasoning_gym --list lists them")
        raise ValueError(f"{task_label}: {task!r} is not a reasoning-gym task ({hint}).")
    config_cls = registry[task][1]
    fields = sorted(f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size"))
    for key in config:
        if key in ("seed", "size"):
            raise ValueError(f"{config_label}: {key!r} is not set here but by the size and seed of the set; remove "
                             f"it.")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{config_label}: {key!r} is not a setting of reasoning-gym's {config_cls.__name__} "
                             f"({hint}its settings: {fields}).")
    try:
        settings = config_cls(**config, seed=0, size=1)
        if callable(getattr(settings, "validate", None)):
            settings.validate()
    except (AssertionError, ValueError, TypeError) as exc:
        raise ValueError(f"{config_label}={dict(config)}: reasoning-gym's {config_cls.__name__} refuses it "
                         f"({type(exc).__name__}: {exc or 'validate() failed'}).") from None


def task_seed(seed: int, task: str) -> int:
    """The generator seed of ``task`` in a set of seed ``seed``: a 32-bit hash of both (see the module docstring)."""
    digest = hashlib.sha256(f"nsr-megatron-reasoning-gym:{seed}:{task}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def generate_entries(weights: Mapping[str, float], configs: Mapping[str, Mapping[str, Any]], *, size: int,
                     seed: int, labels: tuple[str, str] = CONFIG_LABELS) -> list[tuple[str, dict[str, Any]]]:
    """``size`` items ``(task, reasoning-gym entry)`` of the weighted mixture (see the module docstring).

    Every task and config is checked first (:func:`check_task`), whether or not the draw picks it.
    """
    names = list(weights)
    if not names or size < 1:
        raise ValueError(f"{labels[0]}: needs at least one task and size >= 1 (got {names}, size={size}).")
    for task in names:
        check_task(task, configs.get(task, {}), labels=labels)
    rg = require_reasoning_gym()
    rng = random.Random(f"nsr-megatron-reasoning-gym:{seed}")
    probs = [float(weights[t]) for t in names]
    picks = rng.choices(names, weights=probs, k=size) if len(names) > 1 else names * size
    datasets = {task: rg.create_dataset(task, seed=task_seed(seed, task), size=count, **configs.get(task, {}))
                for task, count in Counter(picks).items()}
    taken: Counter[str] = Counter()
    out = []
    for task in picks:
        try:
            out.append((task, datasets[task][taken[task]]))
        except Exception as exc:  # noqa: BLE001 - a generator's own failure, reported as one line
            raise ValueError(f"reasoning-gym task {task!r} failed to generate its item {taken[task]} (set seed "
                             f"{seed}, config {dict(configs.get(task, {}))}): {type(exc).__name__}: {exc}") from None
        taken[task] += 1
    return out


# ------------------------------------------------------------------------------------------------ payload

def _tag(value: Any) -> Any:
    """``value`` as plain JSON with tuples and non-string-keyed dicts tagged (inverse: :func:`_untag`)."""
    if isinstance(value, tuple):
        return {"__tuple__": [_tag(v) for v in value]}
    if isinstance(value, list):
        return [_tag(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not {"__tuple__", "__items__"} & set(value):
            return {k: _tag(v) for k, v in value.items()}
        return {"__items__": [[_tag(k), _tag(v)] for k, v in value.items()]}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"a {type(value).__name__} ({value!r:.60}) cannot be written as JSON")


def _untag(value: Any) -> Any:
    if isinstance(value, list):
        return [_untag(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_untag(v) for v in value["__tuple__"])
        if set(value) == {"__items__"}:
            return {_untag(k): _untag(v) for k, v in value["__items__"]}
        return {k: _untag(v) for k, v in value.items()}
    return value


def encode_payload(task: str, config: Mapping[str, Any], entry: Mapping[str, Any]) -> str:
    """The answer string of one item: task, generator config and reasoning-gym entry (module docstring)."""
    full = {"question": entry["question"], "answer": entry["answer"], "metadata": entry.get("metadata", {})}
    try:
        return json.dumps({PAYLOAD_KEY: {"task": task, "config": _tag(dict(config)), "entry": _tag(full)}})
    except TypeError as exc:
        raise ValueError(f"reasoning-gym task {task!r}: an item cannot be stored as JSON ({exc}).") from None


def decode_payload(answer: str) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """``(task, config, entry)`` from an answer made by :func:`encode_payload`; None if it is not one."""
    if not answer.startswith("{") or PAYLOAD_KEY not in answer:
        return None
    try:
        data = json.loads(answer)
    except json.JSONDecodeError:
        return None
    body = data.get(PAYLOAD_KEY) if isinstance(data, dict) else None
    if not isinstance(body, dict) or not {"task", "config", "entry"} <= set(body):
        return None
    return str(body["task"]), _untag(body["config"]), _untag(body["entry"])


def generate_rows(weights: Mapping[str, float], configs: Mapping[str, Mapping[str, Any]], *, size: int, seed: int,
                  labels: tuple[str, str] = CONFIG_LABELS) -> list[Row]:
    """``{"prompt": question, "answer": payload, "task": name}`` for each item of :func:`generate_entries`."""
    return [{"prompt": entry["question"], "answer": encode_payload(task, configs.get(task, {}), entry), "task": task}
            for task, entry in generate_entries(weights, configs, size=size, seed=seed, labels=labels)]


@lru_cache(maxsize=64)
def _score_fn(task: str, config_json: str) -> Callable[[str | None, dict[str, Any]], float]:
    rg = require_reasoning_gym()
    return rg.create_dataset(task, seed=0, size=1, **_untag(json.loads(config_json))).score_answer  # type: ignore[no-any-return]


def score_fn(task: str, config: Mapping[str, Any]) -> Callable[[str | None, dict[str, Any]], float]:
    """The ``score_answer`` of ``task``'s dataset built with ``config`` (cached per process: the reward's worker
    builds each task once)."""
    return _score_fn(task, json.dumps(_tag(dict(config)), sort_keys=True))


def question_of(answer: str, prompt: str) -> str:
    """The question of a record: the payload's when the answer is one, else the prompt text."""
    payload = decode_payload(answer)
    return str(payload[2]["question"]) if payload is not None else prompt


def overlap(train_questions: Iterable[str], held_out_questions: Sequence[str]) -> tuple[int, str | None]:
    """``(how many held-out questions occur among the training questions, the first of them)``."""
    seen = set(train_questions)
    hits = [q for q in held_out_questions if q in seen]
    return len(hits), (hits[0] if hits else None)


# ------------------------------------------------------------------------------------------------ command line

def main(argv: Sequence[str] | None = None) -> int:
    """Write one task's items as a JSONL prompt file (``data.path``; score it with ``reward.name=reasoning_gym``)."""
    parser = argparse.ArgumentParser(
        prog="python -m nsr_megatron.data.reasoning_gym",
        description="Write reasoning-gym items as the JSONL that data.path reads ({prompt, answer, task}; the answer "
                    "carries what reward.name=reasoning_gym needs).")
    parser.add_argument("--task", help="a reasoning-gym task, e.g. chain_sum")
    parser.add_argument("--size", type=int, default=1000, help="number of items (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument("--config", default="{}", help="the task's generator settings as JSON, e.g. "
                        "'{\"max_terms\": 3}'")
    parser.add_argument("--out", help="output .jsonl")
    parser.add_argument("--list", action="store_true", help="print the task names and exit")
    args = parser.parse_args(argv)
    try:
        if args.list:
            print("\n".join(task_names()))
            return 0
        if not args.task or not args.out:
            parser.error("--task and --out are required (or --list)")
        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config={args.config!r} is not JSON ({exc.msg}); pass e.g. "
                             f"'{{\"max_terms\": 3}}'.") from None
        if not isinstance(config, dict):
            raise ValueError(f"--config={args.config!r} must be a JSON object of the task's settings.")
        if args.size < 1:
            raise ValueError(f"--size={args.size} must be >= 1.")
        rows = generate_rows({args.task: 1.0}, {args.task: config}, size=args.size, seed=args.seed,
                             labels=CLI_LABELS)
    except (ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} {args.task} items (seed {args.seed}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
