"""A user reward (module:function) that raises on some inputs and hangs on others."""

from __future__ import annotations

import time


def flaky(response: str, answer: str, **_: object) -> float:
    if answer in ("1", "2", "3"):
        raise RuntimeError(f"reward bug for answer {answer}")
    if answer in ("4", "5"):
        time.sleep(3600)
    return 1.0 if response.startswith(answer) else 0.0
