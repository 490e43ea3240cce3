"""Make the workers' collection and, once, the alias the query API searches.

Run by the Job trident-milvus-alias (milvus-alias-job.yaml) with the app image and the apps'
settings: TRIDENT_MILVUS__COLLECTION names the workers' collection (created as a worker would
create it), SEARCH_ALIAS the alias the query API reads. An alias that exists already is left
where it points, so running this again after a model upgrade never moves searches back; see
docs/OPERATIONS.md "Upgrading the model". Exit status 1 when the alias name is taken by a
collection.
"""

from __future__ import annotations

import logging
import os
import sys

from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from engine.settings import load_settings
from engine.store import VectorStore

logger = logging.getLogger("milvus_alias")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = load_settings().milvus
    alias = os.environ["SEARCH_ALIAS"]
    store = VectorStore(settings)
    client = MilvusClient(uri=settings.uri, token=settings.token, timeout=settings.timeout_s)
    try:
        collection = store.ensure_collection()
        try:
            target = client.describe_alias(alias=alias)["collection_name"]
        except MilvusException:
            target = None
        if target is not None:
            logger.info("alias %s already points at %s: left as it is", alias, target)
            return 0
        if client.has_collection(alias):
            logger.error("%s is a collection, not an alias: rename or drop it first", alias)
            return 1
        client.create_alias(collection_name=collection, alias=alias)
        logger.info("alias %s now points at %s", alias, collection)
        return 0
    finally:
        store.close()
        client.close()


if __name__ == "__main__":
    sys.exit(main())
