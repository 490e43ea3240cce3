"""``jax-embedding``: the earlier pipeline's command line, on :class:`ImageEmbeddingPipeline`.

Commands: ``embed``, ``insert``, ``search``, ``delete`` (publishes deletes for the workers:
:meth:`ImageEmbeddingPipeline.delete_images`), ``collection list|create|stats|delete`` and
``health``. ``--config`` reads the earlier YAML (:meth:`ServiceConfig.from_yaml`); without it the
earlier environment variables and the local stack's defaults apply.

Exit codes: 0 done; 1 a service is unavailable (or, for ``health``, down); 2 a usage or
configuration error; 3 a bad input (missing or unreadable image, unknown collection or a name
Milvus cannot hold, bad filter). Errors are printed as one line on stderr, saying what to change
(third-party clients' own error logs, pymilvus's tracebacks among them, are silenced unless
``--log-level DEBUG``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.cli_support import configure_logging
from engine.errors import ConfigurationError, PermanentError, RetriableError, TridentError

if TYPE_CHECKING:
    from jax_embedding.config import ServiceConfig
    from jax_embedding.pipeline import ImageEmbeddingPipeline

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, EXIT_BAD_INPUT = 0, 1, 2, 3
PROBE_TIMEOUT_S = 5.0  # seconds the health command waits for each service
HEALTH_DEADLINE_S = PROBE_TIMEOUT_S + 1.0  # ... and for all of them, asked at once
_EPILOG = (
    "exit codes: 0 done, 1 a service is unavailable (health: one is down), "
    "2 usage or configuration error, 3 bad input (image, collection, filter)"
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    # Imported for a command only: the config and the pipeline load JAX, pymilvus and
    # tritonclient (~3 s here), which --help and usage errors do not need. The pipeline (which
    # every command builds) before logging is configured: importing pymilvus configures its
    # loggers anew (engine.cli_support).
    import jax_embedding.pipeline  # noqa: F401, PLC0415
    from jax_embedding.config import ServiceConfig  # noqa: PLC0415

    try:
        # Either side of the command may carry these; unset ones are absent (SUPPRESS).
        path, level = getattr(args, "config", None), getattr(args, "log_level", None)
        config = ServiceConfig.from_yaml(path) if path else ServiceConfig()
        configure_logging(level or config.log_level)
        result: int = args.run(args, config)
        return result
    except ConfigurationError as exc:
        return _fail(f"configuration error: {exc}", EXIT_USAGE)
    except PermanentError as exc:
        return _fail(f"error: {exc}", EXIT_BAD_INPUT)
    except RetriableError as exc:
        return _fail(f"unavailable: {exc} (check with: jax-embedding health)", EXIT_UNAVAILABLE)
    except TridentError as exc:
        return _fail(f"error: {exc}", EXIT_UNAVAILABLE)


# Commands ---------------------------------------------------------------------------------------


def _embed(args: argparse.Namespace, config: ServiceConfig) -> int:
    with (
        _pipeline(config) as pipeline,
        _progress(args, config, "embedding") as advance,
    ):
        embeddings = pipeline.embed_images(args.files, args.batch_size, progress=advance)
    if args.output:
        np.save(args.output, embeddings)
        print(f"saved {embeddings.shape[0]} x {embeddings.shape[1]} embeddings to {args.output}")
    else:
        print(f"shape: {embeddings.shape}")
        print(embeddings)
    return EXIT_OK


def _insert(args: argparse.Namespace, config: ServiceConfig) -> int:
    metadata = _metadata(args.metadata)
    with _pipeline(config) as pipeline:
        collection = args.collection or config.milvus.collection_name
        if args.create_collection and pipeline.create_collection(collection):
            print(f"created collection {collection}")
        with _progress(args, config, "inserting") as advance:
            ids = pipeline.insert_images(
                args.files, args.ids, metadata, collection, args.batch_size, progress=advance
            )
    print(f"inserted {len(ids)} images into {collection}")
    return EXIT_OK


def _search(args: argparse.Namespace, config: ServiceConfig) -> int:
    with _pipeline(config) as pipeline:
        results = pipeline.search_images(args.file, args.topk, args.collection, args.filter)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for rank, hit in enumerate(results, 1):
            print(f"{rank}. {hit['id']}  score={hit['score']:.4f}  {json.dumps(hit['metadata'])}")
        if not results:
            print("no results")
    return EXIT_OK


def _delete(args: argparse.Namespace, config: ServiceConfig) -> int:
    with _pipeline(config) as pipeline:
        published = pipeline.delete_images(args.ids, args.collection)
    if args.json:
        print(json.dumps(published, indent=2))
        return EXIT_OK
    for item in published:
        print(
            f"{item['id']}: delete version {item['version']}, partition {item['partition']} "
            f"offset {item['offset']}"
        )
    collection = published[0]["collection"]
    print(
        f"published {len(published)} deletes for {collection} to {config.kafka.topic}: a "
        "worker removes the images (trident-dlq status ID says when)"
    )
    return EXIT_OK


def _collection_list(_args: argparse.Namespace, config: ServiceConfig) -> int:
    with _pipeline(config) as pipeline:
        for name in pipeline.list_collections():
            print(name)
    return EXIT_OK


def _collection_create(args: argparse.Namespace, config: ServiceConfig) -> int:
    with _pipeline(config) as pipeline:
        created = pipeline.create_collection(args.name, args.dim, args.description)
    print(f"{'created' if created else 'already exists:'} collection {args.name}")
    return EXIT_OK


def _collection_stats(args: argparse.Namespace, config: ServiceConfig) -> int:
    with _pipeline(config) as pipeline:
        print(json.dumps(pipeline.get_collection_stats(args.name), indent=2))
    return EXIT_OK


def _collection_delete(args: argparse.Namespace, config: ServiceConfig) -> int:
    with _pipeline(config) as pipeline:
        pipeline.delete_collection(args.name)
    print(f"deleted collection {args.name}")
    return EXIT_OK


def _health(_args: argparse.Namespace, config: ServiceConfig) -> int:
    # Imported for this command only (see main). The probes are the query API's and the
    # worker's (engine.health), asked at once: the answer comes within HEALTH_DEADLINE_S.
    from engine.health import kafka_probe, milvus_probe, probe_all, triton_probe  # noqa: PLC0415
    from engine.inference import TritonEmbedder  # noqa: PLC0415
    from engine.store import VectorStore  # noqa: PLC0415

    config = config.model_copy(deep=True)
    # A service that is down should say so in seconds, not after a whole request timeout.
    config.triton.timeout = config.milvus.timeout = PROBE_TIMEOUT_S
    settings = config.to_settings()
    embedder, store = TritonEmbedder(settings.triton), VectorStore(settings.milvus)
    try:
        probes = {
            "kafka": kafka_probe(settings.kafka, PROBE_TIMEOUT_S),
            "triton": triton_probe(embedder, PROBE_TIMEOUT_S),
            "milvus": milvus_probe(store, PROBE_TIMEOUT_S),
        }
        results = probe_all(probes, HEALTH_DEADLINE_S)
    finally:
        embedder.close()
        store.close()
    addresses = {
        "kafka": settings.kafka.bootstrap_servers,
        "triton": f"{settings.triton.url} ({settings.triton.protocol}, model "
        f"{settings.triton.model_name})",
        "milvus": settings.milvus.uri,
    }
    for service in ("kafka", "triton", "milvus"):
        result = results[service]
        why = "" if result.up else f": {result.detail}"
        print(f"{service:<7} {'up' if result.up else 'DOWN':<5} {addresses[service]}{why}")
    return EXIT_OK if all(result.up for result in results.values()) else EXIT_UNAVAILABLE


# Helpers ----------------------------------------------------------------------------------------


def _pipeline(config: ServiceConfig) -> ImageEmbeddingPipeline:
    from jax_embedding.pipeline import ImageEmbeddingPipeline  # noqa: PLC0415 (see main)

    return ImageEmbeddingPipeline(config)


def _metadata(text: str | None) -> list[dict[str, Any]] | dict[str, Any] | None:
    """``--metadata``: JSON (one object for all files, or a list, one per file) or a file of it."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = json.loads(Path(text).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigurationError(f"--metadata is neither JSON nor a JSON file: {exc}") from exc
    if not isinstance(value, dict | list):
        raise ConfigurationError("--metadata must be a JSON object or a list of objects")
    return value


