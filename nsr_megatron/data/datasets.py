"""Prompt datasets for RLVR: JSONL / Parquet records -> (prompt text, ground-truth answer), plus a resumable sampler.

Supported record shapes (the common RLVR math sets: GSM8K/MATH exports, DAPO-Math-17k, verl/slime parquet):

* ``prompt`` as a plain string, or as a list of chat messages ``[{"role": "user", "content": "..."}, ...]``;
* the answer as a plain field (``"answer": "42"``, numbers are converted with ``str``) or nested, addressed by a
  dotted key path (``answer_key="reward_model.ground_truth"``).

A string prompt becomes one user message (after an optional system message). Messages are rendered with the
tokenizer's chat template (``apply_chat_template(..., add_generation_prompt=True)``) when the tokenizer has one, and
otherwise joined as plain text. A malformed record raises ``ValueError`` naming the file, the 1-based line (JSONL) or
row (Parquet) and the reason, or, with ``skip_invalid=True``, is skipped and counted.

``EpochSampler`` shuffles per epoch with a permutation that is a pure function of ``(seed, epoch)``; its whole state
is ``(epoch, position, seed)``, so a resumed run sees exactly the order the interrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("auto", "jsonl", "parquet")
_SUFFIX_FORMATS: dict[str, str] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(kw_only=True)
class ReasoningGymConfig:
    """Prompts drawn from reasoning-gym's procedural tasks (``data.source=reasoning_gym``), generated when the run
    starts (``nsr_megatron.data.reasoning_gym``); score them with ``reward.name=reasoning_gym``.

    Each item's task is drawn with probability proportional to its weight; the items of one task are that task's
    generator's items ``0, 1, ...`` at a seed derived from ``(seed, task)``, so the set is a pure function of these
    fields. The training set uses ``size`` / ``seed``; the held-out set (``eval.data=reasoning_gym``, and the check
    that no held-out question is a training question) ``eval_size`` / ``eval_seed``.

    Attributes:
        tasks: reasoning-gym task names, e.g. ``[chain_sum, basic_arithmetic]`` (a single name is a list of one);
            ``python -m nsr_megatron.data.reasoning_gym --list`` lists them.
        weights: task -> relative weight in the mixture; a task not named here weighs 1.0.
        configs: task -> its generator's settings, the keyword arguments of ``reasoning_gym.create_dataset`` (the
            fields of the task's config dataclass), e.g. ``{chain_sum: {min_terms: 2, max_terms: 3}}``. ``seed``
            and ``size`` are set from this section, not here.
        size: number of training items.
        seed: seed of the training items.
        eval_size: number of held-out items.
        eval_seed: seed of the held-out items; it must differ from ``seed``.
    """

    tasks: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    size: int = 1000
    seed: int = 0
    eval_size: int = 100
    eval_seed: int = 1

    def __post_init__(self) -> None:
        where = "data.reasoning_gym"
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        if not isinstance(self.tasks, list) or not all(isinstance(t, str) and t for t in self.tasks):
            raise ValueError(f"{where}.tasks={self.tasks!r} must be a list of reasoning-gym task names, "
                             f"e.g. [chain_sum, basic_arithmetic].")
        repeated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if repeated:
            raise ValueError(f"{where}.tasks names {repeated} more than once; give each task once and set its "
                             f"share with {where}.weights.")
        for name, table in (("weights", self.weights), ("configs", self.configs)):
            if not isinstance(table, dict):
                raise ValueError(f"{where}.{name}={table!r} must be a mapping task -> value, e.g. "
                                 f"{{chain_sum: {'2.0' if name == 'weights' else '{max_terms: 3}'}}}.")
            stray = sorted(set(table) - set(self.tasks))
            if stray:
                raise ValueError(f"{where}.{name} names {stray}, which {'is' if len(stray) == 1 else 'are'} not in "
                                 f"{where}.tasks={self.tasks}; add it to the tasks or remove it from {name}.")
        for task, weight in self.weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                raise ValueError(f"{where}.weights.{task}={weight!r} must be a number >= 0.")
        if self.tasks and not sum(self.task_weights().values()) > 0:
            raise ValueError(f"{where}.weights={self.weights} leaves every task at weight 0; give one a positive "
                             f"weight.")
        for task, settings in self.configs.items():
            if not isinstance(settings, dict):
                raise ValueError(f"{where}.configs.{task}={settings!r} must be a mapping of the task's generator "
                                 f"settings, e.g. {{max_terms: 3}}.")
            for key in ("seed", "size"):
                if key in settings:
                    raise ValueError(f"{where}.configs.{task}.{key} is set by this section: use {where}.{key} "
                                     f"(training) and {where}.eval_{key} (held out) instead.")
        for name in ("size", "eval_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}.{name}={value!r} must be an integer >= 1.")
        if self.seed == self.eval_seed:
            raise ValueError(f"{where}.seed and {where}.eval_seed are both {self.seed}: the held-out items would be "
                             f"the training items. Set {where}.eval_seed to another value, e.g. {self.seed + 1}.")

    def task_weights(self) -> dict[str, float]:
        """Every task with its weight (1.0 where ``weights`` does not name it), in ``tasks`` order."""
        return {task: float(self.weights.get(task, 1.0)) for task in self.tasks}


SOURCES: tuple[str, ...] = ("file", "reasoning_gym")


@dataclass(kw_only=True)
class DataConfig:
    """Where the prompts live and how to read them.

    Attributes:
        source: ``file`` (the prompts of ``path``) or ``reasoning_gym`` (generated from reasoning-gym's tasks as the
            ``reasoning_gym`` section says; ``path``, ``format``, ``prompt_key``, ``answer_key`` and
            ``skip_invalid`` are then not used). Templates, system prompt and chat template apply to both.
        path: a ``.jsonl`` / ``.parquet`` file (required before loading; empty only as a config default).
        format: ``auto`` (from the suffix: .jsonl/.ndjson or .parquet/.pq), ``jsonl`` or ``parquet``.
        prompt_key: dotted key path of the prompt (string or list of ``{"role", "content"}`` messages).
        answer_key: dotted key path of the ground truth, e.g. ``answer`` or ``reward_model.ground_truth``.
        skip_invalid: skip (and count) malformed records instead of raising.
        apply_chat_template: render messages with the tokenizer's chat template when it has one.
        system_prompt: optional system message put before prompts that have none.
        max_samples: keep only the first N valid records (None: all).
        max_prompt_tokens: skip (and count) prompts longer than this many tokens after the chat template
            (None: keep all; the trainer then refuses a prompt that leaves no room for the response).
        shuffle: shuffle each epoch (``EpochSampler``).
        seed: seed of generated prompt sets (the quickstart's synthetic tasks); with ``run.seed`` it also keys the
            shuffle order when ``shuffle_seed`` is unset.
        shuffle_seed: the shuffle order's seed. None (default): derived from ``run.seed`` and ``seed`` when the run's
            config is loaded (``nsr_megatron.config.Config``), so runs of different seeds see the prompts in
            different orders; set it to keep one order across seeds (e.g. an A/A pair that varies only the draws).
        template: wrap a string prompt (a benchmark's bare ``problem``) in a math instruction, as the paper's
            baselines prompt: ``qwen-math`` (Qwen2.5-Math's system message "Please reason step by step, and put
            your final answer within \\boxed{}."), ``dapo`` (DAPO's step-by-step instruction around the problem,
            with the last line ``Answer: \\boxed{...}``, so the ``math`` reward reads it), ``answer-tag`` (a
            system message asking for step-by-step reasoning and the final answer in ``<answer>...</answer>``, the
            format the ``reasoning_gym`` reward reads first), or ``""`` (as it is).
        reasoning_gym: the tasks, weights, generator settings, sizes and seeds of ``source=reasoning_gym``.
    """

    source: Literal["file", "reasoning_gym"] = "file"
    path: str = ""
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    skip_invalid: bool = False
    apply_chat_template: bool = True
    system_prompt: str | None = None
    max_samples: int | None = None
    max_prompt_tokens: int | None = None
    shuffle: bool = True
    seed: int = 0
    shuffle_seed: int | None = None
    template: str = ""
    reasoning_gym: ReasoningGymConfig = field(default_factory=ReasoningGymConfig)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"DataConfig.source={self.source!r} is not one of {SOURCES}.")
        if self.template not in PROMPT_TEMPLATES:
            raise ValueError(f"DataConfig.template={self.template!r} is not one of {sorted(PROMPT_TEMPLATES)}.")
        if self.format not in FORMATS:
            raise ValueError(f"DataConfig.format={self.format!r} is not one of {FORMATS}.")
        if self.source == "reasoning_gym":
            if not self.reasoning_gym.tasks:
                raise ValueError("data.source=reasoning_gym needs data.reasoning_gym.tasks, e.g. [chain_sum] "
                                 "(python -m nsr_megatron.data.reasoning_gym --list lists the tasks).")
            if self.path:
                raise ValueError(f"data.path={self.path!r} and data.source=reasoning_gym both say where the prompts "
                                 f"come from; drop data.path (the prompts are generated) or set data.source=file.")
        elif self.path:
            self.resolved_format  # noqa: B018 - raises if the format cannot be inferred from the suffix
        for name in ("prompt_key", "answer_key"):
            key = getattr(self, name)
            if not key or any(not part for part in key.split(".")):
                raise ValueError(f"DataConfig.{name}={key!r} is not a key path: use e.g. 'prompt' or 'a.b'.")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"DataConfig.max_samples={self.max_samples} must be >= 1 (or None for all).")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"DataConfig.max_prompt_tokens={self.max_prompt_tokens} must be >= 1 (or None: no limit).")

    @property
    def resolved_format(self) -> str:
        """``jsonl`` or ``parquet``."""
        if self.format != "auto":
            return self.format
        suffix = Path(self.path).suffix.lower()
        if suffix not in _SUFFIX_FORMATS:
            raise ValueError(f"DataConfig.path={self.path!r}: cannot infer the format from the suffix "
                             f"(known: {sorted(_SUFFIX_FORMATS)}); set format='jsonl' or format='parquet'.")
        return _SUFFIX_FORMATS[suffix]


@dataclass(frozen=True)
class PromptRecord:
    """One usable prompt: ``uid`` is its 0-based index in the dataset, ``source_line`` its 1-based line/row,
    ``prompt_ids`` its tokens (empty when the dataset was loaded without a tokenizer)."""

    uid: int
    prompt: str
    messages: list[dict[str, str]]
    answer: str
    source_line: int
    prompt_ids: tuple[int, ...] = ()


class RecordError(ValueError):
    """A record could not be used (the message holds the reason; the caller adds file and line)."""


def get_key_path(record: Mapping[str, Any], key_path: str) -> Any:
    """Look up ``a.b.c`` in nested mappings (a literal key containing dots wins if present).

    Raises:
        RecordError: naming the missing component and the keys that exist at that level.
    """
    if key_path in record:
        return record[key_path]
    node: Any = record
    walked: list[str] = []
    for part in key_path.split("."):
        if not isinstance(node, Mapping):
            raise RecordError(f"field {'.'.join(walked)!r} is a {type(node).__name__}, not an object")
        if part not in node:
            where = f" in {'.'.join(walked)!r}" if walked else ""
            raise RecordError(f"missing field {key_path!r} (no key {part!r}{where}; keys: {sorted(node)})")
        node = node[part]
        walked.append(part)
    return node


def to_messages(prompt: Any, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Normalise a prompt (string or list of chat messages) to a list of ``{"role", "content"}`` dicts."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RecordError("prompt is an empty string")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        if not prompt:
            raise RecordError("prompt is an empty list of messages")
        messages = []
        for i, message in enumerate(prompt):
            if not isinstance(message, Mapping):
                raise RecordError(f"prompt message {i} is a {type(message).__name__}, not a {{role, content}} object")
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise RecordError(
                    f"prompt message {i} needs string 'role' and 'content' "
                    f"(got role={type(role).__name__}, content={type(content).__name__})"
                )
            messages.append({"role": role, "content": content})
    else:
        raise RecordError(f"prompt is a {type(prompt).__name__}; expected a string or a list of chat messages")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
DAPO_INSTRUCTION = ("Solve the following math problem step by step. The last line of your response should be of the "
                    "form Answer: \\boxed{{$Answer}} where $Answer is the answer to the problem.\n\n{problem}\n\n"
                    "Remember to put your answer on its own line after \"Answer:\".")
ANSWER_TAG_SYSTEM = ("Think the problem through step by step. Then give only the final answer, between <answer> and "
                     "</answer> tags, e.g. <answer>42</answer>.")
PROMPT_TEMPLATES = {"": "as it is", "qwen-math": "Qwen2.5-Math's system message",
                    "dapo": "DAPO's instruction, boxed answer", "answer-tag": "final answer in <answer> tags"}


def apply_template(template: str, problem: str) -> Any:
    """A benchmark problem as the prompt of ``template`` (a string, or chat messages)."""
    if template == "qwen-math":
        return [{"role": "system", "content": QWEN_MATH_SYSTEM}, {"role": "user", "content": problem}]
    if template == "dapo":
        return DAPO_INSTRUCTION.format(problem=problem)
    if template == "answer-tag":
        return [{"role": "system", "content": ANSWER_TAG_SYSTEM}, {"role": "user", "content": problem}]
    return problem


def to_answer(value: Any) -> str:
    """Ground truth as a string: strings as-is, ints/floats through ``str``; anything else is an error."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RecordError(f"answer is a {type(value).__name__} ({value!r:.60}); expected a string or a number")


def render_prompt(
    messages: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase | None = None,
    apply_chat_template: bool = True,
) -> str:
    """Messages -> prompt text.

    With a tokenizer that has a chat template (and ``apply_chat_template``): the template with the generation prompt.
    Otherwise a plain join: a lone user message is its content; several are ``role: content`` lines followed by
    ``assistant:``.
    """
    if apply_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str), f"apply_chat_template(tokenize=False) returned {type(text).__name__}"
        return text
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line_number, record, error)``; blank lines are not records."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, None, f"not UTF-8 ({exc.reason} at byte {exc.start})"
                continue
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text), None
            except json.JSONDecodeError as exc:
                yield line_no, None, f"invalid JSON ({exc.msg}: column {exc.colno})"


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(row_number, record, None)`` for each Parquet row (1-based)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or convert it to JSONL)") from exc
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield row, record, None


