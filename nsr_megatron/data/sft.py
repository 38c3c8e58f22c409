"""Supervised fine-tuning examples: (prompt, response) pairs from JSONL or Parquet, tokenized as the RL rollout sees
them, so that a model fine-tuned here answers the prompts ``train`` sends in the format it learned.

Record shapes:

* ``{"prompt": ..., "response": "..."}``: the prompt as a string or a list of chat messages (``data.prompt_key``,
  rendered exactly as :class:`~nsr_megatron.data.datasets.PromptDataset` renders RL prompts: ``data.template``,
  ``data.system_prompt``, the chat template with its generation prompt); the response (``sft.response_key``) is
  the text the model learns to continue with.
* ``{"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", "content": "..."}]}``
  (``sft.messages_key``): the last message must be the assistant's; it is the response, and the messages before it
  are the prompt. Only the last assistant turn is learned.

The response's tokens are followed by the model's first stop token (``generation_config.json``'s EOS, e.g. Qwen's
``<|im_end|>``, else the tokenizer's EOS), so the model learns where to stop, as rollouts stop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsr_megatron.data.datasets import (
    DataConfig,
    RecordError,
    _field,
    _iter_jsonl,
    _iter_parquet,
    apply_template,
    get_key_path,
    render_prompt,
    to_messages,
)

log = logging.getLogger(__name__)

__all__ = ["SFTExample", "load_sft_examples", "prompt_overlap"]


@dataclass(frozen=True)
class SFTExample:
    """One training pair: ``uid`` its index among the kept examples, ``source_line`` its 1-based line / row."""

    uid: int
    prompt: str
    response: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]  # the response's tokens, then the stop token (when the model has one)
    source_line: int

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def _pair(raw: Any, data: DataConfig, response_key: str, messages_key: str, tokenizer: Any) -> tuple[str, str]:
    """(rendered prompt, response text) of one record."""
    if not isinstance(raw, Mapping):
        raise RecordError(f"expected a JSON object, got a {type(raw).__name__}")
    if messages_key in raw and data.prompt_key not in raw:
        messages = raw[messages_key]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, Mapping) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                for m in messages):
            raise RecordError(f"{messages_key!r} must be a non-empty list of {{'role', 'content'}} messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise RecordError(f"the last of {messages_key!r} must be the assistant's answer after at least one "
                              f"other message (got a last role of {messages[-1]['role']!r})")
        prompt_messages = to_messages([dict(m) for m in messages[:-1]], data.system_prompt)
        response = messages[-1]["content"]
    else:
        raw_prompt = _field(raw, data.prompt_key, "prompt_key")
        if data.template:
            if not isinstance(raw_prompt, str):
                raise RecordError(f"data.template={data.template!r} wraps a string prompt, and this one is a "
                                  f"{type(raw_prompt).__name__}; use template '' for chat messages")
            raw_prompt = apply_template(data.template, raw_prompt)
        prompt_messages = to_messages(raw_prompt, data.system_prompt)
        try:
            response = get_key_path(raw, response_key)
        except RecordError as exc:
            raise RecordError(f"sft.response_key={response_key!r}: {exc} (the response to learn: set "
                              f"sft.response_key, or give {messages_key!r} chat messages ending with the "
                              f"assistant's)") from None
        if not isinstance(response, str):
            raise RecordError(f"the response ({response_key!r}) must be a string, got a {type(response).__name__}")
    if not response.strip():
        raise RecordError("the response is empty")
    try:
        prompt = render_prompt(prompt_messages, tokenizer, data.apply_chat_template)
    except Exception as exc:  # a template may reject a message order: a record problem
        raise RecordError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
    return prompt, response


def load_sft_examples(
    path: str | Path,
    data: DataConfig,
    tokenizer: Any,
    *,
    response_key: str = "response",
    messages_key: str = "messages",
    stop_id: int | None = None,
    max_tokens: int = 0,
    setting: str = "data.path",
) -> list[SFTExample]:
    """Every usable example of ``path`` (``.jsonl`` or ``.parquet``), tokenized.

    A malformed record raises ``ValueError`` naming the file, its line or row and the reason (or is skipped with
    ``data.skip_invalid``); an example longer than ``max_tokens`` (prompt + response + stop, when > 0) is skipped
    and counted in a warning. ``data.max_samples`` keeps the first N.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{setting}={str(path)!r} does not exist or is not a file; point it at a .jsonl or "
                                f".parquet file of prompt / response pairs.")
    fmt = DataConfig(path=str(path), format=data.format).resolved_format
    unit = "line" if fmt == "jsonl" else "row"
    rows = _iter_jsonl(path) if fmt == "jsonl" else _iter_parquet(path)
    pairs: list[tuple[int, str, str]] = []
    skipped: list[tuple[int, str]] = []
    for line_no, raw, error in rows:
        if data.max_samples is not None and len(pairs) >= data.max_samples:
            break
        try:
            if error is not None:
                raise RecordError(error)
            pairs.append((line_no, *_pair(raw, data, response_key, messages_key, tokenizer)))
        except RecordError as exc:
            if not data.skip_invalid:
                raise ValueError(f"{path}, {unit} {line_no}: {exc} (fix the record, check data.prompt_key / "
                                 f"sft.response_key / sft.messages_key, or set data.skip_invalid=true)") from None
            skipped.append((line_no, str(exc)))
    if not pairs:
        raise ValueError(f"{setting}={str(path)!r} holds no usable prompt / response pairs"
                         + (f" (first skipped: {unit} {skipped[0][0]}: {skipped[0][1]})" if skipped else "") + ".")
    prompt_ids = tokenizer([p for _, p, _ in pairs], add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([r for _, _, r in pairs], add_special_tokens=False)["input_ids"]
    tail = (stop_id,) if stop_id is not None else ()
    examples: list[SFTExample] = []
    too_long: list[tuple[int, int]] = []
    for (line_no, prompt, response), p_ids, r_ids in zip(pairs, prompt_ids, response_ids, strict=True):
        if not p_ids or not r_ids:
            raise ValueError(f"{path}, {unit} {line_no}: the {'prompt' if not p_ids else 'response'} encodes to no "
                             f"tokens; is the tokenizer the model's own (model.tokenizer_path)?")
        n = len(p_ids) + len(r_ids) + len(tail)
        if max_tokens and n > max_tokens:
            too_long.append((line_no, n))
            continue
        examples.append(SFTExample(uid=len(examples), prompt=prompt, response=response, prompt_ids=tuple(p_ids),
                                   response_ids=tuple(r_ids) + tail, source_line=line_no))
    if skipped:
        log.warning("%s: skipped %d invalid %ss (first: %s %d: %s)", path, len(skipped), unit, unit, *skipped[0])
    if too_long:
        log.warning("%s: skipped %d examples longer than sft.max_seq_len=%d tokens (first: %s %d, %d tokens)",
                    path, len(too_long), max_tokens, unit, *too_long[0])
    if not examples:
        raise ValueError(f"{setting}={str(path)!r}: every example is longer than sft.max_seq_len={max_tokens} "
                         f"tokens (the first has {too_long[0][1]}); raise sft.max_seq_len.")
    return examples


def prompt_overlap(train: list[str], held_out: list[str]) -> list[str]:
    """The held-out prompts that also occur in the training prompts (compared after stripping whitespace), in
    held-out order."""
    seen = {p.strip() for p in train}
    return [p for p in held_out if p.strip() in seen]
