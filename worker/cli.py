"""``trident-worker``: run one consumer-group worker process."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from engine.cli_support import add_common_arguments, settings_from_arguments
from engine.errors import ConfigurationError, TridentError
from worker.runner import run_worker

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trident-worker", description="Consume ingest events, embed the images, store vectors."
    )
    add_common_arguments(parser)
    parser.add_argument("--worker-id", default=None, help="Name in logs and dead-letter headers.")
    args = parser.parse_args(argv)
    try:
        settings = settings_from_arguments(args)
        run_worker(settings, worker_id=args.worker_id)
    except ConfigurationError as exc:
        logger.error("configuration error: %s", exc)
        return 2
    except TridentError as exc:
        logger.error("worker failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
