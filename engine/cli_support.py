"""What every command-line entry point does first: logging and settings."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine.settings import Settings, load_settings


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML settings file (environment variables TRIDENT_<SECTION>__<KEY> override it).",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR.")


def configure_logging(level: str) -> None:
    """Log at ``level`` (a name such as ``INFO``) on stderr, third-party clients quieter.

    Call it once pymilvus is loaded, if the command uses it: importing pymilvus configures its
    loggers anew (see :func:`_quiet_pymilvus`).
    """
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # Third-party clients are chatty at INFO.
    for noisy in ("httpx", "httpcore", "jax._src", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if "pymilvus" in sys.modules:  # not imported here: the producer's commands never load it
        _quiet_pymilvus(debug=level.upper() == "DEBUG")


def _quiet_pymilvus(*, debug: bool) -> None:
    """pymilvus logs every failed call at ERROR with its traceback, on a handler of its own,
    before raising; engine.store translates each of those errors into ours, which our callers
    report once, in a line (a bad filter, an invalid name). Its records are kept for DEBUG only,
    through our handler and format. Its import configures its loggers (logging.config), undoing
    this: hence after it.
    """
    for name in ("pymilvus", *_children("pymilvus")):
        found = logging.getLogger(name)
        for handler in list(found.handlers):
            found.removeHandler(handler)
        found.propagate = True
        found.setLevel(logging.DEBUG if debug else logging.CRITICAL)


def _children(name: str) -> list[str]:
    prefix = f"{name}."
    return [child for child in logging.root.manager.loggerDict if child.startswith(prefix)]


def settings_from_arguments(args: argparse.Namespace) -> Settings:
    """Configure logging and read the settings: the first thing every ``main`` does."""
    configure_logging(args.log_level)
    return load_settings(args.config)
