"""Shared fixtures: the real local stack (own folder and ports) and per-test isolation."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import jax
import pytest

from devstack.config import StackConfig
from devstack.stack import LocalStack
from tests.support.stack_gate import StackGate, exclusive_file_lock

REPO = Path(__file__).resolve().parents[1]

# The test stack never touches the quick start's stack: its own data folder and ports. A second
# test stack on one machine (fault tests run beside other test runs) moves every port by
# TEST_STACK_PORT_OFFSET and keeps its data in TEST_STACK_ROOT.
PORT_OFFSET = int(os.environ.get("TEST_STACK_PORT_OFFSET", "0"))
TEST_STACK_CONFIG = StackConfig.test_stack(
    Path(os.environ.get("TEST_STACK_ROOT", REPO / ".stack-test")),
    REPO / ".stack" / "cache",
    PORT_OFFSET,
)

# One JAX compilation cache for the whole run, this process and every process it starts
# (workers, APIs, rebuild workers): each worker and app built by a test compiles the same
# preprocessing executables at start-up, and from the cache the second and later ones load
# them instead (~1.9 s of ~3 s each, quiet machine; the suite builds well over a hundred).
# Compile counts still mean what they meant: the preprocessor counts the shapes it compiles
# either way, and a cache hit is one backend compilation fewer, never one more.
JAX_CACHE_ENVIRONMENT = {
    "JAX_COMPILATION_CACHE_DIR": str(TEST_STACK_CONFIG.root / "jax-cache"),
    # Cache every executable, however quickly it compiled and however small it is.
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}
for _name, _value in JAX_CACHE_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)
# JAX reads these variables once, when it is first imported: perhaps before this file was.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


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
        # Under pytest-xdist every worker process starts the stack: the first installs and
        # starts it, the others wait for it and find it up.
        lock = self.local.config.root / ".test-stack-start.lock"
        try:
            with exclusive_file_lock(lock, timeout_s=_START_TIMEOUT_S, what="the stack's start"):
                if not all(service.healthy() for service in self.local.services):
                    self.local.up()
        except BaseException as exc:  # handed to every test that needs the stack
            self.error = exc

    def wait(self) -> LocalStack:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.local


# A first install on a slow machine included; up() itself has a deadline for each service.
_START_TIMEOUT_S = 1800.0
# Longer than a test stopping a service holds the stack; pytest-timeout (600 s for a test's
# setup, call and teardown together) stops a longer wait first.
_GATE_TIMEOUT_S = 590.0
_START = pytest.StashKey[_BackgroundStart]()
_GATE = pytest.StashKey[StackGate]()
# Set in the process that runs no tests, the pytest-xdist controller: was the stack up before?
_UP_BEFORE = pytest.StashKey[bool]()
_STOPS_SERVICES = "stops_services"


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _is_xdist_controller(config: pytest.Config) -> bool:
    return not _is_xdist_worker(config) and getattr(config.option, "dist", "no") != "no"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_STOPS_SERVICES}: stops or kills a service of the shared test stack; runs while no "
        "other stack test runs (pytest-xdist workers included)",
    )
    if _is_xdist_controller(config) and not config.option.collectonly:
        local = LocalStack(TEST_STACK_CONFIG)
        config.stash[_UP_BEFORE] = all(service.healthy() for service in local.services)


def _needs_stack(item: pytest.Item) -> bool:
    return "stack" in getattr(item, "fixturenames", ())


def _order(item: pytest.Item, *, parallel: bool) -> int:
    """Tests that need no stack first (they run while it starts), then the fault scenarios
    (the longest modules: started early, they do not end the run alone), then the rest.

    Under pytest-xdist (``parallel``) the tests that stop a service come before all: their
    file goes to one worker at once, which waits for the stack and runs them while the other
    workers run the unit tests, so that nobody waits at the gate for them (:class:`StackGate`).
    """
    if parallel and item.get_closest_marker(_STOPS_SERVICES):
        return 0
    if not _needs_stack(item):
        return 1
    return 2 if item.get_closest_marker("faults") else 3


def _file_orders(items: list[pytest.Item]) -> dict[Path, int]:
    """Under ``--dist loadfile`` a file is what a worker takes, whole: a file goes where its
    most demanding test goes (a stop of a service first, then a stack test), so that a file
    with one stack test among unit tests is not taken early and waits there for the stack
    and the gate while unit tests could run (it cost ~200 s of a worker's time in CI)."""
    orders: dict[Path, int] = {}
    for item in items:
        order = _order(item, parallel=True)
        # 0 (stops a service) outranks every other order; otherwise the larger one wins.
        orders[item.path] = max(orders.get(item.path, order), order, key=lambda o: (o == 0, o))
    return orders


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: only what will run counts
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the tests (:func:`_order`, stable: each group keeps its order; files whole
    under pytest-xdist, :func:`_file_orders`), and start the stack in the background if any
    selected test needs it."""
    if _is_xdist_worker(config):
        orders = _file_orders(items)
        items.sort(key=lambda item: orders[item.path])
    else:
        items.sort(key=lambda item: _order(item, parallel=False))
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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """A stack test enters the gate before its fixtures are set up (module fixtures
    included): shared, or alone when it stops a service (:class:`StackGate`)."""
    if _needs_stack(item):
        if _GATE not in item.config.stash:
            item.config.stash[_GATE] = StackGate(TEST_STACK_CONFIG.root, timeout_s=_GATE_TIMEOUT_S)
        exclusive = item.get_closest_marker(_STOPS_SERVICES) is not None
        item.config.stash[_GATE].enter(exclusive=exclusive)
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """The gate is left once the test's fixtures are torn down."""
    try:
        return (yield)
    finally:
        gate = item.config.stash.get(_GATE, None)
        if gate is not None and _needs_stack(item):
            gate.leave()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the stack the session started, even one no test waited for.

    Under pytest-xdist the controller stops it, after every worker finished, if it was not up
    before the run.
    """
    config = session.config
    if _is_xdist_worker(config):
        return
    if _is_xdist_controller(config):
        local = LocalStack(TEST_STACK_CONFIG)
        if not config.stash.get(_UP_BEFORE, True) and any(s.healthy() for s in local.services):
            local.down()
        return
    start = config.stash.get(_START, None)
    if start is None or start.already_up:
        return
    with contextlib.suppress(BaseException):  # a start that failed was reported by its tests
        start.wait()
    start.local.down()


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic, group and collection names."""
    return uuid.uuid4().hex[:10]
