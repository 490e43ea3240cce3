"""Point the alias the query API searches at the workers' collection, once.

Run by the Job trident-milvus-alias (milvus-alias-job.yaml) with the app image and the apps'
settings: TRIDENT_MILVUS__COLLECTION names the workers' collection (the workers create it when
they start; this waits up to COLLECTION_WAIT_S seconds for it), SEARCH_ALIAS the alias the
query API reads. An alias that exists already is left where it points, so running this again
after a model change never moves searches back; see docs/OPERATIONS.md "Changing the model".
Exit status 1 when the alias name is taken by a collection or the collection never appears.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from engine.settings import load_settings

logger = logging.getLogger("milvus_alias")
_POLL_S = 5.0


def _alias_target(client: MilvusClient, alias: str) -> str | None:
    try:
        return str(client.describe_alias(alias=alias)["collection_name"])
    except MilvusException:
        return None  # no such alias


def _wait_for_collection(client: MilvusClient, name: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while not client.has_collection(name):
        if time.monotonic() >= deadline:
            return False
        logger.info("waiting for collection %s (the workers create it when they start)", name)
        time.sleep(_POLL_S)
    return True


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = load_settings().milvus
    alias = os.environ["SEARCH_ALIAS"]
    wait_s = float(os.environ.get("COLLECTION_WAIT_S", "600"))
    client = MilvusClient(uri=settings.uri, token=settings.token, timeout=settings.timeout_s)
    try:
        target = _alias_target(client, alias)
        if target is not None:
            logger.info("alias %s already points at %s: left as it is", alias, target)
            return 0
        if client.has_collection(alias):
            logger.error("%s is a collection, not an alias: rename or drop it first", alias)
            return 1
        if not _wait_for_collection(client, settings.collection, wait_s):
            logger.error("collection %s did not appear within %.0f s", settings.collection, wait_s)
            return 1
        client.create_alias(collection_name=settings.collection, alias=alias)
        logger.info("alias %s now points at %s", alias, settings.collection)
        return 0
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
