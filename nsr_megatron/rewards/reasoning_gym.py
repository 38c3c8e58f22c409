"""The ``reasoning_gym`` reward: a reasoning-gym task scores the response's final answer with its own
``score_answer``.

**The answer format.** The response's final answer is, in this order:

1. the content of its last ``<answer>...</answer>`` (stripped), when it has one;
2. otherwise its last non-empty line (stripped).

Special-token strings are removed first (``<|im_end|>``, ``<|endoftext|>`` and any other ``<|...|>``, ``</s>``,
``<eos>``, ...): the rollout keeps the stop token in the response. So ``"...so the sum is 7.\\n<answer>7</answer>"``
and ``"3 + 4 = 7\\n7<|im_end|>"`` both answer ``7``. A response with no answer at all gives the task ``None``.
``data.template=answer-tag`` asks the model for the first form.

**The ground truth** is the JSON payload that ``data.source=reasoning_gym`` and ``python -m
nsr_megatron.data.reasoning_gym`` store as each prompt's answer (``nsr_megatron.data.reasoning_gym``): the task, its
generator config and the reasoning-gym entry. The reward rebuilds the task's dataset from task + config (once per
process; it runs in the scorer's worker processes) and returns ``score_answer(final_answer, entry)``: for most tasks
1.0 for a correct answer and 0.0 otherwise, some give partial credit. An answer that is not such a payload is an
error (scored 0 and counted in ``reward/errors``).
"""

from __future__ import annotations

import re

from nsr_megatron.data.reasoning_gym import decode_payload, score_fn
from nsr_megatron.data.tokenizer import SPECIAL_TOKENS

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_SPECIAL = re.compile(r"<\|[^<>|\s]{1,40}\|>|</s>|<s>|<eos>|<bos>|<pad>|<end_of_turn>|<start_of_turn>|<eot>")


def strip_special(text: str) -> str:
    """``text`` without special-token strings (``<|...|>``, ``</s>``, ``<eos>``, the synthetic tokenizer's)."""
    text = _SPECIAL.sub("", text)
    for token in SPECIAL_TOKENS:
        text = text.replace(token, "")
    return text


def extract_final_answer(response: str) -> str | None:
    """The last ``<answer>...</answer>``'s content, else the last non-empty line; None when there is neither."""
    text = strip_special(response)
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return str(tagged[-1]).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def reasoning_gym_reward(response: str, answer: str, **_: object) -> float:
    """``score_answer(extract_final_answer(response), entry)`` of the task named in ``answer``'s payload."""
    payload = decode_payload(answer)
    if payload is None:
        raise ValueError(f"the reasoning_gym reward needs the answer that data.source=reasoning_gym (or python -m "
                         f"nsr_megatron.data.reasoning_gym) writes, a JSON payload with the task and its entry; got "
                         f"{answer!r:.60}")
    task, config, entry = payload
    return float(score_fn(task, config)(extract_final_answer(response), entry))
