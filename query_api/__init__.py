"""The query API: a Litestar service answering similarity searches."""

from query_api.app import create_app
from query_api.service import SearchService

__all__ = ["SearchService", "create_app"]
