"""Helpers of the query API's real-stack tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from litestar import Litestar

from tests.integration.conftest import wait_for


@contextmanager
def served(app: Litestar) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port (lifespan included); yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None))
    thread = threading.Thread(target=server.run, name="api-under-test", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=120, what="uvicorn started")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive(), "uvicorn did not stop within 30 s"
