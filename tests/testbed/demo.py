"""`make demo`: the local demo. Not built yet: it says so instead of pretending."""

import sys


def main() -> int:
    print(
        "make demo is not implemented yet: the node agent and the demo driver are still to be "
        "built (see the README's Status section). `make test` runs everything that exists.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
