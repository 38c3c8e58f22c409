"""Telemetry: metrics.jsonl + TensorBoard (``MetricsWriter``), console progress (``ProgressBar``), PNG plots.

Plotting needs matplotlib, which ``plots`` imports only when a figure is drawn.
"""

from nsr_megatron.telemetry.metrics import METRICS_FILE, REQUIRED_KEYS, TB_DIR, MetricsWriter, read_metrics
from nsr_megatron.telemetry.plots import plot_reward_comparison, plot_run
from nsr_megatron.telemetry.progress import ProgressBar, format_postfix

__all__ = [
    "METRICS_FILE",
    "REQUIRED_KEYS",
    "TB_DIR",
    "MetricsWriter",
    "ProgressBar",
    "format_postfix",
    "plot_reward_comparison",
    "plot_run",
    "read_metrics",
]
