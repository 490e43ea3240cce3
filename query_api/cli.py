"""``trident-api``: serve the query API with uvicorn."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import uvicorn

from engine.cli_support import add_common_arguments, settings_from_arguments
from query_api.app import create_app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trident-api", description="Serve similarity search over HTTP."
    )
    add_common_arguments(parser)
    parser.add_argument("--host", default=None, help="Override api.host (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=None, help="Override api.port (default 8080).")
    args = parser.parse_args(argv)
    settings = settings_from_arguments(args)
    # The listening address decides whether API keys are required (api.auth: auto).
    api = settings.api.model_copy(
        update={"host": args.host or settings.api.host, "port": args.port or settings.api.port}
    )
    settings = settings.model_copy(update={"api": api})
    uvicorn.run(
        create_app(settings, freeze_heap=True),
        host=api.host,
        port=api.port,
        log_config=None,
        access_log=False,
        # "auto" takes httptools and uvloop, which the distribution installs where they exist.
        http="auto",
        loop="auto",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
