"""Weight sync and sharded loading on a model of about 1 GB, on 2 gloo ranks (CPU).

Prints, for the rank-0 driver:
- a host memory copy of the model's bytes (the baseline, measured in the same process);
- the group-local export alone (every HF tensor on rank 0, packed into flat buckets) by bucket size;
- export plus push to a project rollout server over a gloo weight-update group (``/update_weights_from_distributed``,
  one broadcast per bucket, the server copying into its model) by bucket size;
- the shared-memory sync to the same server (``rollout.weight_sync=shared_memory``: the server's weights live in a
  shared-memory file, each rank writes its own shards into it; no buckets), warm (the mapping kept between syncs,
  as in a run) and the first sync (which also maps the pages);
each as GB/s and as a ratio to the memory copy. And, per rank, the bytes read and the peak RSS of sharded loading
against a full read of the checkpoint.

Usage: python bench/bench_weight_sync.py [--layout ep2|pp2|tp2] [--buckets 64,256,512]
(builds the model once under bench/out/sync-model; about 3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=4096, hidden_size=1024,
             intermediate_size=2048, moe_intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=4, head_dim=128, num_experts=16, num_experts_per_tok=2, max_position_embeddings=256)
LAYOUTS = {"ep2": {"ep": 2}, "pp2": {"pp": 2}, "tp2": {"tp": 2, "sequence_parallel": True}}


def _peak_rss() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(rank: int, world: int, init: str, hf_dir: str, layout: str, buckets_mb: list[int], out: str) -> None:
    import gc

    import torch

    from nsr_megatron import parallel
    from nsr_megatron.config import ModelConfig, ParallelConfig, read_hf_config
    from nsr_megatron.convert.sharded import HFExport, load_hf_sharded, read_hf_canonical
    from nsr_megatron.models.hf_config import arch_from_hf
    from nsr_megatron.models.provider import build_model
    from nsr_megatron.models.state import load_canonical_state
    from nsr_megatron.rollout import HttpEngine
    from nsr_megatron.rollout.pool import EngineLauncher, EnginePool
    from nsr_megatron.rollout.weight_sync import SharedMappings, buckets

    torch.set_num_threads(1)
    par = ParallelConfig(**LAYOUTS[layout])
    arch = arch_from_hf(read_hf_config(hf_dir))
    parallel.initialize(par, seed=1, rank=rank, world_size=world, init_method=init)
    model = build_model(arch, model=ModelConfig(hf_path=hf_dir), parallel=par, role="reference").module
    report: dict[str, object] = {}

    gc.collect()
    _reset_peak()
    base = _peak_rss()
    t0 = time.perf_counter()
    stats = load_hf_sharded(model, arch, hf_dir)
    report["sharded"] = {"seconds": time.perf_counter() - t0, "bytes_read": stats["bytes_read"],
                         "peak_rss_growth": _peak_rss() - base}
    gc.collect()
    _reset_peak()
    base = _peak_rss()
    t0 = time.perf_counter()
    load_canonical_state(model, read_hf_canonical(hf_dir, arch))
    report["full"] = {"seconds": time.perf_counter() - t0, "peak_rss_growth": _peak_rss() - base}
    gc.collect()

    export = HFExport(model, arch)
    total = sum(t.numel() * t.element_size() for _, t in export.tensors())  # also builds the plan
    if rank == 0:
        src = torch.empty(total, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        t0 = time.perf_counter()
        for _ in range(3):
            dst.copy_(src)
        report["memcpy_gbs"] = 3 * total / (time.perf_counter() - t0) / 1e9
        del src, dst
        report["model_bytes"] = total
    # The transport's own ceiling: a gloo broadcast of the model's bytes between the two ranks (TCP on loopback).
    buf = torch.empty(256 << 20, dtype=torch.uint8)
    torch.distributed.broadcast(buf, 0)
    t0 = time.perf_counter()
    for _ in range(4):
        torch.distributed.broadcast(buf, 0)
    report["gloo_gbs"] = 4 * buf.numel() / (time.perf_counter() - t0) / 1e9
    del buf
    pool = None
    if rank == 0:
        port = _free_port()
        launcher = EngineLauncher(command=[sys.executable, "-m", "nsr_megatron.rollout.server", "--model-path",
                                           hf_dir, "--port", str(port)], url=f"http://127.0.0.1:{port}",
                                  env={"OMP_NUM_THREADS": "1"})
        pool = EnginePool(launchers=[launcher], token=None, weights_dir=Path(out) / "w", hf_path=hf_dir).start()
    for mb in buckets_mb:
        t0 = time.perf_counter()
        for _ in buckets(export.tensors(), mb << 20):
            pass
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if pool is not None:
            pool.bucket_bytes = mb << 20
            pool.update_weights(export.tensors(), version=f"b{mb}")
            assert HttpEngine(pool.clients[0].base_url).weight_version() == f"b{mb}"
        else:
            for _ in export.tensors():
                pass
        report[f"bucket_{mb}"] = {"export_s": export_s, "push_s": time.perf_counter() - t0}
    # rollout.weight_sync=shared_memory: each rank writes its own shards into the server's weights in place.
    maps = SharedMappings()
    times = []
    for i in range(4):  # the first sync also maps the engine's pages
        torch.distributed.barrier()
        t0 = time.perf_counter()
        box: list[object] = [pool.open_shared_update() if pool is not None else None]
        torch.distributed.broadcast_object_list(box, src=0)
        export.write_into(maps.views(box[0]))  # type: ignore[arg-type]
        torch.distributed.barrier()
        if pool is not None:
            pool.close_shared_update(f"s{i}")
        times.append(time.perf_counter() - t0)
    report["shared_s"] = {"first": times[0], "warm": min(times[1:])}
    if pool is not None:
        pool.close()
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)
    parallel.destroy()


def _free_port() -> int:
    from nsr_megatron.rollout.weight_sync import free_port

    return free_port()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="ep2", choices=sorted(LAYOUTS))
    ap.add_argument("--buckets", default="64,256,512", help="bucket sizes in MiB")
    args = ap.parse_args()
    hf_dir = ROOT / "bench" / "out" / "sync-model"
    if not (hf_dir / "config.json").exists():
        from nsr_megatron.models.tiny import create_tiny_hf_checkpoint

        print("building the ~1 GB model ...", flush=True)
        create_tiny_hf_checkpoint(hf_dir, seed=1, **MODEL)
    from tests.spawn import run_workers

    with tempfile.TemporaryDirectory() as out:
        run_workers(worker, 2, str(hf_dir), args.layout, [int(b) for b in args.buckets.split(",")], out)
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(2)]
    r0 = ranks[0]
    size, memcpy = r0["model_bytes"], r0["memcpy_gbs"]
    gloo = r0["gloo_gbs"]
    print(f"model {size / 1e9:.2f} GB (fp32), layout {args.layout}, 2 gloo ranks; host memory copy {memcpy:.2f} GB/s; "
          f"gloo broadcast between the ranks {gloo:.2f} GB/s ({gloo / memcpy:.2f} x memcpy)")
    print("| bucket | export GB/s | x memcpy | export + push to a server GB/s | x memcpy |")
    print("|---|---|---|---|---|")
    for b in args.buckets.split(","):
        e = r0[f"bucket_{b}"]
        ex, push = size / e["export_s"] / 1e9, size / e["push_s"] / 1e9
        print(f"| {b} MiB | {ex:.2f} | {ex / memcpy:.2f} | {push:.2f} | {push / memcpy:.2f} |")
    sh = r0["shared_s"]
    warm, first = size / sh["warm"] / 1e9, size / sh["first"] / 1e9
    print(f"| shared memory (rollout.weight_sync=shared_memory, each rank writes its shards) | - | - | {warm:.2f} | "
          f"{warm / memcpy:.2f} |")
    print(f"(shared memory: the first sync, which also maps the engine's pages, {first:.2f} GB/s = "
          f"{first / memcpy:.2f} x memcpy)")
    print("| rank | sharded: bytes read | x model | peak RSS growth | full read: peak RSS growth | seconds (sharded / full) |")
    print("|---|---|---|---|---|---|")
    for r, rep in enumerate(ranks):
        s, f = rep["sharded"], rep["full"]
        print(f"| {r} | {s['bytes_read'] / 1e9:.2f} GB | {s['bytes_read'] / size:.2f} | "
              f"{s['peak_rss_growth'] / 2**20:.0f} MiB | {f['peak_rss_growth'] / 2**20:.0f} MiB | "
              f"{s['seconds']:.2f} / {f['seconds']:.2f} |")


if __name__ == "__main__":
    main()
