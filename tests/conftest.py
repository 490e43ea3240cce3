"""Shared fixtures: the real local stack (own folder and ports) and per-test isolation."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from pathlib import Path

import pytest

from devstack.config import StackConfig
from devstack.stack import LocalStack

REPO = Path(__file__).resolve().parents[1]

# The test stack never touches the quick start's stack: its own data folder and ports. A second
# test stack on one machine (fault tests run beside other test runs) moves every port by
# TEST_STACK_PORT_OFFSET and keeps its data in TEST_STACK_ROOT.
PORT_OFFSET = int(os.environ.get("TEST_STACK_PORT_OFFSET", "0"))
TEST_STACK_CONFIG = StackConfig(
    root=Path(os.environ.get("TEST_STACK_ROOT", REPO / ".stack-test")),
    cache=REPO / ".stack" / "cache",
    kafka_port=29092 + PORT_OFFSET,
    kafka_controller_port=29093 + PORT_OFFSET,
    triton_http_port=28000 + PORT_OFFSET,
    triton_grpc_port=28001 + PORT_OFFSET,
    triton_metrics_port=28002 + PORT_OFFSET,
    milvus_port=29530 + PORT_OFFSET,
)


class _BackgroundStart:
    """The test stack's installation and start, run in a thread from the end of collection.

    Tests that need no stack run first (:func:`pytest_collection_modifyitems`), so a fresh
    machine installs and starts Kafka, Triton and Milvus while the unit tests run instead of
    before the first stack test. The ``stack`` fixture joins the thread and re-raises what it
    raised.
    """

    def __init__(self, local: LocalStack) -> None:
        self.local = local
        self.already_up = all(service.healthy() for service in local.services)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-stack-start", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.local.up()
        except BaseException as exc:  # handed to every test that needs the stack
            self.error = exc

    def wait(self) -> LocalStack:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.local


_START = pytest.StashKey[_BackgroundStart]()


def _needs_stack(item: pytest.Item) -> bool:
    return "stack" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: only what will run counts
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the tests that need no stack first (stable: each group keeps its order), and start
    the stack in the background if any selected test needs it."""
    items.sort(key=_needs_stack)
    if config.option.collectonly:
        return
    if _START not in config.stash and any(_needs_stack(item) for item in items):
        logging.getLogger("devstack").setLevel(logging.INFO)
        config.stash[_START] = _BackgroundStart(LocalStack(TEST_STACK_CONFIG))


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> LocalStack:
    """The real stack, started for the session (in the background from collection on) and
    stopped after it if the session started it (:func:`pytest_sessionfinish`).

    A service that cannot be installed or started fails every test that uses it, loudly,
    with the service's name and log in the error.
    """
    if _START not in request.config.stash:
        request.config.stash[_START] = _BackgroundStart(LocalStack(TEST_STACK_CONFIG))
    return request.config.stash[_START].wait()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the stack the session started, even one no test waited for."""
    start = session.config.stash.get(_START, None)
    if start is None or start.already_up:
        return
    with contextlib.suppress(BaseException):  # a start that failed was reported by its tests
        start.wait()
    start.local.down()


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic, group and collection names."""
    return uuid.uuid4().hex[:10]
