"""Conversion throughput and peak memory on a synthetic Qwen3-MoE of >= 2 GB, next to a plain file copy.

    python bench/bench_convert.py [--size-gb 2.2] [--repeat 2] [--dir /tmp] [--keep]

Writes random bf16 safetensors shards (straight to disk, no transformers model), then times, each in
a fresh subprocess that samples its own RSS every 5 ms (psutil) during the timed work:

- ``copy``: ``shutil.copyfile`` of every shard (the I/O floor for moving the same bytes);
- ``hf-to-mcore``: :func:`nsr_megatron.convert.hf_to_mcore`;
- ``mcore-to-hf``: :func:`nsr_megatron.convert.mcore_to_hf` back to HF shards (compared byte for byte).

Each step runs ``--repeat`` times after an ``os.sync()`` (the machine may be shared): the fastest
time and the largest peak RSS are reported. Throughput is model bytes / wall time. The files sit in the page cache for every run (written just
before), so all three read from memory and write through the page cache with an fsync at the end.
Everything is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, threading, time
import psutil
import torch
torch.set_num_threads(1)
what, a, b = sys.argv[1], sys.argv[2], sys.argv[3]
if what != "copy":
    import torch.distributed.checkpoint  # noqa: F401  (a one-time import of about 1 s, not conversion work)
    from nsr_megatron.convert import hf_to_mcore, mcore_to_hf
proc, peak, done = psutil.Process(), [0], threading.Event()
def sample():
    while not done.wait(0.005):
        peak[0] = max(peak[0], proc.memory_info().rss)
start_rss = proc.memory_info().rss
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
t = time.perf_counter()
if what == "copy":
    import os, shutil
    from pathlib import Path
    Path(b).mkdir(parents=True, exist_ok=True)
    for p in sorted(Path(a).glob("*.safetensors")):
        shutil.copyfile(p, Path(b) / p.name)
    for p in sorted(Path(b).glob("*.safetensors")):
        fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.close(fd)
elif what == "hf-to-mcore":
    hf_to_mcore(a, b, progress=False)
else:
    mcore_to_hf(a, b, progress=False, max_shard_bytes=512 * 2**20)
elapsed = time.perf_counter() - t
done.set(); sampler.join()
print(json.dumps({"seconds": elapsed, "start_rss": start_rss, "peak_rss": max(peak[0], start_rss),
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def synthetic_config(size_gb: float) -> dict:
    """A Qwen3-MoE whose bf16 weights total about ``size_gb`` GB (layers scale to reach it)."""
    hidden, experts, moe_ffn, vocab = 1024, 64, 512, 32768
    per_layer = experts * 3 * hidden * moe_ffn + 2 * hidden * hidden + 2 * 256 * hidden + experts * hidden
    layers = max(2, round((size_gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2048,
        "moe_intermediate_size": moe_ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "num_experts": experts,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "dtype": "bfloat16",
    }


def write_synthetic(hf_dir: Path, config: dict, shard_bytes: int = 512 * 2**20) -> int:
    """Random bf16 tensors in the hub layout, streamed to shards; returns the total bytes."""
    from nsr_megatron.convert.io import SafetensorsWriter, write_hf_index
    from nsr_megatron.convert.mapping import model_order, weight_rules
    from nsr_megatron.models.hf_config import arch_from_hf

    hf_dir.mkdir(parents=True)
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    names = [
        (r.hf_names[j], r.hf_shapes[j])
        for r, p in model_order(weight_rules(arch_from_hf(config)))
        for j in p.hf_index
    ]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in names:
        nbytes = 2 * int(torch.tensor(shape).prod())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter(hf_dir / file, [(n, torch.bfloat16, s) for n, s in shard])
        for name, shape in shard:
            total += w.write(name, (torch.rand(shape, generator=gen) - 0.5).to(torch.bfloat16))
            weight_map[name] = file
        w.close()
    write_hf_index(hf_dir, weight_map, total)
    return total


def run_child(what: str, a: Path, b: Path) -> dict:
    os.sync()  # start every run with no dirty pages left over from the previous step
    out = subprocess.run(
        [sys.executable, "-c", CHILD, what, str(a), str(b)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_bytes(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, tuple[str, int]]:
        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        return index

    ia, ib = tensors(a), tensors(b)
    if ia.keys() != ib.keys():
        return False
    handles: dict[Path, object] = {}

    def get(d: Path, file: str, name: str) -> torch.Tensor:
        p = d / file
        if p not in handles:
            handles[p] = safe_open(str(p), "pt")
        return handles[p].get_tensor(name)  # type: ignore[attr-defined]

    ok = all(torch.equal(get(a, ia[n], n), get(b, ib[n], n)) for n in ia)
    handles.clear()
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.2)
    ap.add_argument("--repeat", type=int, default=2, help="runs per step; the fastest is reported")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.dir))
    try:
        config = synthetic_config(args.size_gb)
        t = time.perf_counter()
        total = write_synthetic(scratch / "hf", config)
        print(
            f"synthetic Qwen3-MoE: {config['num_hidden_layers']} layers x {config['num_experts']} experts, "
            f"{total / 1e9:.2f} GB bf16 (written in {time.perf_counter() - t:.1f} s)"
        )
        rows = []
        for what, a, b in [
            ("copy", scratch / "hf", scratch / "copy"),
            ("hf-to-mcore", scratch / "hf", scratch / "mcore"),
            ("mcore-to-hf", scratch / "mcore" / "step_00000000", scratch / "hf2"),
        ]:
            runs = []
            for _ in range(args.repeat):
                if b.exists():
                    shutil.rmtree(b)
                runs.append(run_child(what, a, b))
            r = dict(min(runs, key=lambda x: x["seconds"]))
            r["growth"] = max(x["peak_rss"] - x["start_rss"] for x in runs)
            r["peak_rss"] = max(x["peak_rss"] for x in runs)
            rows.append((what, r))
            print(
                f"{what:12s} {r['seconds']:7.2f} s  {total / r['seconds'] / 1e9:6.2f} GB/s  "
                f"peak RSS {r['peak_rss'] / 2**30:5.2f} GiB, +{r['growth'] / 2**30:5.3f} GiB over the process "
                f"before the work (imports: {r['start_rss'] / 2**30:4.2f} GiB)"
            )
            if what == "copy":
                shutil.rmtree(b)
        print("round trip byte-identical:", same_bytes(scratch / "hf", scratch / "hf2"))
        copy_s = rows[0][1]["seconds"]
        for what, r in rows[1:]:
            print(
                f"{what}: {copy_s / r['seconds']:.2f} x copy throughput; peak RSS {r['peak_rss'] / total:.1%} "
                f"of the model size ({r['growth'] / total:.1%} for the conversion itself)"
            )
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