def _open_rows(config: DataConfig, split: Literal["train", "eval"]
               ) -> tuple[str, str, Iterator[tuple[int, Any, str | None]]]:
    """``(where, unit, rows)`` of the configured source: ``where`` names it in messages, ``unit`` is what a row is
    called (line, row, item), ``rows`` yields ``(1-based number, record, error)``."""
    if config.source == "reasoning_gym":
        from nsr_megatron.data.reasoning_gym import generate_rows  # imports reasoning-gym only when used

        rg = config.reasoning_gym
        size, seed = (rg.size, rg.seed) if split == "train" else (rg.eval_size, rg.eval_seed)
        items = generate_rows(rg.task_weights(), rg.configs, size=size, seed=seed)
        # Keyed by the configured key paths as literal keys (get_key_path looks those up first).
        rows = ((i, {config.prompt_key: r["prompt"], config.answer_key: r["answer"]}, None)
                for i, r in enumerate(items, start=1))
        return f"reasoning-gym {'+'.join(rg.tasks)} (seed {seed})", "item", rows
    if not config.path:
        raise ValueError("data.path is empty: set it to a .jsonl or .parquet file of prompts.")
    path = Path(config.path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path={config.path!r} does not exist or is not a file; point it at a "
                                f".jsonl or .parquet file of prompts.")
    if config.resolved_format == "jsonl":
        return str(path), "line", _iter_jsonl(path)
    return str(path), "row", _iter_parquet(path)


