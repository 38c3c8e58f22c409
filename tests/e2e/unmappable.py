"""``python -m tests.e2e.unmappable <nsr-megatron args>``: the CLI, with every mapping of a rollout engine's shared
weights failing as it does from another PID namespace (for the test of ``rollout.weight_sync=auto``'s fallback)."""

from __future__ import annotations

import sys

from nsr_megatron.rollout.weight_sync import SharedLayout, SharedMappings


def _unmappable(self: SharedMappings, layout: SharedLayout) -> dict:
    raise RuntimeError(f"cannot map the rollout engine's shared weights {layout.path} (simulated)")


if __name__ == "__main__":
    SharedMappings._map = _unmappable  # type: ignore[method-assign]
    from nsr_megatron.cli import main

    sys.exit(main(sys.argv[1:]))
