"""What every command-line entry point does first: logging and settings."""

from __future__ import annotations

import argparse
import logging
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
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # Third-party clients are chatty at INFO.
    for noisy in ("httpx", "httpcore", "jax._src", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def settings_from_arguments(args: argparse.Namespace) -> Settings:
    """Configure logging and read the settings: the first thing every ``main`` does."""
    configure_logging(args.log_level)
    return load_settings(args.config)
