"""User rewards (module:function) for the end-to-end tests: one that fails in every way a reward can, and a
slow but correct one."""

from __future__ import annotations

import math
import time

from nsr_megatron.rewards import synthetic_reward


def flaky(response: str, answer: str, **_: object) -> object:
    """Raises for answers 1-3, hangs for 4-5, returns NaN for 6, None for 7, a string for 8."""
    if answer in ("1", "2", "3"):
        raise RuntimeError(f"reward bug for answer {answer}")
    if answer in ("4", "5"):
        time.sleep(3600)
    if answer in ("6", "7", "8"):
        return {"6": math.nan, "7": None, "8": "1.0"}[answer]
    return 1.0 if response.startswith(answer) else 0.0


def slow_synthetic(response: str, answer: str, **kw: object) -> float:
    """The synthetic reward, 10 ms a call: the rewards phase lasts long enough to be interrupted in a test."""
    time.sleep(0.01)
    return synthetic_reward(response, answer, **kw)  # type: ignore[arg-type]


def ends_at_im_end(response: str, answer: str, **_: object) -> float:
    """1 when the response ends with its first <|im_end|>, 0 when it has none, -100 when it goes on past one
    (a rollout that ignored a stop token)."""
    if "<|im_end|>" not in response:
        return 0.0
    return 1.0 if response.index("<|im_end|>") == len(response) - len("<|im_end|>") else -100.0