class PromptDataset:
    """Prompts + ground truths loaded eagerly from one file (or generated by reasoning-gym), tokenized once when a
    tokenizer is given.

    ``split`` picks the training or the held-out set of ``data.source=reasoning_gym`` (their own size and seed); a
    file is what it is.

    Attributes:
        records: the valid records in file order.
        skipped: ``(line, reason)`` of each skipped record (only with ``skip_invalid=True``).
        too_long: ``(line, tokens)`` of each prompt skipped for ``max_prompt_tokens``.
        source: the file, or a description of the generated set, as messages name it.
    """

    def __init__(self, config: DataConfig, tokenizer: PreTrainedTokenizerBase | None = None, *,
                 split: Literal["train", "eval"] = "train") -> None:
        self.config = config
        path, unit, rows = _open_rows(config, split)
        self.source = path
        if config.apply_chat_template and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            logger.warning("data.apply_chat_template=true is ignored: the tokenizer has no chat template; "
                           "prompts are joined as plain text.")
        self.records: list[PromptRecord] = []
        self.skipped: list[tuple[int, str]] = []
        self.too_long: list[tuple[int, int]] = []
        self._own_system = 0  # prompts that bring their own system message (system_prompt not applied)
        seen = 0
        for line_no, raw, error in rows:
            if config.max_samples is not None and len(self.records) >= config.max_samples:
                break
            seen += 1
            try:
                if error is not None:
                    raise RecordError(error)
                self.records.append(self._parse(raw, line_no, tokenizer))
            except RecordError as exc:
                if not config.skip_invalid:
                    raise ValueError(
                        f"{path}, {unit} {line_no}: {exc} "
                        f"(fix the record, check data.prompt_key / data.answer_key, or set data.skip_invalid=true)"
                    ) from None
                self.skipped.append((line_no, str(exc)))
        if tokenizer is not None:
            self._tokenize(tokenizer, path, unit)
        if self.skipped:
            logger.warning("%s: skipped %d invalid %ss (first: %s %d: %s)", path, len(self.skipped), unit,
                           unit, self.skipped[0][0], self.skipped[0][1])
        if self.too_long:
            logger.warning("%s: skipped %d prompts longer than data.max_prompt_tokens=%d (first: %s %d, %d tokens)",
                           path, len(self.too_long), config.max_prompt_tokens, unit, *self.too_long[0])
        if self._own_system:
            logger.warning("%s: data.system_prompt is ignored for %d prompts that have their own system message.",
                           path, self._own_system)
        if not self.records:
            if seen == 0:
                raise ValueError(f"data.path={config.path!r} holds no records (the file is empty); "
                                 f"point it at a non-empty prompt file.")
            first = (f"; first skipped: {unit} {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped
                     else f"; all {len(self.too_long)} are longer than data.max_prompt_tokens" if self.too_long else "")
            raise ValueError(f"{path}: no usable records among {seen}{first}. Check data.prompt_key="
                             f"{config.prompt_key!r} and data.answer_key={config.answer_key!r}.")

    def _parse(self, raw: Any, line_no: int, tokenizer: PreTrainedTokenizerBase | None) -> PromptRecord:
        if not isinstance(raw, Mapping):
            raise RecordError(f"expected a JSON object, got a {type(raw).__name__}")
        raw_prompt = _field(raw, self.config.prompt_key, "prompt_key")
        if self.config.template:
            if not isinstance(raw_prompt, str):
                raise RecordError(f"data.template={self.config.template!r} wraps a string prompt (a problem), and "
                                  f"this one is a {type(raw_prompt).__name__}; use template '' for chat messages")
            raw_prompt = apply_template(self.config.template, raw_prompt)
        messages = to_messages(raw_prompt, self.config.system_prompt)
        answer = to_answer(_field(raw, self.config.answer_key, "answer_key"))
        try:
            prompt = render_prompt(messages, tokenizer, self.config.apply_chat_template)
        except Exception as exc:  # a template may reject a message order: that is a record problem
            raise RecordError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        if self.config.system_prompt is not None and isinstance(raw_prompt, list) \
                and raw_prompt[0]["role"] == "system":
            self._own_system += 1
        return PromptRecord(uid=len(self.records), prompt=prompt, messages=messages, answer=answer,
                            source_line=line_no)

    def _tokenize(self, tokenizer: PreTrainedTokenizerBase, path: str, unit: str) -> None:
        """Tokenize every prompt once (as the rollout sends it: no special tokens added beyond the template),
        drop the ones over ``max_prompt_tokens`` and renumber the rest."""
        if not self.records:
            return
        ids = tokenizer([r.prompt for r in self.records], add_special_tokens=False)["input_ids"]
        limit = self.config.max_prompt_tokens
        kept: list[PromptRecord] = []
        for record, tokens in zip(self.records, ids, strict=True):
            if not tokens:
                raise ValueError(f"{path}, {unit} {record.source_line}: the prompt {record.prompt!r:.60} encodes to no "
                                 f"tokens; is the tokenizer the model's own (model.tokenizer_path)?")
            if limit is not None and len(tokens) > limit:
                self.too_long.append((record.source_line, len(tokens)))
                continue
            kept.append(dataclasses.replace(record, uid=len(kept), prompt_ids=tuple(tokens)))
        self.records = kept

    def longest_prompt(self) -> tuple[int, int]:
        """``(tokens, source line)`` of the longest prompt (tokenized datasets only)."""
        longest = max(self.records, key=lambda r: len(r.prompt_ids), default=None)  # the first of the longest
        return (len(longest.prompt_ids), longest.source_line) if longest is not None else (0, 0)

    @property
    def num_skipped(self) -> int:
        """How many malformed records were skipped."""
        return len(self.skipped)

    @property
    def skipped_lines(self) -> list[int]:
        """1-based line (JSONL) or row (Parquet) numbers of the skipped records."""
        return [line for line, _ in self.skipped]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PromptRecord:
        return self.records[index]


