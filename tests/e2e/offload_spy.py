"""The CLI with a spy on the RL loop (tests of rollout.offload_train): while the engine generates it records how
many bytes the policy's and the reference's training state still hold on the device, and while the policy trains
how many the engine's weights hold; written as JSON lines to ``$NSR_OFFLOAD_SPY``."""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def _device_bytes(tensors: Any) -> int:
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def main() -> int:
    from nsr_megatron.cli import main as cli_main
    from nsr_megatron.trainer import actor, loop

    out = open(os.environ["NSR_OFFLOAD_SPY"], "a", encoding="utf-8")  # noqa: SIM115 (closed at exit)
    sample_batch, train_step = loop.sample_batch, actor.train_step
    current: dict[str, Any] = {}

    def spy_sample(rt: Any, step: int, phases: Any) -> Any:
        current["rt"] = rt
        out.write(json.dumps({"phase": "rollout", "step": step, "train_state": _device_bytes(rt.train_state()),
                              "engine": _device_bytes(rt.engine.model.parameters())}) + "\n")
        return sample_batch(rt, step, phases)

    def spy_train(bundle: Any, *args: Any, **kwargs: Any) -> Any:
        rt = current["rt"]
        out.write(json.dumps({"phase": "train", "train_state": _device_bytes(rt.train_state()),
                              "engine": _device_bytes(rt.engine.model.parameters())}) + "\n")
        return train_step(bundle, *args, **kwargs)

    loop.sample_batch, actor.train_step = spy_sample, spy_train  # type: ignore[assignment]
    try:
        return cli_main(sys.argv[1:])
    finally:
        out.close()


if __name__ == "__main__":
    sys.exit(main())
