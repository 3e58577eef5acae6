"""Codec speed on one device: encode + decode of a 100M-element gradient vs memory bandwidth.

For int8 (block 256), top-k (1%, with its error-feedback add) and per-layer PowerSGD
(rank 4, one peer: P = M Q, orthonormalize, Q = M^T P, decompress, residual) the script
times encode + decode of the same fp32 gradient, reports the gradient's fp32 bytes per
second of that time (GB/s, higher is better), and sets it beside the device's memory
bandwidth measured in the same run (a device-to-device copy: bytes read + written per
second). `fraction_of_copy` is the codec's GB/s over the copy's.

The gradient is six 4096 x 4096 weight matrices plus 1.3M vector elements (100.0M in
all), the shape PowerSGD needs. Timings are medians of `--repeats` runs after a warm-up,
each bracketed by device synchronisation.

    python -m bench.gpu_codecs_bench            # CUDA; says SKIPPED and exits 0 without one
    python -m bench.gpu_codecs_bench --quick    # 2M elements, on the CPU if there is no GPU
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import RESULTS, bar_plot, median, print_table, write_result
from collabtrain_trainer.codecs import BlockQuantCodec, ErrorFeedback, PowerSGD, TopKCodec


def shapes(scale: float) -> list[tuple[int, ...]]:
    side = max(64, round(4096 * scale**0.5))
    return [(side, side)] * 6 + [(max(1, round(1_300_000 * scale)),)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `work`, after one warm-up run."""
    work()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        work()
        sync(device)
        times.append(time.perf_counter() - started)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--numel-scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a small smoke run, CPU if no GPU")
    args = parser.parse_args()
    if args.quick:
        args.numel_scale, args.repeats = 0.02, 2
        if not torch.cuda.is_available():
            args.device = "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        # `make bench` runs every script; on a machine without a GPU this one has nothing to do.
        print("SKIPPED: no CUDA device here, gpu_codecs.json not written (--device cpu smokes)")
        return
    layer_shapes = shapes(args.numel_scale)
    numel = sum(torch.Size(s).numel() for s in layer_shapes)
    gradient = torch.randn(numel, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    nbytes = 4 * numel

    copy_seconds = timed(lambda: gradient.clone(), device, args.repeats)
    copy_gbps = 2 * nbytes / copy_seconds / 1e9  # a copy reads and writes every byte

    int8 = BlockQuantCodec(bits=8, block_size=256)
    topk = ErrorFeedback(TopKCodec(ratio=0.01))
    powersgd = PowerSGD(rank=4, shapes=layer_shapes)
    codecs: dict[str, Callable[[], object]] = {
        "int8 block 256": lambda: int8.decode(int8.encode(gradient, generator), numel),
        "top-k 1% +EF": lambda: topk.codec.decode(topk.compress("g", gradient), numel),
        "PowerSGD r4 per layer +EF": lambda: powersgd.compress_locally(gradient),
    }
    rows: list[dict[str, Any]] = [
        {
            "codec": "device copy (reference)",
            "seconds": copy_seconds,
            "GB_per_s": copy_gbps,
            "fraction_of_copy": 1.0,
        }
    ]
    for name, work in codecs.items():
        seconds = timed(work, device, args.repeats)
        gbps = nbytes / seconds / 1e9
        rows.append(
            {
                "codec": name,
                "seconds": seconds,
                "GB_per_s": gbps,
                "fraction_of_copy": gbps / copy_gbps,
            }
        )
    print_table(rows, ["codec", "seconds", "GB_per_s", "fraction_of_copy"])
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "numel": numel,
        "memory_GB_per_s": copy_gbps,
        "codec_GB_per_s": {row["codec"]: row["GB_per_s"] for row in rows[1:]},
    }
    name = "gpu_codecs" if device.type == "cuda" and args.numel_scale == 1.0 else "gpu_codecs_quick"
    print(write_result(name, summary, rows))
    bar_plot(
        RESULTS / f"{name}.png",
        {row["codec"]: {"GB/s": row["GB_per_s"]} for row in rows},
        "GB of fp32 gradient per second (copy: bytes read + written)",
        f"{summary['device']}, {numel / 1e6:.0f}M elements",
    )


if __name__ == "__main__":
    main()
