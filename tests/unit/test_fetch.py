"""ImageFetcher against real files and a real HTTP server on 127.0.0.1 (no other traffic)."""

from __future__ import annotations

import errno
import io
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from PIL import Image

import engine.fetch
from engine.errors import (
    FetchUnavailableError,
    ImageContentError,
    ImageReferenceError,
    Stage,
    TridentError,
)
from engine.fetch import ImageFetcher
from engine.settings import FetchSettings
from schemas.events import InlineImage, PathImage, UrlImage

LIMIT = 4096


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


class _Server(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[str] = []
        self.lock = threading.Lock()
        self.inflight = 0
        self.max_inflight = 0
        self.stopping = threading.Event()

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn); not needed, not wanted.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up mid-body on purpose (limits, timeouts)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_port}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.seen.append(self.path)
        self._route(self.path.partition("?")[0])

    def _route(self, path: str) -> None:
        statuses = {"/missing": 404, "/gone": 410, "/error": 500, "/busy": 429, "/denied": 403}
        redirects = {
            "/redirect-ok": "/image",
            "/redirect-metadata": "http://169.254.169.254/latest/meta-data/",
            "/redirect-localhost": f"http://localhost:{self.server.server_port}/image",
            "/redirect-ftp": "ftp://127.0.0.1/image.png",
            "/loop": "/loop",
        }
        if path in statuses:
            self._reply(statuses[path], b"nope")
        elif path in redirects:
            self.send_response(302)
            self.send_header("Location", redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/image":
            self._reply(200, PNG)
        elif path == "/slow-image":
            # Counted until the answer starts: a client gets its answer only after that, so a
            # request still "in flight" here is one the client really has open at once (a
            # count kept to the handler's end saw the next request before its own exit).
            with self.server.lock:
                self.server.inflight += 1
                self.server.max_inflight = max(self.server.max_inflight, self.server.inflight)
            time.sleep(0.15)
            with self.server.lock:
                self.server.inflight -= 1
            self._reply(200, PNG)
        elif path == "/slow":
            self.server.stopping.wait(1.0)
            self._reply(200, PNG)
        elif path == "/big":
            self._reply(200, b"x" * (2 * LIMIT))
        elif path == "/big-unsized":  # HTTP/1.0, no Content-Length: the body ends at close
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * (2 * LIMIT))
        elif path == "/drip":  # each byte well within the read timeout, the whole far beyond
            self.send_response(200)
            self.send_header("Content-Length", str(LIMIT))
            self.end_headers()
            for _ in range(LIMIT):
                if self.server.stopping.wait(0.05):
                    return
                self.wfile.write(b"x")
        else:
            self._reply(500, b"unknown test route")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield srv
    srv.stopping.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def make_fetcher() -> Iterator[Callable[..., ImageFetcher]]:
    fetchers: list[ImageFetcher] = []

    def make(transport: httpx.BaseTransport | None = None, **settings: Any) -> ImageFetcher:
        values: dict[str, Any] = {"timeout_s": 2.0, "max_bytes": LIMIT, **settings}
        fetcher = ImageFetcher(FetchSettings(**values), transport=transport)
        fetchers.append(fetcher)
        return fetcher

    yield make
    for fetcher in fetchers:
        fetcher.close()


@pytest.fixture
def no_network() -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport that fails the test if any request reaches it."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        raise AssertionError(f"request was sent to {request.url}")

    return httpx.MockTransport(handler), sent


def _fake_dns(monkeypatch: pytest.MonkeyPatch, *answers: list[str]) -> list[tuple[str, int]]:
    """Make getaddrinfo return ``answers`` in turn (the last one repeats); record the calls."""
    calls: list[tuple[str, int]] = []

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        calls.append((host, port))
        addresses = answers[min(len(calls), len(answers)) - 1]
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


def _no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        raise AssertionError(f"{host!r} must be refused without a DNS lookup")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def _expect(
    fetcher: ImageFetcher,
    ref: PathImage | UrlImage | InlineImage,
    error: type[TridentError],
    reason: str,
) -> TridentError:
    with pytest.raises(error) as info:
        fetcher.fetch(ref)
    assert info.value.reason == reason, info.value
    assert info.value.stage is Stage.FETCH
    if isinstance(ref, PathImage):
        named = repr(ref.path)  # repr: control characters stay escaped in logs
    elif isinstance(ref, UrlImage):
        named = str(ref.url).partition("?")[0]
    else:
        named = "inline image"
    assert named in str(info.value)
    return info.value


# Inline ---------------------------------------------------------------------------------------