def _field(record: Mapping[str, Any], key_path: str, setting: str) -> Any:
    """``get_key_path`` whose error names the setting (``data.prompt_key`` / ``data.answer_key``)."""
    try:
        return get_key_path(record, key_path)
    except RecordError as exc:
        raise RecordError(f"data.{setting}={key_path!r}: {exc}") from None


@dataclass
class EpochSampler:
    """Deterministic, resumable epoch shuffling of ``num_items`` indices into batches of ``batch_size``.

    Epoch ``e`` uses the permutation ``random.Random(f"nsr-megatron:{seed}:{e}")`` (identity when ``shuffle`` is
    off), which depends on nothing else, so ``(epoch, position, seed)`` is the whole state. A batch never spans two
    epochs: the last ``num_items % batch_size`` items of each epoch's order are dropped (they come first in some
    later epoch's order with high probability). With a fixed batch size, ``batch_at(step)`` equals the ``step``-th
    ``next_batch()`` of a fresh sampler.
    """

    num_items: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    position: int = 0
    _cache: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"EpochSampler.num_items={self.num_items}: the dataset is empty.")
        if not 1 <= self.batch_size <= self.num_items:
            raise ValueError(
                f"rollout.prompts_per_step={self.batch_size} must be in [1, {self.num_items}] (the number of prompts "
                f"in the dataset): use fewer prompts per step or a larger dataset."
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        """The permutation of ``range(num_items)`` used in ``epoch`` (a pure function of seed and epoch)."""
        if epoch not in self._cache:
            order = list(range(self.num_items))
            if self.shuffle:
                random.Random(f"nsr-megatron:{self.seed}:{epoch}").shuffle(order)
            self._cache = {epoch: order}  # keep one epoch: the sampler walks forward
        return self._cache[epoch]

    def batch_at(self, step: int) -> list[int]:
        """Indices of the ``step``-th batch (0-based) counted from epoch 0, position 0."""
        if step < 0:
            raise ValueError(f"batch_at(step={step}): step must be >= 0.")
        epoch, index = divmod(step, self.batches_per_epoch)
        start = index * self.batch_size
        return self.epoch_order(epoch)[start:start + self.batch_size]

    def next_batch(self) -> list[int]:
        """The next batch of indices; advances ``(epoch, position)``."""
        if self.position + self.batch_size > self.num_items:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.epoch_order(self.epoch)[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position", "seed"}``: everything needed to resume the same order."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore a ``state_dict()``; the saved seed wins over the constructor's (with a warning if they differ)."""
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise ValueError(f"EpochSampler state {dict(state)} lacks {sorted(missing)}: pass a state_dict().")
        epoch, position, seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        if epoch < 0 or not 0 <= position <= self.num_items:
            raise ValueError(
                f"EpochSampler state epoch={epoch}, position={position} is out of range for num_items="
                f"{self.num_items}: was the checkpoint made with another dataset?"
            )
        if seed != self.seed:
            logger.warning("EpochSampler: resuming with the checkpoint's seed %d (configured seed %d is ignored).",
                           seed, self.seed)
        self.epoch, self.position, self.seed = epoch, position, seed
        self._cache = {}
