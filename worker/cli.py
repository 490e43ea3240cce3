"""``trident-worker``: run one consumer-group worker process.

Several on one host share the consumer group; each needs its own health port (``--health-port``,
0 for any free one). Exit status: 0 stopped cleanly, 1 a service failed it, 2 the settings are
wrong (the health port taken included), each said in one line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from engine.cli_support import add_common_arguments, settings_from_arguments
from engine.errors import ConfigurationError, TridentError
from worker.health import check_port_free
from worker.runner import run_worker

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trident-worker", description="Consume ingest events, embed the images, store vectors."
    )
    add_common_arguments(parser)
    parser.add_argument("--worker-id", default=None, help="Name in logs and dead-letter headers.")
    parser.add_argument(
        "--health-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="Port of /livez, /readyz, /metrics (worker.health_port; 0: any free port, logged). "
        "Each worker on a host needs its own.",
    )
    args = parser.parse_args(argv)
    try:
        settings = settings_from_arguments(args)
        if args.health_port is not None:
            settings = settings.model_copy(
                update={
                    "worker": settings.worker.model_copy(update={"health_port": args.health_port})
                }
            )
        check_port_free(settings.worker.health_host, settings.worker.health_port)
        run_worker(settings, worker_id=args.worker_id)
    except ConfigurationError as exc:
        logger.error("configuration error: %s", exc)
        return 2
    except TridentError as exc:
        logger.error("worker failed: %s", exc)
        return 1
    return 0


def _port(text: str) -> int:
    port = int(text) if text.isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return port


if __name__ == "__main__":
    sys.exit(main())
