"""`collabtrain-operator`: run the kopf operator with collabtrain's handlers."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys

import kopf

from collabtrain_operator import handlers, settings  # noqa: F401 (importing registers the handlers)

DEFAULT_PEERING = "collabtrain"


def parse_args(
    argv: list[str] | None, defaults: settings.OperatorOptions | None = None
) -> argparse.Namespace:
    defaults = defaults or settings.OperatorOptions()
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
    parser.add_argument(
        "--master-key-file",
        default=defaults.master_key_file,
        help="file holding the master key every job's credentials derive from "
        f"(default: ${settings.MASTER_KEY_FILE_ENV})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        defaults = settings.OperatorOptions.from_env()
        arguments = parse_args(argv, defaults)
        options = dataclasses.replace(
            defaults,
            metrics_port=arguments.metrics_port,
            reconcile_interval_seconds=arguments.reconcile_interval,
            master_key_file=arguments.master_key_file,
        )
        settings.read_master_key(options.master_key_file)  # fail now, not in kopf's loop
    except settings.ConfigurationError as error:
        print(f"collabtrain-operator: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # With --namespace kopf would peer through namespaced KopfPeering objects; the start-up
    # handler (handlers.configure) keeps peering on the chart's ClusterKopfPeering.
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
