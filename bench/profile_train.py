"""The train phase alone: one optimizer step of the bench_vs_trl setup (128 samples of a 3-token prompt and 8
response tokens, DAPO, the tiny 7.1M-parameter Qwen3-MoE of bench/bench_vs_trl.py, one process), timed, and with
``--profile`` the top ops of ``torch.profiler`` over 5 steps.

Usage: python bench/profile_train.py [--threads 1] [--profile] [--rows 25]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()

    import bench_vs_trl
    import torch

    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig, load_config, read_hf_config
    from nsr_megatron.convert.sharded import load_hf_sharded
    from nsr_megatron.losses.policy import loss_denominators
    from nsr_megatron.losses.reduce import global_sums
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.models.tiny import create_tiny_hf_checkpoint
    from nsr_megatron.trainer import actor
    from nsr_megatron.trainer.experience import Sample, pack_micro_batches

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        hf = Path(d) / "hf"
        create_tiny_hf_checkpoint(hf, seed=1, **bench_vs_trl.TINY_MODEL)
        arch = arch_from_hf(read_hf_config(hf))
        parallel.initialize(ParallelConfig(), seed=1)
        bundle = build_model(arch, model=ModelConfig(hf_path=str(hf)), parallel=ParallelConfig(),
                             optimizer=OptimizerConfig(lr=2e-3))
        load_hf_sharded(bundle.module, arch, str(hf))
    g = torch.Generator().manual_seed(0)
    samples = [Sample(uid=i, prompt_ids=[1, 5 + i % 10, 17], response_ids=torch.randint(4, 32, (8,), generator=g).tolist(),
                      rollout_logprobs=[-1.0] * 8, reward=float(i % 2), advantage=float(i % 3 - 1)) for i in range(128)]
    micro = pack_micro_batches(samples, max_tokens=4096, pad_id=0)
    loss_cfg = load_config(None, ["loss.name=dapo"]).loss

    def step() -> None:
        den = global_sums([loss_denominators(loss_cfg, mb["mask"]) for mb in micro], [actor.data_parallel_group()])
        fn = actor.policy_loss_fn(loss_cfg, step=0, temperature=1.0, global_num_tokens=den["tokens"],
                                  global_num_seqs=den["seqs"], scale=float(len(micro)), old_from_current=True)
        actor.train_step(bundle, micro, fn, lr=2e-3)

    for _ in range(3):
        step()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    tokens = sum(int(mb["mask"].sum()) for mb in micro)
    print(f"train step: median {statistics.median(times) * 1e3:.1f} ms over 10 ({len(micro)} micro-batch(es), "
          f"{tokens} response tokens, {torch.get_num_threads()} thread(s))")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    parallel.destroy()


if __name__ == "__main__":
    main()
