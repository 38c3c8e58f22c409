"""Built-in verifiable rewards: math answer checking, exact match, and the synthetic tasks' reward.

Every reward has the signature ``fn(response: str, answer: str, **kwargs) -> float`` (the same as user rewards given
by import path) and is a plain module-level function, so a worker process can import it by name.

* ``math_reward``: the last ``\\boxed{...}`` of the response is compared to the ground truth with math-verify
  (``math_verify.parse`` + ``math_verify.verify``: symbolic/numeric equivalence, e.g. ``\\frac{1}{2}`` == ``0.5``).
  If math-verify is not installed, a normalised string comparison is used instead and a warning says so once.
* ``exact_match``: equality after stripping and collapsing whitespace.
* ``synthetic_reward``: the synthetic tasks (``data/synthetic.py``): the response, with special tokens and
  whitespace removed, scores the fraction of the answer's positions it gets right (lenient, the default: 1.0 iff it
  starts with the answer; for a one-digit answer 1 or 0) or 1.0 iff it equals the answer (``strict=True``).
* ``reasoning_gym`` (``rewards/reasoning_gym.py``): the task's own ``score_answer`` on the last
  ``<answer>...</answer>`` (else the last non-empty line), for prompts of ``data.source=reasoning_gym``.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable
from functools import cache

from nsr_megatron.data.tokenizer import SPECIAL_TOKENS

RewardFn = Callable[..., float]

_WS = re.compile(r"\s+")
_BOXED_PREFIXES: tuple[str, ...] = ("\\boxed", "\\fbox")


def normalize_whitespace(text: str) -> str:
    """Strip and collapse every whitespace run to one space."""
    return _WS.sub(" ", text).strip()


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x``) in ``text``; None if none.

    Braces are matched, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; an unclosed box gives None.
    """
    start = max(text.rfind(prefix) for prefix in _BOXED_PREFIXES)
    if start < 0:
        return None
    rest = text[start:]
    rest = rest[len("\\boxed"):] if rest.startswith("\\boxed") else rest[len("\\fbox"):]
    if rest.startswith(" "):  # "\boxed 5" form: up to the next whitespace or "$"
        match = re.match(r"\s+([^\s$]+)", rest)
        return match.group(1) if match else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


def normalize_math_string(text: str) -> str:
    """A crude canonical form for the fallback comparison: no ``$``, spaces, ``\\left``/``\\right``, ``\\text{}``
    wrappers, trailing ``.``; ``\\dfrac``/``\\tfrac`` -> ``\\frac``; numbers like ``2.50`` -> ``2.5``."""
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\dfrac", "\\frac"),
                     ("\\tfrac", "\\frac"), ("$", "")):
        text = text.replace(old, new)
    text = _WS.sub("", text).rstrip(".")
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return text
    return repr(int(value)) if value.is_integer() else repr(value)


@cache
def math_verify_available() -> bool:
    """Whether ``math_verify`` can be imported (cached per process)."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def math_reward(response: str, answer: str, require_boxed: bool = True, **_: object) -> float:
    """1.0 if the response's final boxed answer is mathematically equal to ``answer``, else 0.0.

    Args:
        response: the model's text; its last ``\\boxed{...}`` is the answer. Without a box the reward is 0 when
            ``require_boxed`` (the default), else math-verify extracts the answer from the whole text.
        answer: ground truth, bare (``3/4``, ``\\frac{3}{4}``) or already boxed.
        require_boxed: demand a ``\\boxed{}`` answer.
    """
    predicted = extract_boxed(response)
    if predicted is None and require_boxed:
        return 0.0
    if not math_verify_available():
        warnings.warn("math-verify is not installed: math answers are compared as normalised strings "
                      "(pip install math-verify for symbolic equivalence).", RuntimeWarning, stacklevel=2)
        gold = extract_boxed(answer) or answer
        return float(normalize_math_string(predicted if predicted is not None else response)
                     == normalize_math_string(gold))
    from math_verify import parse, verify

    # math-verify times itself out with signal.alarm, which only works on the main thread; elsewhere the scorer's
    # own per-call time limit applies.
    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main else None
    gold_text = answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"
    pred_text = f"\\boxed{{{predicted}}}" if predicted is not None else response
    gold = parse(gold_text, parsing_timeout=timeout)
    pred = parse(pred_text, parsing_timeout=timeout)
    if not gold or not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=timeout))


def exact_match(response: str, answer: str, **_: object) -> float:
    """1.0 if response and answer are equal after stripping and collapsing whitespace, else 0.0."""
    return float(normalize_whitespace(response) == normalize_whitespace(answer))


def strip_special_tokens(text: str) -> str:
    """Remove the synthetic tokenizer's special-token strings and all whitespace."""
    for token in SPECIAL_TOKENS:
        text = text.replace(token, "")
    return _WS.sub("", text)


def synthetic_reward(response: str, answer: str, strict: bool = False, **_: object) -> float:
    """Reward of the synthetic tasks, from the response and answer with special tokens and whitespace removed.

    Lenient (the default): the fraction of the answer's positions where the response has the answer's symbol, so
    1.0 iff the response starts with the answer. A model that has not yet learned to stop after the answer is not
    punished, and on the long-answer task (``repeat``) each position it gets right earns its share. ``strict``: 1.0
    iff the response equals the answer, else 0.0.
    """
    cleaned, target = strip_special_tokens(response), strip_special_tokens(answer)
    if not target:
        raise ValueError(f"synthetic_reward: the answer {answer!r} is empty after removing special tokens.")
    if strict:
        return float(cleaned == target)
    return sum(got == want for got, want in zip(cleaned, target, strict=False)) / len(target)


# name -> "module:function" of each built-in reward (an import path, so worker processes can load it).
BUILTIN_REWARDS: dict[str, str] = {
    "math": f"{__name__}:math_reward",
    "exact_match": f"{__name__}:exact_match",
    "synthetic": f"{__name__}:synthetic_reward",
    # reasoning-gym's own verifiers (optional package; nsr_megatron/rewards/reasoning_gym.py)
    "reasoning_gym": "nsr_megatron.rewards.reasoning_gym:reasoning_gym_reward",
}
