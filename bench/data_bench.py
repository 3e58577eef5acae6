"""How fast a peer reads its leased shard from S3, against reading the object whole.

A real MinIO on loopback holds `--shards` shards of `--megabytes` MiB each, lines of
about 100 bytes. Alternating, `--repeats` times each:
- `stream`: what a peer does (`dataset.ShardStore` and `ShardStream`): one GET from the
  lease's offset, records taken 16 at a time (a micro-batch), the offset kept per record
  so that a commit can say where the used records end;
- `whole_object`: the baseline, `get_object(...).read()` then `split(b"\\n")`: the whole
  shard in memory first, no position kept.
Figures: MiB/s and records/s of each (medians), and `fraction` = stream / whole_object.
This is the shard reader alone, not a peer's training loop (the JSON says so).

    python -m bench.data_bench [--quick]
"""

from __future__ import annotations

import argparse
import io
import random
import secrets
import time
from typing import Any

from bench.common import median, print_table, write_result

MIB = 1 << 20


def shard_text(megabytes: float, seed: int) -> bytes:
    rng = random.Random(seed)
    words = [secrets.token_hex(rng.randint(1, 6)) for _ in range(2000)]
    lines, size = [], 0
    while size < megabytes * MIB:
        line = " ".join(rng.choice(words) for _ in range(12))
        lines.append(line)
        size += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--megabytes", type=float, default=32.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.shards, args.megabytes, args.repeats = 2, 4.0, 1

    from testbed.cluster import MinioServer

    if True:  # one MinIO for both readers
        server = MinioServer().start()
        try:
            client = server.client()
            bucket = "bench-data"
            client.make_bucket(bucket)
            total_bytes = 0
            for shard in range(args.shards):
                data = shard_text(args.megabytes, shard)
                total_bytes += len(data)
                client.put_object(bucket, f"shards/{shard:03d}", io.BytesIO(data), len(data))
            store = server.shard_store(bucket, "shards/")

            def stream() -> int:
                records = 0
                for shard in range(args.shards):
                    reader = store.open(shard, 0)
                    while not reader.finished:
                        records += len(reader.records(16))
                return records

            def whole_object() -> int:
                records = 0
                for key in store.keys:
                    response = client.get_object(bucket, key)
                    try:
                        records += sum(1 for line in response.read().split(b"\n") if line)
                    finally:
                        response.close()
                        response.release_conn()
                return records

            seconds: dict[str, list[float]] = {"stream": [], "whole_object": []}
            counts: dict[str, int] = {}
            for _ in range(args.repeats):
                for name, read in (("stream", stream), ("whole_object", whole_object)):
                    started = time.perf_counter()
                    counts[name] = read()
                    seconds[name].append(time.perf_counter() - started)
        finally:
            server.destroy()

    assert counts["stream"] == counts["whole_object"], counts
    rows: list[dict[str, Any]] = []
    for name, times in seconds.items():
        elapsed = median(times)
        rows.append(
            {
                "reader": name,
                "seconds": elapsed,
                "mib_per_s": total_bytes / MIB / elapsed,
                "records_per_s": counts[name] / elapsed,
            }
        )
    print_table(rows, ["reader", "seconds", "mib_per_s", "records_per_s"])
    fraction = rows[0]["mib_per_s"] / rows[1]["mib_per_s"]
    print(f"stream / whole object: {fraction:.2f}")
    write_result(
        "data_quick" if args.quick else "data",
        {
            "stream_mib_per_s": rows[0]["mib_per_s"],
            "whole_object_mib_per_s": rows[1]["mib_per_s"],
            "stream_records_per_s": rows[0]["records_per_s"],
            "fraction": fraction,
            "records": counts["stream"],
            "bytes": total_bytes,
            "path": "the shard reader a peer uses (ShardStore, ShardStream), not a peer's "
            "training loop",
        },
        rows,
    )


if __name__ == "__main__":
    main()