def test_inline_bytes_are_returned_up_to_the_limit(
    make_fetcher: Callable[..., ImageFetcher],
) -> None:
    fetcher = make_fetcher()
    assert fetcher.fetch(InlineImage(data=b"x" * LIMIT)) == b"x" * LIMIT
    _expect(fetcher, InlineImage(data=b"x" * (LIMIT + 1)), ImageContentError, "too_many_bytes")


# Paths ----------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "root" / "sub" / "image.png").write_bytes(PNG)
    (tmp_path / "outside.png").write_bytes(PNG)
    return tmp_path / "root"


def test_path_inside_root_is_read(root: Path, make_fetcher: Callable[..., ImageFetcher]) -> None:
    fetcher = make_fetcher(allowed_roots=[root])
    assert fetcher.fetch(PathImage(path=str(root / "sub" / "image.png"))) == PNG
    (root / "inner-link.png").symlink_to(root / "sub" / "image.png")
    assert fetcher.fetch(PathImage(path=str(root / "inner-link.png"))) == PNG


def test_roots_are_resolved_too(root: Path, make_fetcher: Callable[..., ImageFetcher]) -> None:
    linked_root = root.parent / "linked-root"
    linked_root.symlink_to(root)
    fetcher = make_fetcher(allowed_roots=[linked_root])
    assert fetcher.fetch(PathImage(path=str(root / "sub" / "image.png"))) == PNG


@pytest.mark.parametrize(
    "relative",
    ["../outside.png", "sub/../../outside.png", "escape.png", "../missing.png", "/etc/passwd"],
)
def test_paths_escaping_the_root_are_refused(
    root: Path, relative: str, make_fetcher: Callable[..., ImageFetcher]
) -> None:
    (root / "escape.png").symlink_to(root.parent / "outside.png")
    path = relative if relative.startswith("/") else f"{root}/{relative}"
    _expect(
        make_fetcher(allowed_roots=[root]),
        PathImage(path=path),
        ImageReferenceError,
        "path_not_allowed",
    )


def test_no_roots_means_no_paths(root: Path, make_fetcher: Callable[..., ImageFetcher]) -> None:
    ref = PathImage(path=str(root / "sub" / "image.png"))
    _expect(make_fetcher(), ref, ImageReferenceError, "path_not_allowed")


def test_bad_files_inside_the_root(root: Path, make_fetcher: Callable[..., ImageFetcher]) -> None:
    fetcher = make_fetcher(allowed_roots=[root])
    os.mkfifo(root / "fifo")  # must be refused, not block waiting for a writer
    (root / "big.png").write_bytes(b"x" * (LIMIT + 1))
    (root / "loop").symlink_to(root / "loop")
    cases: list[tuple[str, type[TridentError], str]] = [
        ("missing.png", ImageReferenceError, "not_found"),
        ("sub", ImageReferenceError, "not_a_file"),
        ("fifo", ImageReferenceError, "not_a_file"),
        ("loop", ImageReferenceError, "symlink_loop"),
        ("nul\x00.png", ImageReferenceError, "invalid_path"),
        ("big.png", ImageContentError, "too_many_bytes"),
    ]
    for name, error, reason in cases:
        # Unvalidated: PathImage refuses a NUL byte itself, and the fetcher must not rely on it.
        _expect(fetcher, PathImage.model_construct(path=str(root / name)), error, reason)


@pytest.mark.parametrize(
    ("code", "error", "reason"),
    [
        (errno.EIO, FetchUnavailableError, "io_error"),
        (errno.ESTALE, FetchUnavailableError, "io_error"),
        (errno.EACCES, ImageReferenceError, "unreadable"),
    ],
)
def test_os_errors_split_into_permanent_and_transient(
    root: Path,
    code: int,
    error: type[TridentError],
    reason: str,
    *,
    make_fetcher: Callable[..., ImageFetcher],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def failing_open(path: str, flags: int) -> int:
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(engine.fetch, "_open_no_follow", failing_open)
    ref = PathImage(path=str(root / "sub" / "image.png"))
    _expect(make_fetcher(allowed_roots=[root]), ref, error, reason)


# URLs: mapping of real HTTP outcomes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "error", "reason"),
    [
        ("/missing", ImageReferenceError, "not_found"),
        ("/gone", ImageReferenceError, "gone"),
        ("/denied", ImageReferenceError, "http_client_error"),
        ("/error", FetchUnavailableError, "http_server_error"),
        ("/busy", FetchUnavailableError, "http_throttled"),
        ("/big", ImageContentError, "too_many_bytes"),
        ("/big-unsized", ImageContentError, "too_many_bytes"),
        ("/redirect-metadata", ImageReferenceError, "forbidden_address"),
        ("/redirect-localhost", ImageReferenceError, "forbidden_address"),
        ("/redirect-ftp", ImageReferenceError, "unsupported_scheme"),
        ("/loop", ImageReferenceError, "too_many_redirects"),
    ],
)
def test_http_outcomes_map_to_errors(
    server: _Server,
    path: str,
    error: type[TridentError],
    reason: str,
    make_fetcher: Callable[..., ImageFetcher],
) -> None:
    _expect(
        make_fetcher(allowed_hosts=["127.0.0.1"]), UrlImage(url=server.url(path)), error, reason
    )


