"""Follow an image reference (local path, http(s) URL or inline bytes) and return its bytes.

Events are untrusted and choose the reference, so every way out is fenced:

- paths must resolve (symlinks followed) below one of ``allowed_roots``;
- URLs must use http(s) and reach only public addresses, checked before each request on every
  redirect hop and again at connect time against the very address the socket connects to, so DNS
  rebinding cannot slip a private address in between (see :class:`_GuardedBackend`);
- every body is bounded by ``max_bytes`` and every URL fetch by ``timeout_s`` overall.

Failures become the error tree: a bad reference or body is permanent, an unwell host or
filesystem is retriable. Every error carries ``stage=Stage.FETCH`` and names the reference.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Self, assert_never

import httpcore
import httpx

from engine.errors import (
    FetchUnavailableError,
    ImageContentError,
    ImageReferenceError,
    Reason,
    Stage,
    TridentError,
)
from engine.settings import FetchSettings
from schemas.events import InlineImage, PathImage, UrlImage

logger = logging.getLogger(__name__)

ImageSource = PathImage | UrlImage | InlineImage
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_FORBIDDEN_NAMES = frozenset({"localhost", "metadata.google.internal"})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# "No such name" answers; other resolver failures (EAI_AGAIN, EAI_FAIL...) may heal, so retry.
_NO_SUCH_HOST = frozenset({socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)})
# errno values meaning the reference itself is bad. Any other OSError (EIO, ESTALE on NFS,
# EMFILE...) is taken as the filesystem being unwell and retried rather than dead-lettered.
_PERMANENT_ERRNOS = {
    errno.ENOENT: Reason.NOT_FOUND,
    errno.ENOTDIR: Reason.NOT_FOUND,
    errno.EACCES: Reason.UNREADABLE,
    errno.EPERM: Reason.UNREADABLE,
    errno.ELOOP: Reason.SYMLINK_LOOP,
    errno.EISDIR: Reason.NOT_A_FILE,
    errno.ENXIO: Reason.NOT_A_FILE,
    errno.ENAMETOOLONG: Reason.INVALID_PATH,
    errno.EINVAL: Reason.INVALID_PATH,
}


class ImageFetcher:
    """Fetches image bytes for ingest events; thread-safe, one per worker.

    Holds one shared HTTP client and a thread pool of ``settings.concurrency`` threads; use it as
    a context manager or call :meth:`close`. ``transport`` replaces the guarded network transport
    (tests); the host/address policy is still applied before every request.
    """

    def __init__(
        self, settings: FetchSettings, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self._settings = settings
        self._roots = [root.resolve() for root in settings.allowed_roots]
        self._policy = _AddressPolicy(settings)
        workers = max(1, settings.concurrency)
        self._client = httpx.Client(
            transport=transport or _GuardedTransport(self._policy, keepalive=workers),
            timeout=settings.timeout_s,
            follow_redirects=False,  # followed by hand so every hop's host is checked
            trust_env=False,  # env proxies or .netrc would bypass the guard
            headers={"Accept": "image/*, */*;q=0.5", "User-Agent": "embedding-trident"},
        )
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Wait for running fetches, then release the thread pool and HTTP connections."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def fetch(self, ref: ImageSource) -> bytes:
        """Return the bytes ``ref`` points to (not yet checked to be an image).

        Raises:
            ImageReferenceError: the reference cannot be followed: path outside the allowed roots
                (``path_not_allowed``), missing (``not_found``), not a regular file
                (``not_a_file``), unreadable, forbidden or unknown host (``forbidden_address``,
                ``unknown_host``), unsupported scheme, too many redirects, HTTP 404/410/other 4xx
                (``not_found``, ``gone``, ``http_client_error``).
            ImageContentError: more than ``max_bytes`` (``too_many_bytes``) or a body that
                cannot be decoded.
            FetchUnavailableError: host timed out (``timeout``), refused or dropped the connection
                or DNS failed temporarily (``connection_error``), answered 408/5xx
                (``http_server_error``) or 429 (``http_throttled``), or the filesystem failed
                (``io_error``).
        """
        try:
            match ref:
                case InlineImage(data=data):
                    return self._check_size(data)
                case PathImage(path=path):
                    return self._read_path(path)
                case UrlImage(url=url):
                    return self._fetch_url(str(url))
                case _:
                    assert_never(ref)
        except TridentError as exc:
            # Helpers raise with just the detail; name the reference and stage here, in one place.
            exc.args = (f"cannot fetch {_describe(ref)}: {exc}",)
            exc.stage = Stage.FETCH
            raise

    def fetch_many(self, refs: Iterable[ImageSource]) -> list[bytes | TridentError]:
        """Fetch ``refs`` concurrently (at most ``settings.concurrency`` at once).

        Returns, in input order, the bytes or the error for each reference; one failure never
        affects the others. Never raises for a single reference.
        """
        return list(self._executor.map(self._fetch_isolated, refs))

    def _fetch_isolated(self, ref: ImageSource) -> bytes | TridentError:
        try:
            return self.fetch(ref)
        except TridentError as exc:
            return exc
        except Exception as exc:
            # A bug must not sink the rest of the batch. Retriable, so the input is not
            # dead-lettered for our fault; the traceback goes to the log.
            logger.exception("unexpected error fetching %s", _describe(ref))
            return FetchUnavailableError(
                f"cannot fetch {_describe(ref)}: unexpected {type(exc).__name__}: {exc}",
                reason=Reason.INTERNAL_ERROR,
                stage=Stage.FETCH,
            )

    def _check_size(self, data: bytes) -> bytes:
        if len(data) > self._settings.max_bytes:
            raise _too_many_bytes(self._settings.max_bytes)
        return data

    # Local paths ------------------------------------------------------------------------------

    def _read_path(self, raw: str) -> bytes:
        if (scheme := _url_scheme(raw)) is not None:
            # A URL of a scheme never fetched, not a path: say that, not "outside the roots".
            raise ImageReferenceError(
                f"scheme {scheme!r} is not supported: give an http(s) URL or a file path",
                reason=Reason.UNSUPPORTED_SCHEME,
            )
        path = Path(raw)
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError, ValueError) as exc:
            # Outside the roots every failure reads "not allowed": events must not be able to
            # probe which files exist elsewhere.
            if not self._is_allowed(_resolve_loosely(path)):
                raise _not_allowed() from None
            raise _path_error(exc) from exc
        if not self._is_allowed(resolved):
            raise _not_allowed()
        limit = self._settings.max_bytes
        try:
            with open(resolved, "rb", opener=_open_no_follow) as file:
                # fstat the open file, not the path, so what is checked is what is read.
                info = os.fstat(file.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise ImageReferenceError("not a regular file", reason=Reason.NOT_A_FILE)
                if info.st_size > limit:
                    raise _too_many_bytes(limit)
                data = file.read(limit + 1)  # bounded: the file may have grown since fstat
        except OSError as exc:
            raise _path_error(exc) from exc
        return self._check_size(data)

    def _is_allowed(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self._roots)

    # URLs -------------------------------------------------------------------------------------

    def _fetch_url(self, url: str) -> bytes:
        deadline = time.monotonic() + self._settings.timeout_s
        try:
            return self._follow(httpx.URL(url), deadline)
        except httpx.TimeoutException as exc:
            raise FetchUnavailableError("timed out", reason=Reason.TIMEOUT) from exc
        except httpx.TransportError as exc:  # refused, reset, protocol violations
            raise FetchUnavailableError(
                f"connection failed: {exc or type(exc).__name__}", reason=Reason.CONNECTION_ERROR
            ) from exc
        except httpx.DecodingError as exc:
            raise ImageContentError(f"undecodable body: {exc}", reason=Reason.BAD_ENCODING) from exc
        except httpx.InvalidURL as exc:
            raise ImageReferenceError(f"invalid URL: {exc}", reason=Reason.INVALID_URL) from exc

    def _follow(self, url: httpx.URL, deadline: float) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            self._check_target(url)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchUnavailableError("timed out", reason=Reason.TIMEOUT)
            # Each blocking step may take at most what is left, so the whole fetch (redirects
            # and body included) stays within timeout_s: a slow drip cannot hold a thread.
            request = self._client.build_request("GET", url, timeout=remaining)
            response = self._client.send(request, stream=True)
            try:
                location = response.headers.get("location")
                if response.status_code in _REDIRECTS and location:
                    url = response.url.join(location)
                    logger.debug("redirect %d to %s", response.status_code, _redact(url))
                    continue
                _check_status(response.status_code)
                return self._read_body(response, deadline)
            finally:
                response.close()
        raise ImageReferenceError(
            f"more than {MAX_REDIRECTS} redirects", reason=Reason.TOO_MANY_REDIRECTS
        )

    def _check_target(self, url: httpx.URL) -> None:
        if url.scheme not in ("http", "https"):
            raise ImageReferenceError(
                f"scheme {url.scheme!r} is not http(s) ({_redact(url)})",
                reason=Reason.UNSUPPORTED_SCHEME,
            )
        host = url.raw_host.decode("ascii")
        if not host:
            raise ImageReferenceError("URL has no host", reason=Reason.INVALID_URL)
        if not self._policy.trusted(host):
            self._policy.checked_addresses(host, url.port or (443 if url.scheme == "https" else 80))

    def _read_body(self, response: httpx.Response, deadline: float) -> bytes:
        limit = self._settings.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_many_bytes(limit)
        body = bytearray()
        # Counted after decompression, so a gzip bomb is cut off too.
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > limit:
                raise _too_many_bytes(limit)
            if time.monotonic() > deadline:
                raise FetchUnavailableError("timed out reading the body", reason=Reason.TIMEOUT)
        return bytes(body)


def check_reference(ref: ImageSource, settings: FetchSettings) -> None:
    """Refuse, reading no file and fetching nothing, a reference that :class:`ImageFetcher`
    would refuse whatever the filesystem or the host says later (the query API asks before it
    publishes): a scheme other than http(s), a path resolving outside the allowed roots, a
    forbidden host name, or a host with an address that is not public. A path that does not
    exist (yet), or a name that does not resolve here, passes: the worker, which may see other
    files and another DNS, decides.

    Raises:
        ImageReferenceError: ``unsupported_scheme``, ``path_not_allowed``, ``invalid_url`` or
            ``forbidden_address`` (stage ``fetch``, the message naming the reference).
    """
    try:
        match ref:
            case PathImage(path=raw):
                if (scheme := _url_scheme(raw)) is not None:
                    raise ImageReferenceError(
                        f"scheme {scheme!r} is not supported: give an http(s) URL or a file path",
                        reason=Reason.UNSUPPORTED_SCHEME,
                    )
                resolved = _resolve_loosely(Path(raw))
                if not any(resolved.is_relative_to(r.resolve()) for r in settings.allowed_roots):
                    raise _not_allowed()
            case UrlImage(url=url):
                target = httpx.URL(str(url))
                policy = _AddressPolicy(settings)
                host = target.raw_host.decode("ascii")
                if not policy.trusted(host):
                    port = target.port or (443 if target.scheme == "https" else 80)
                    policy.checked_addresses(host, port)
    except httpx.InvalidURL as exc:
        raise ImageReferenceError(
            f"cannot fetch {_describe(ref)}: invalid URL: {exc}",
            reason=Reason.INVALID_URL,
            stage=Stage.FETCH,
        ) from exc
    except FetchUnavailableError:
        return  # the resolver failing now says nothing of the fetch
    except ImageReferenceError as exc:
        if exc.reason == Reason.UNKNOWN_HOST:
            return
        exc.args = (f"cannot fetch {_describe(ref)}: {exc}",)
        exc.stage = Stage.FETCH
        raise


class _AddressPolicy:
    """The SSRF guard: which hosts and addresses a URL may reach."""

    def __init__(self, settings: FetchSettings) -> None:
        self._allow_all = settings.allow_private_addresses
        self._trusted = frozenset(_normalise_host(host) for host in settings.allowed_hosts)

    def trusted(self, host: str) -> bool:
        """Whether ``host`` skips the address checks (private addresses allowed or host listed)."""
        return self._allow_all or _normalise_host(host) in self._trusted

    def checked_addresses(self, host: str, port: int) -> list[IPAddress]:
        """Resolve ``host``; return its addresses if every one of them is public.

        Raises:
            ImageReferenceError: ``forbidden_address`` (a forbidden name, or ANY address not
                public), ``unknown_host`` (no such name), ``invalid_url``.
            FetchUnavailableError: ``connection_error`` (temporary resolver failure).
        """
        name = _normalise_host(host)
        # Refused by name before any lookup, so such names never even reach DNS.
        if name in _FORBIDDEN_NAMES or name.endswith(".localhost"):
            raise ImageReferenceError(
                f"host {host!r} is forbidden", reason=Reason.FORBIDDEN_ADDRESS
            )
        addresses = _resolve(name, port)
        for address in addresses:
            if not _is_public(address):
                raise ImageReferenceError(
                    f"host {host!r} resolves to {address}, which is not a public address",
                    reason=Reason.FORBIDDEN_ADDRESS,
                )
        return addresses


class _GuardedBackend(httpcore.SyncBackend):
    """Connects only to addresses the policy accepted, resolved once per connection.

    Checking a name and then letting the socket layer resolve it again would leave a window for
    DNS rebinding (first answer public, second 169.254.169.254); here the checked address is the
    one connected to. TLS still uses the URL's host name for SNI and certificate checks, because
    httpcore wraps this stream with the origin's name, and so does the Host header.
    """

    def __init__(self, policy: _AddressPolicy) -> None:
        self._policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        if self._policy.trusted(host):
            return super().connect_tcp(host, port, timeout, local_address, socket_options)
        failure: httpcore.ConnectError | None = None
        for address in self._policy.checked_addresses(host, port):
            try:
                return super().connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:  # try the next address; timeouts end it
                failure = exc
        raise failure or httpcore.ConnectError(f"no address for {host}")


class _GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport, with every connection made through :class:`_GuardedBackend`."""

    def __init__(self, policy: _AddressPolicy, *, keepalive: int) -> None:
        ssl_context = httpx.create_ssl_context(trust_env=False)
        super().__init__(verify=ssl_context, trust_env=False)
        # httpx takes no network backend, so swap its pool for the one it would have built (the
        # no-proxy branch of HTTPTransport.__init__) plus ours. The fetch tests catch a regression
        # here: a rebinding host must be refused at connect time.
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_keepalive_connections=keepalive,
            keepalive_expiry=5.0,
            network_backend=_GuardedBackend(policy),
        )


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]  # a literal needs no lookup
    except ValueError:
        pass
    try:
        # Blocks for as long as the system resolver takes; it has its own timeouts.
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NO_SUCH_HOST:
            raise ImageReferenceError(f"unknown host {host!r}", reason=Reason.UNKNOWN_HOST) from exc
        raise FetchUnavailableError(
            f"cannot resolve {host!r}: {exc}", reason=Reason.CONNECTION_ERROR
        ) from exc
    except UnicodeError as exc:
        raise ImageReferenceError(f"invalid host {host!r}", reason=Reason.INVALID_URL) from exc
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def _is_public(address: IPAddress) -> bool:
    """Whether ``address`` is globally routable unicast, including any IPv4 embedded in IPv6."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not _is_public(embedded):
            return False
    # is_global is False for loopback, private, link-local (169.254.169.254), reserved,
    # unspecified and shared (100.64/10) ranges; multicast counts as global, so exclude it.
    return address.is_global and not address.is_multicast


def _normalise_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def _check_status(status: int) -> None:
    if 200 <= status < 300:
        return
    if status == 404:
        raise ImageReferenceError("HTTP 404", reason=Reason.NOT_FOUND)
    if status == 410:
        raise ImageReferenceError("HTTP 410", reason=Reason.GONE)
    if status == 429:
        raise FetchUnavailableError("HTTP 429", reason=Reason.HTTP_THROTTLED)
    if status == 408 or 500 <= status < 600:
        raise FetchUnavailableError(f"HTTP {status}", reason=Reason.HTTP_SERVER_ERROR)
    raise ImageReferenceError(f"HTTP {status}", reason=Reason.HTTP_CLIENT_ERROR)


def _open_no_follow(path: str, flags: int) -> int:
    # NOFOLLOW: the resolved path's last component must not have become a symlink since.
    # NONBLOCK: opening a FIFO must not hang; fstat then rejects it as not a regular file.
    # Residual risk: a directory component swapped for a symlink between resolve() and open().
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)


def _resolve_loosely(path: Path) -> Path:
    # Only picks the error to report for a path that failed to resolve, never grants access:
    # follow what symlinks exist, else (a loop) judge the path as written.
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):
        return Path(os.path.abspath(path))


def _path_error(exc: BaseException) -> TridentError:
    if isinstance(exc, RuntimeError):  # Python 3.11 reports symlink loops this way
        return ImageReferenceError(str(exc), reason=Reason.SYMLINK_LOOP)
    if isinstance(exc, ValueError):  # e.g. an embedded NUL byte
        return ImageReferenceError(str(exc), reason=Reason.INVALID_PATH)
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return ImageReferenceError(exc.strerror or str(exc), reason=_PERMANENT_ERRNOS[exc.errno])
    return FetchUnavailableError(f"I/O error: {exc}", reason=Reason.IO_ERROR)


def _url_scheme(raw: str) -> str | None:
    """The scheme of a reference written as a URL (``ftp://host/a.jpg``), None for a path."""
    scheme, separator, _ = raw.partition("://")
    if separator and scheme[:1].isalpha() and all(c.isalnum() or c in "+-." for c in scheme):
        return scheme
    return None


def _not_allowed() -> ImageReferenceError:
    return ImageReferenceError("path is outside the allowed roots", reason=Reason.PATH_NOT_ALLOWED)


def _too_many_bytes(limit: int) -> ImageContentError:
    return ImageContentError(f"more than {limit} bytes", reason=Reason.TOO_MANY_BYTES)


def _describe(ref: ImageSource) -> str:
    match ref:
        case PathImage(path=path):
            return repr(path)
        case UrlImage(url=url):
            try:
                return _redact(httpx.URL(str(url)))
            except httpx.InvalidURL:
                return str(url).partition("?")[0]
        case InlineImage(data=data):
            return f"inline image ({len(data)} bytes)"
        case _:
            assert_never(ref)


def _redact(url: httpx.URL) -> str:
    # Query strings often carry signatures (pre-signed URLs) and userinfo carries passwords;
    # messages end up in logs and dead-letter headers.
    return str(url.copy_with(userinfo=b"", query=None, fragment=None))
