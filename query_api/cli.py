"""``trident-api``: serve the query API with uvicorn.

Exit codes, as the worker's and the producer's: 0 stopped; 1 a service needed at start-up was
unavailable (Triton's model not ready within ``triton.ready_timeout_s``); 2 a configuration
error (an unknown or invalid setting, no API key for an exposed API, a model Triton does not
serve). Each is reported in one line on stderr, saying what to change.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import uvicorn
from litestar import Litestar

from engine.cli_support import add_common_arguments, settings_from_arguments
from engine.errors import ConfigurationError, TridentError
from engine.settings import Settings
from query_api.app import create_app
from query_api.security import api_keys
from query_api.service import SearchService

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_UNAVAILABLE, EXIT_CONFIGURATION = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trident-api", description="Serve similarity search over HTTP."
    )
    add_common_arguments(parser)
    parser.add_argument("--host", default=None, help="Override api.host (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=None, help="Override api.port (default 8080).")
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
        app = _started_app(settings)
    except ConfigurationError as exc:
        logger.error("configuration error: %s", _one_line(exc))
        return EXIT_CONFIGURATION
    except TridentError as exc:
        logger.error("cannot start the query API: %s", _one_line(exc))
        return EXIT_UNAVAILABLE
    uvicorn.run(
        app,
        host=settings.api.host,
        port=settings.api.port,
        log_config=None,
        access_log=False,
        # "auto" takes httptools and uvloop, which the distribution installs where they exist.
        http="auto",
        loop="auto",
    )
    return EXIT_OK


def _settings(args: argparse.Namespace) -> Settings:
    """The settings, with ``--host`` and ``--port`` applied.

    Raises:
        ConfigurationError: the settings file or the environment holds an unknown or invalid key.
    """
    settings = settings_from_arguments(args)
    # The listening address decides whether API keys are required (api.auth: auto).
    api = settings.api.model_copy(
        update={"host": args.host or settings.api.host, "port": args.port or settings.api.port}
    )
    return settings.model_copy(update={"api": api})


def _started_app(settings: Settings) -> Litestar:
    """The app, its service started here (Triton's model ready) rather than in the lifespan:
    a failure then is one line and an exit code, not uvicorn's traceback of the lifespan.

    Raises:
        ConfigurationError: no API key for an exposed API, or a model Triton does not serve.
        InferenceUnavailableError: Triton's model was not ready within its timeout.
    """
    api_keys(settings.api)  # an exposed API without keys fails before anything is built
    service = SearchService.from_settings(settings)
    try:
        app = create_app(settings, service=service, freeze_heap=True)
        service.start()
    except BaseException:
        service.close()
        raise
    return app


def _one_line(exc: Exception) -> str:
    """The error's message on one line (pydantic's list their problems one per line, with a
    link to its documentation, which says nothing the problem does not)."""
    lines = (line.strip() for line in str(exc).splitlines())
    return " ".join(line for line in lines if line and not line.startswith("For further"))


if __name__ == "__main__":
    sys.exit(main())