def test_image_is_fetched_directly_and_through_a_redirect(
    server: _Server, make_fetcher: Callable[..., ImageFetcher]
) -> None:
    fetcher = make_fetcher(allowed_hosts=["127.0.0.1"])
    assert fetcher.fetch(UrlImage(url=server.url("/image"))) == PNG
    assert fetcher.fetch(UrlImage(url=server.url("/redirect-ok"))) == PNG
    assert server.seen == ["/image", "/redirect-ok", "/image"]


def test_redirects_are_checked_before_following(
    server: _Server, make_fetcher: Callable[..., ImageFetcher]
) -> None:
    fetcher = make_fetcher(allowed_hosts=["127.0.0.1"])
    _expect(
        fetcher,
        UrlImage(url=server.url("/redirect-metadata")),
        ImageReferenceError,
        "forbidden_address",
    )
    _expect(fetcher, UrlImage(url=server.url("/loop")), ImageReferenceError, "too_many_redirects")
    assert server.seen == ["/redirect-metadata"] + ["/loop"] * (engine.fetch.MAX_REDIRECTS + 1)


def test_slow_headers_and_slow_bodies_time_out(
    server: _Server, make_fetcher: Callable[..., ImageFetcher]
) -> None:
    fetcher = make_fetcher(allowed_hosts=["127.0.0.1"], timeout_s=0.3)
    for path in ("/slow", "/drip"):
        started = time.monotonic()
        _expect(fetcher, UrlImage(url=server.url(path)), FetchUnavailableError, "timeout")
        assert time.monotonic() - started < 0.9


