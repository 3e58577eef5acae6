"""Write text shards for the example job: one object per shard, one record per line.

    python write_shards.py --endpoint minio.storage:9000 --bucket ckpt --prefix corpus/

Credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. The text is the Python
documentation's (`pydoc_data`, shipped with CPython), cut into lines of words.
"""

from __future__ import annotations

import argparse
import io
import os
import textwrap

from minio import Minio


def corpus_lines(width: int = 60) -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(" ".join(topics[key].split()) for key in sorted(topics))
    return textwrap.wrap(text, width)


def write_shards(client: Minio, bucket: str, prefix: str, shards: int, records: int) -> int:
    """Write `shards` objects of up to `records` lines each; returns the records written."""
    lines = corpus_lines()[: shards * records]
    for shard in range(shards):
        part = lines[shard::shards]
        data = ("\n".join(part) + "\n").encode()
        client.put_object(bucket, f"{prefix}part-{shard:05d}.txt", io.BytesIO(data), len(data))
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="host:port of the S3 endpoint")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="corpus/")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--records-per-shard", type=int, default=500)
    parser.add_argument("--insecure", action="store_true", help="plain HTTP")
    args = parser.parse_args()
    client = Minio(
        args.endpoint,
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        secure=not args.insecure,
    )
    if not client.bucket_exists(args.bucket):
        client.make_bucket(args.bucket)
    count = write_shards(client, args.bucket, args.prefix, args.shards, args.records_per_shard)
    print(f"wrote {count} records in {args.shards} shards to s3://{args.bucket}/{args.prefix}")


if __name__ == "__main__":
    main()
