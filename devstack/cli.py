"""``trident-stack``: the local stack on loopback (Kafka, Milvus, Triton, worker, query API).

trident-stack up          install what is missing and start the services
trident-stack quickstart  up + a worker + the query API + sample images, then a sample search
trident-stack status      what runs where
trident-stack down        stop everything (data kept)
trident-stack reset       stop everything and delete the data
trident-stack models add NAME...  the running Triton serves these built-in models too (no restart)
trident-stack models list         the built-in models and what the running Triton does with each

``--models A,B`` (up, install, quickstart): Triton also serves these built-in models, e.g.
``efficientnet_lite1_embedding_uint8,efficientnet_lite2_embedding_uint8``; remembered for the
stack's root until another ``--models`` (``--models ""``: Lite0 alone). ``models add`` remembers
its models the same way.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import orjson

from devstack.config import StackConfig
from devstack.errors import StackError
from devstack.samples import copy_samples
from devstack.stack import LocalStack
from engine.cli_support import configure_logging
from engine.errors import UnknownModelError
from engine.kafka import ensure_topics
from engine.models import SERVED_MODEL_SPECS, model_spec
from engine.settings import Settings
from engine.store import VectorStore
from producer import EventPublisher, events_from_folder
from reembed.local import start_all

logger = logging.getLogger(__name__)


def quickstart(stack: LocalStack, *, api_port: int, timeout_s: float = 600) -> None:
    """Start everything, publish the sample images, wait until searchable, show a search.

    Raises:
        StackError: a service, the worker or the API did not come up, or the samples did not
            become searchable in time.
    """
    stack.up()
    samples = copy_samples(stack.config.root.resolve() / "samples")
    settings = stack.settings(
        fetch={"allowed_roots": [str(samples[0].parent)]},
        api={"port": api_port},
    )
    settings_file = stack.write_settings(settings)
    # Before the first publish: the broker would otherwise make an uncompacted ingest topic.
    ensure_topics(settings.kafka)
    worker = stack.start_worker(settings_file)
    # The workers of a rebuild (trident-reembed) write its new version, once switched the only
    # one of the collection's model: they come back with the stack.
    if restarted := start_all(stack.reembed_folder):
        print(f"started {restarted} rebuild worker(s) of trident-reembed again")
    stack.start_api(settings_file, port=api_port)

    with EventPublisher(settings.kafka) as publisher:
        report = publisher.publish_many(events_from_folder(samples[0].parent))
    print(f"published {report.delivered} sample images (failed: {report.failed})")
    _wait_searchable(settings, report.delivered, worker_log=worker.log_file, timeout_s=timeout_s)

    query = samples[0]
    response = httpx.post(
        f"http://{settings.api.host}:{api_port}/search",
        json={"query_input": str(query), "topk": 3},
        timeout=60,
    )
    response.raise_for_status()
    print(f"\nsearch with {query.name}:")
    for hit in response.json():
        print(f"  {hit['score']:.3f}  {hit['id']}  {orjson.dumps(hit['metadata']).decode()}")
    print(
        f"\nquery API: http://{settings.api.host}:{api_port}  (POST /search, GET /health)\n"
        f"settings:  {settings_file}\nlogs:      {stack.config.root.resolve()}/*/*.log\n"
        "stop with: make down"
    )


def _wait_searchable(
    settings: Settings, expected: int, *, worker_log: Path, timeout_s: float
) -> None:
    store = VectorStore(settings.milvus)
    deadline = time.monotonic() + timeout_s
    count = 0
    while time.monotonic() < deadline:
        try:
            count = store.count()
        except Exception as exc:  # the collection appears with the worker's first batch
            logger.debug("count not available yet: %s", exc)
        if count >= expected:
            print(f"{count} vectors stored and searchable")
            store.close()
            return
        time.sleep(1)
    store.close()
    raise StackError(f"only {count}/{expected} samples stored after {timeout_s:.0f}s", worker_log)


def _valid_models_action(action: Sequence[str]) -> bool:
    return (bool(action) and action[0] == "add" and len(action) > 1) or list(action) == ["list"]


def _models_command(stack: LocalStack, action: Sequence[str]) -> None:
    """``models add NAME...`` and ``models list``.

    Raises:
        StackError: as :meth:`LocalStack.serve_models`; for ``list``, Triton did not answer.
    """
    if action[0] == "add":
        loaded = stack.serve_models(action[1:])
        print(f"loaded: {', '.join(loaded) or 'nothing (all served already)'}")
        return
    if stack.triton.process.is_running():
        states = stack.triton.model_states()
    else:
        states = dict.fromkeys(stack.triton.models, "in the repository, triton not running")
    for name in sorted({*SERVED_MODEL_SPECS, *states}):
        print(f"{name:45s} {states.get(name, 'not in the repository')}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trident-stack", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "command", choices=["install", "up", "quickstart", "status", "down", "reset", "models"]
    )
    parser.add_argument("action", nargs="*", help="models: add NAME... | list")
    parser.add_argument(
        "--root", type=Path, default=Path(".stack"), help="Folder for data and logs."
    )
    parser.add_argument("--api-port", type=int, default=8080)
    parser.add_argument(
        "--models",
        default=None,
        help="built-in models Triton serves besides EfficientNet-Lite0's, comma-separated "
        '(remembered; "" for none): ' + ", ".join(sorted(set(SERVED_MODEL_SPECS))),
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if args.command != "models" and args.action:
        parser.error(f"{args.command} takes no more arguments (got {' '.join(args.action)})")
    if args.command == "models" and not _valid_models_action(args.action):
        parser.error("use: models add NAME... | models list")
    try:  # an unknown name is a usage error, as for --models
        for name in args.action[1:]:
            model_spec(name)
    except UnknownModelError as exc:
        parser.error(str(exc))
    # None: the stack's remembered choice; a list, even empty, is a new choice.
    models = None
    if args.models is not None:
        models = [name.strip() for name in args.models.split(",") if name.strip()]
    try:
        stack = LocalStack(StackConfig(root=args.root), models=models)
    except UnknownModelError as exc:
        parser.error(str(exc))
    try:
        if args.command == "install":
            stack.install()
        elif args.command == "up":
            stack.up()
        elif args.command == "quickstart":
            quickstart(stack, api_port=args.api_port)
        elif args.command == "down":
            stack.down()
        elif args.command == "models":
            _models_command(stack, args.action)
        elif args.command == "reset":
            stack.down()
            for service in (stack.kafka, stack.milvus):
                service.reset()
        if args.command in ("up", "status", "quickstart"):
            for name, info in stack.status().items():
                print(f"{name:10s} " + " ".join(f"{k}={v}" for k, v in info.items()))
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