@contextmanager
def _progress(
    args: argparse.Namespace, config: ServiceConfig, what: str
) -> Iterator[Callable[[int], object] | None]:
    """A progress bar on stderr (default: on a terminal, when there is more than one batch)."""
    shown = args.progress
    if shown is None:
        batch = args.batch_size or config.preprocess.batch_size
        shown = sys.stderr.isatty() and len(args.files) > batch
    if not shown:
        yield None
        return
    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(what, total=len(args.files))
        yield lambda done: bar.advance(task, done)


def _fail(message: str, code: int) -> int:
    print(message, file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="the earlier pipeline's YAML config (default: environment variables, local stack)",
    )
    common.add_argument(
        "--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO, WARNING or ERROR"
    )
    parser = argparse.ArgumentParser(
        prog="jax-embedding",
        description="Embed images, store them in Milvus, search them.",
        epilog=_EPILOG,
        parents=[common],
    )
    parser.set_defaults(run=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, run: Callable[..., int], text: str, on: Any = commands) -> Any:
        sub = on.add_parser(name, help=text, description=text, epilog=_EPILOG, parents=[common])
        sub.set_defaults(run=run)
        return sub

    def batching(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--batch-size", type=int, default=None, help="images per batch")
        sub.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="show a progress bar (default: on a terminal, for many files)",
        )

    embed = command("embed", _embed, "Embed images (paths or URLs) and save the vectors.")
    embed.add_argument("files", nargs="+", metavar="FILE", help="image path or http(s) URL")
    embed.add_argument("--output", type=Path, help="write the (n, dim) array here (.npy)")
    batching(embed)

    insert = command("insert", _insert, "Embed images and store them in a collection.")
    insert.add_argument("files", nargs="+", metavar="FILE", help="image path or http(s) URL")
    insert.add_argument("--ids", nargs="+", help="one id per file (default: the files)")
    insert.add_argument("--collection", help="collection name (default: milvus.collection_name)")
    insert.add_argument(
        "--create-collection", action="store_true", help="create the collection if missing"
    )
    insert.add_argument(
        "--metadata", help="JSON object for every file, or a list with one per file (or a file)"
    )
    batching(insert)

    search = command("search", _search, "Find the stored images most similar to one image.")
    search.add_argument("file", metavar="FILE", help="query image path or http(s) URL")
    search.add_argument("--topk", type=int, default=10, help="number of results (default 10)")
    search.add_argument("--collection", help="collection name (default: milvus.collection_name)")
    search.add_argument("--filter", help='Milvus filter, e.g. \'metadata["category"] == "cat"\'')
    search.add_argument("--json", action="store_true", help="print the results as JSON")

    delete = command(
        "delete",
        _delete,
        "Delete images by id: publish deletes to kafka.topic, which the workers apply.",
    )
    delete.add_argument("ids", nargs="+", metavar="ID", help="the id of an image to delete")
    delete.add_argument("--collection", help="collection name (default: milvus.collection_name)")
    delete.add_argument("--json", action="store_true", help="print where each delete went as JSON")

    collection = command("collection", _no_action, "Manage collections.")
    actions = collection.add_subparsers(title="actions", metavar="ACTION")
    command("list", _collection_list, "List the collections.", actions)
    create = command("create", _collection_create, "Create a collection.", actions)
    create.add_argument("--name", required=True, help="collection name")
    create.add_argument("--dim", type=int, help="vector dimension (default: embedding_dim)")
    create.add_argument("--description", default="", help="free text")
    for name, run, text in (
        ("stats", _collection_stats, "Row count, dimension and index of a collection."),
        ("delete", _collection_delete, "Drop a collection and its data."),
    ):
        command(name, run, text, actions).add_argument("--name", required=True)

    command("health", _health, "Check Kafka, Triton and Milvus; exit 1 when one is down.")
    return parser


def _no_action(_args: argparse.Namespace, _config: ServiceConfig) -> int:
    raise ConfigurationError("collection needs an action: list, create, stats or delete")


if __name__ == "__main__":
    sys.exit(main())
