"""Checkpoint throughput against a plain `minio` client on the same MinIO server, same run.

Upload: `CheckpointWriter` (BLAKE3 chunk digests, the state stream's multipart upload
straight from the snapshot's tensors, metadata, manifest, `latest`, retention), timed from
`submit` returning to `flush` returning, versus `fput_object` of the very bytes the writer
uploaded. Restore: `CheckpointReader.load_latest` (pointer, listing, manifest, parallel
ranged reads into the tensors with a digest check per chunk, metadata) versus `fget_object`
of the same objects. Fractions are raw time / our time, so 1.0 means "as fast as the bare
client" and more is faster. Also: how long training is blocked per checkpoint (the CPU
snapshot copy into the writer's reused buffers, plus `submit`; the first, allocating, copy
is reported separately), against a plain copy of the same tensors into memory that is
already allocated (`memcpy_ms`), the bound for any snapshot.

Medians of `--repeats` runs. Starts its own MinIO through the test-bed helpers.

    python bench/checkpoint_bench.py [--megabytes 96] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
# Runnable both as `python bench/checkpoint_bench.py` and `python -m bench.checkpoint_bench`.
sys.path.insert(0, str(ROOT))

from bench.common import machine, median  # noqa: E402
from collabtrain_trainer.checkpoint import (  # noqa: E402
    CheckpointReader,
    CheckpointStore,
    CheckpointWriter,
    snapshot_state,
)
from collabtrain_trainer.config import CheckpointConfig  # noqa: E402
from testbed.cluster import MinioServer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "checkpoint.json"
JOB = "bench"


def build_model(megabytes: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model whose parameters take about `megabytes`/3 MiB, so parameters plus the two
    AdamW moments come to about `megabytes` MiB."""
    width = 1024
    layers = max(1, round(megabytes / 3 * 1024 * 1024 / 4 / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()  # materialize the optimizer state
    return model, optimizer


def run(megabytes: float, repeats: int) -> dict[str, Any]:
    server = MinioServer().start()
    try:
        client = server.client()
        bucket = "bench"
        client.make_bucket(bucket)
        env = {"BENCH_AK": server.access_key, "BENCH_SK": server.secret_key}
        config = CheckpointConfig.model_validate(
            {
                "endpoint": server.endpoint,
                "bucket": bucket,
                "secure": False,
                "keep_last": 2,
                "access_key_env": "BENCH_AK",
                "secret_key_env": "BENCH_SK",
            }
        )
        store = CheckpointStore(config, JOB, env=env)
        writer = CheckpointWriter(config, JOB, store=store)
        reader = CheckpointReader(config, JOB, store=store)
        model, optimizer = build_model(megabytes)
        data = torch.Generator().manual_seed(0)

        blocked, memcpy, ours_up, ours_down, raw_up, raw_down = [], [], [], [], [], []
        total_bytes = 0
        with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as scratch:
            for repeat in range(repeats):
                step = repeat + 1
                started = time.perf_counter()
                snapshot = snapshot_state(
                    model, optimizer, step, step * 64, step, data, buffers=writer.buffers
                )
                writer.submit(snapshot, step)
                submitted = time.perf_counter()
                if not writer.flush(timeout=300):
                    raise RuntimeError(f"checkpoint upload did not finish: {writer.status()}")
                done = time.perf_counter()
                blocked.append((submitted - started) * 1000)
                ours_up.append(done - submitted)

                started = time.perf_counter()
                loaded = reader.load_latest()
                ours_down.append(time.perf_counter() - started)
                if loaded is None or loaded.step != step:
                    raise RuntimeError(f"restore returned {loaded and loaded.step}, not {step}")

                # The plain copy a snapshot cannot beat: the same tensors into memory
                # that is already allocated.
                sources = [*model.state_dict().values()] + [
                    value
                    for state in optimizer.state.values()
                    for value in state.values()
                    if isinstance(value, torch.Tensor)
                ]
                targets = [torch.empty_like(tensor) for tensor in sources]
                for target, source in zip(targets, sources, strict=True):
                    target.copy_(source)  # touch the pages once, as reused buffers are
                started = time.perf_counter()
                for target, source in zip(targets, sources, strict=True):
                    target.copy_(source)
                memcpy.append((time.perf_counter() - started) * 1000)
                del targets

                # The very bytes the writer uploaded, through the bare client.
                assert loaded.manifest.state is not None
                keys = [entry.key for entry in loaded.manifest.objects.values()]
                keys.append(loaded.manifest.state.key)
                files = []
                for key in keys:
                    path = Path(scratch) / key
                    response = client.get_object(bucket, store.layout.object_key(step, key))
                    path.write_bytes(response.read())
                    response.close()
                    response.release_conn()
                    files.append(path)
                total_bytes = sum(path.stat().st_size for path in files)
                started = time.perf_counter()
                for path in files:
                    client.fput_object(bucket, f"raw/{path.name}", str(path))
                raw_up.append(time.perf_counter() - started)
                started = time.perf_counter()
                for path in files:
                    client.fget_object(bucket, f"raw/{path.name}", str(path) + ".down")
                raw_down.append(time.perf_counter() - started)
                for path in files:
                    os.unlink(str(path) + ".down")
                del loaded
        writer.close()
    finally:
        server.destroy()

    mib = total_bytes / 1024 / 1024
    result = {
        "upload_fraction_of_raw": median(raw_up) / median(ours_up),
        "restore_fraction_of_raw": median(raw_down) / median(ours_down),
        # The first snapshot allocates its buffers; later ones reuse them.
        "training_blocked_ms": median(blocked[1:] if len(blocked) > 1 else blocked),
        "training_blocked_ms_first": blocked[0],
        "memcpy_ms": median(memcpy),
        "format": "checkpoint format 2: state.bin of raw tensors, BLAKE3 per 8 MiB chunk",
        "checkpoint_bytes": total_bytes,
        "repeats": repeats,
        "upload_s": median(ours_up),
        "raw_fput_s": median(raw_up),
        "restore_s": median(ours_down),
        "raw_fget_s": median(raw_down),
        "upload_mib_per_s": mib / median(ours_up),
        "raw_fput_mib_per_s": mib / median(raw_up),
        "restore_mib_per_s": mib / median(ours_down),
        "raw_fget_mib_per_s": mib / median(raw_down),
        "samples": {
            "training_blocked_ms": blocked,
            "memcpy_ms": memcpy,
            "upload_s": ours_up,
            "raw_fput_s": raw_up,
            "restore_s": ours_down,
            "raw_fget_s": raw_down,
        },
        "machine": {
            **machine(),
            "torch": torch.__version__,
            "server": "MinIO on 127.0.0.1 (test bed), same machine",
        },
    }
    return result


def print_table(result: dict[str, Any]) -> None:
    mib = result["checkpoint_bytes"] / 1024 / 1024
    print(f"checkpoint of {mib:.1f} MiB, medians of {result['repeats']} runs")
    print(f"{'':24}{'ours':>12}{'raw client':>12}{'fraction':>10}")
    print(
        f"{'upload (MiB/s)':24}{result['upload_mib_per_s']:>12.1f}"
        f"{result['raw_fput_mib_per_s']:>12.1f}{result['upload_fraction_of_raw']:>10.2f}"
    )
    print(
        f"{'restore (MiB/s)':24}{result['restore_mib_per_s']:>12.1f}"
        f"{result['raw_fget_mib_per_s']:>12.1f}{result['restore_fraction_of_raw']:>10.2f}"
    )
    print(
        f"{'training blocked (ms)':24}{result['training_blocked_ms']:>12.1f}"
        f"{result['memcpy_ms']:>12.1f}   (raw: a copy into allocated memory; first "
        f"snapshot, allocating: {result['training_blocked_ms_first']:.1f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=96.0, help="checkpoint size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args.megabytes, args.repeats)
    print_table(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
