"""`collabtrain-operator`: run the kopf operator with collabtrain's handlers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import kopf

from collabtrain_operator import handlers  # registers the handlers

DEFAULT_PEERING = "collabtrain"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = handlers.OperatorOptions.from_env()
    parser = argparse.ArgumentParser(
        prog="collabtrain-operator",
        description="Reconcile CollaborativeTrainingJobs: a coordinator and spot peers per job.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable; glob patterns allowed); default: all",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch all (default)")
    parser.add_argument(
        "--peering",
        default=DEFAULT_PEERING,
        help="ClusterKopfPeering object shared by the replicas (default: %(default)s)",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="no peering: only for a single replica (tests, development)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=defaults.metrics_port,
        help="Prometheus /metrics port; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8081/healthz",
        help="liveness endpoint URL (default: %(default)s)",
    )
    parser.add_argument(
        "--reconcile-interval",
        type=float,
        default=defaults.reconcile_interval_seconds,
        help="seconds between passes over a quiet job (default: %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    options = handlers.OperatorOptions(
        metrics_port=arguments.metrics_port,
        reconcile_interval_seconds=arguments.reconcile_interval,
        coordinator_url_template=handlers.OperatorOptions.from_env().coordinator_url_template,
    )
    asyncio.run(
        kopf.operator(
            clusterwide=not arguments.namespace,
            namespaces=arguments.namespace,
            standalone=arguments.standalone,
            peering_name=None if arguments.standalone else arguments.peering,
            liveness_endpoint=arguments.liveness or None,
            memo=kopf.Memo(options=options),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
