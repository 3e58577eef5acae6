"""Run every benchmark script in bench/ (`make bench`); `--quick` is passed through.

Scripts run one after another in their own process, in a fixed order where one reads
another's result (slow_links reads the best settings of codecs and local_updates), then any other
`*_bench.py` found here. A failing script does not stop the others; the exit status is 1
if any failed.

    python -m bench.run_all [--quick] [--only codecs,slow_links]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS

HERE = Path(__file__).resolve().parent
ORDER = ["codecs", "local_updates", "slow_links", "churn", "join", "checkpoint"]
# Scripts that have no --quick of their own get smaller arguments in a quick run.
QUICK_ARGS = {
    "checkpoint": [
        "--megabytes",
        "8",
        "--repeats",
        "1",
        "--output",
        str(RESULTS / "checkpoint_quick.json"),
    ],
}


def scripts() -> list[str]:
    found = sorted(p.name.removesuffix("_bench.py") for p in HERE.glob("*_bench.py"))
    return [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke runs; results go to *_quick")
    parser.add_argument("--only", help="comma-separated names, e.g. codecs,slow_links")
    args = parser.parse_args()
    names = scripts()
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"no such benchmark: {', '.join(unknown)} (have {', '.join(names)})")
        names = [n for n in names if n in wanted]

    # Some scripts use the test-bed helpers under tests/, as `make bench` arranges.
    paths = [str(HERE.parent / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    outcome: list[tuple[str, int, float]] = []
    for name in names:
        extra = QUICK_ARGS.get(name, ["--quick"]) if args.quick else []
        command = [sys.executable, "-m", f"bench.{name}_bench", *extra]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        code = subprocess.run(command, cwd=HERE.parent, env=env).returncode
        outcome.append((name, code, time.perf_counter() - started))

    print("\n== summary")
    for name, code, seconds in outcome:
        print(f"{name:12} {'ok' if code == 0 else f'FAILED ({code})':12} {seconds:7.0f} s")
    return 0 if all(code == 0 for _, code, _ in outcome) else 1


if __name__ == "__main__":
    raise SystemExit(main())