def test_closed_port_is_retriable(make_fetcher: Callable[..., ImageFetcher]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ref = UrlImage(url=f"http://127.0.0.1:{port}/image.png")
    _expect(
        make_fetcher(allowed_hosts=["127.0.0.1"]), ref, FetchUnavailableError, "connection_error"
    )


def test_messages_do_not_leak_query_strings(
    server: _Server, make_fetcher: Callable[..., ImageFetcher]
) -> None:
    ref = UrlImage(url=server.url("/missing?X-Signature=s3cr3t"))
    error = _expect(
        make_fetcher(allowed_hosts=["127.0.0.1"]), ref, ImageReferenceError, "not_found"
    )
    assert "s3cr3t" not in str(error)


# URLs: the SSRF guard -------------------------------------------------------------------------


def test_loopback_is_refused_by_default_before_connecting(
    server: _Server, make_fetcher: Callable[..., ImageFetcher]
) -> None:
    _expect(
        make_fetcher(), UrlImage(url=server.url("/image")), ImageReferenceError, "forbidden_address"
    )
    assert server.seen == []
    assert (
        make_fetcher(allow_private_addresses=True).fetch(UrlImage(url=server.url("/image"))) == PNG
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/a.png",
        "http://[::ffff:127.0.0.1]/a.png",
        "http://[::ffff:169.254.169.254]/a.png",
        "http://[2002:a00:1::1]/a.png",  # 6to4 wrapping 10.0.0.1
        "http://[64:ff9b::a9fe:a9fe]/a.png",  # NAT64 wrapping 169.254.169.254
        "http://[fe80::1]/a.png",
        "http://0.0.0.0/a.png",
        "http://224.0.0.1/a.png",
        "http://100.64.0.1/a.png",
        "http://2130706433/a.png",  # 127.0.0.1 as one number
        "http://localhost/a.png",
        "http://LOCALHOST./a.png",
        "http://metadata.google.internal/computeMetadata/v1/",
    ],
)
def test_forbidden_addresses_are_refused_without_dns_or_traffic(
    url: str,
    make_fetcher: Callable[..., ImageFetcher],
    no_network: tuple[httpx.MockTransport, list[httpx.Request]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_dns(monkeypatch)
    transport, sent = no_network
    _expect(make_fetcher(transport), UrlImage(url=url), ImageReferenceError, "forbidden_address")
    assert sent == []


def test_one_private_answer_among_public_ones_is_refused(
    make_fetcher: Callable[..., ImageFetcher],
    no_network: tuple[httpx.MockTransport, list[httpx.Request]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_dns(monkeypatch, ["93.184.216.34", "10.1.2.3"])
    transport, sent = no_network
    ref = UrlImage(url="http://images.example/a.png")
    _expect(make_fetcher(transport), ref, ImageReferenceError, "forbidden_address")
    assert sent == []


def test_public_host_passes_the_guard(
    make_fetcher: Callable[..., ImageFetcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_dns(monkeypatch, ["93.184.216.34", "2606:2800:220:1::1"])
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=PNG))
    assert make_fetcher(transport).fetch(UrlImage(url="http://images.example/a.png")) == PNG


def test_connection_goes_to_the_checked_address(
    make_fetcher: Callable[..., ImageFetcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_dns(monkeypatch, ["93.184.216.34"])
    connects: list[str] = []

    def connect_tcp(self: Any, host: str, *args: Any, **kwargs: Any) -> Any:
        connects.append(host)
        raise httpcore.ConnectError("test: no real connections")

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", connect_tcp)
    ref = UrlImage(url="http://images.example/a.png")
    _expect(make_fetcher(), ref, FetchUnavailableError, "connection_error")
    assert connects == ["93.184.216.34"]  # the address, never the name to be resolved again


def test_dns_rebinding_is_caught_at_connect_time(
    make_fetcher: Callable[..., ImageFetcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Public when checked, loopback when the socket would connect.
    lookups = _fake_dns(monkeypatch, ["93.184.216.34"], ["127.0.0.1"])
    connects: list[str] = []
    monkeypatch.setattr(
        httpcore.SyncBackend, "connect_tcp", lambda self, host, *a, **k: connects.append(host)
    )
    ref = UrlImage(url="http://rebind.example:8080/a.png")
    _expect(make_fetcher(), ref, ImageReferenceError, "forbidden_address")
    assert lookups == [("rebind.example", 8080)] * 2
    assert connects == []


@pytest.mark.parametrize(
    ("code", "error", "reason"),
    [
        (socket.EAI_NONAME, ImageReferenceError, "unknown_host"),
        (socket.EAI_AGAIN, FetchUnavailableError, "connection_error"),
    ],
)
def test_dns_failures(
    code: int,
    error: type[TridentError],
    reason: str,
    *,
    make_fetcher: Callable[..., ImageFetcher],
    no_network: tuple[httpx.MockTransport, list[httpx.Request]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def getaddrinfo(*args: Any, **kwargs: Any) -> list[Any]:
        raise socket.gaierror(code, "test resolver failure")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    _expect(
        make_fetcher(no_network[0]), UrlImage(url="http://nowhere.example/a.png"), error, reason
    )


# fetch_many -----------------------------------------------------------------------------------


def test_fetch_many_isolates_failures_and_keeps_order(
    server: _Server, root: Path, make_fetcher: Callable[..., ImageFetcher]
) -> None:
    fetcher = make_fetcher(allowed_roots=[root], allowed_hosts=["127.0.0.1"])
    results = fetcher.fetch_many(
        [
            PathImage(path=str(root / "sub" / "image.png")),
            PathImage(path=str(root / "missing.png")),
            UrlImage(url=server.url("/slow-image")),
            UrlImage(url=server.url("/error")),
            InlineImage(data=b"x" * (LIMIT + 1)),
            InlineImage(data=b"inline"),
        ]
    )
    assert results[0] == PNG and results[2] == PNG and results[5] == b"inline"
    assert isinstance(results[1], ImageReferenceError) and results[1].reason == "not_found"
    assert isinstance(results[3], FetchUnavailableError)
    assert results[3].reason == "http_server_error"
    assert isinstance(results[4], ImageContentError) and results[4].stage is Stage.FETCH


def test_fetch_many_bounds_concurrency(
    server: _Server, make_fetcher: Callable[..., ImageFetcher]
) -> None:
    fetcher = make_fetcher(allowed_hosts=["127.0.0.1"], concurrency=2)
    results = fetcher.fetch_many([UrlImage(url=server.url("/slow-image"))] * 6)
    assert results == [PNG] * 6
    assert server.max_inflight == 2


def test_fetch_many_contains_unexpected_errors(
    root: Path, make_fetcher: Callable[..., ImageFetcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    fetcher = make_fetcher(allowed_roots=[root])

    def broken(raw: str) -> bytes:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(fetcher, "_read_path", broken)
    results = fetcher.fetch_many([PathImage(path="/any.png"), InlineImage(data=b"ok")])
    assert isinstance(results[0], FetchUnavailableError) and results[0].reason == "internal_error"
    assert results[1] == b"ok"
