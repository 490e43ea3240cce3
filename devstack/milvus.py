"""The Milvus service of the local stack: a real Milvus 2.3.5 standalone server.

The PyPI wheel ``milvus==2.3.5`` bundles the standalone binary (Go + C++, embedded etcd and
rocksmq) and its shared libraries as ``.lzma`` files, plus a ``milvus.yaml`` template. Its own
``MilvusServer`` picks random ports, writes under ``~/.milvus.io`` and keeps the process as a
child of the Python that started it, so we only use the wheel as a carrier: ``install()`` puts it
in its own venv (its pins stay out of the main venv) and unpacks the binary, and ``start()``
renders the config and runs ``milvus run standalone`` through :class:`ManagedProcess` (own
session, pid and log files), so stop/kill/restart work across CLI invocations.

Layout: in the shared cache ``<cache>/milvus``, ``venv/`` (the wheel) and ``server/`` (unpacked
binary, libraries, config template); under ``<root>/milvus``, ``configs/`` (rendered at each
start), ``data/`` (etcd, rocksmq, segments; kept by stop, wiped by reset), ``logs/`` (etcd and
C++ engine logs), ``milvus.log``/``milvus.pid``, and ``secret`` (the root password, mode 0600).

Milvus 2.3.5 binds its gRPC ports on every interface whatever the configuration says, so the
server runs with authentication on: ``start()`` generates a random root password once, keeps it
in ``secret`` and sets it on the server; clients use :attr:`MilvusService.token`.

Several stacks share the cached binary, so a stack recognises its own server by pid file and
working directory (its folder), never by the binary's path: stopping one stack never touches
another's server.

Beside the server, ``start()`` runs a small watcher (``milvus-build-priority.pid``/``.log``,
:mod:`devstack.build_priority`) that moves the server's index-build threads to idle CPU
priority, so that searches keep the CPU while it builds; it ends with the server.
"""

from __future__ import annotations

import contextlib
import logging
import lzma
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from devstack._process import ManagedProcess, port_open, wait_ports_closed, wait_until
from devstack.config import StackConfig
from devstack.errors import StackError

logger = logging.getLogger(__name__)

MILVUS_VERSION = "2.3.5"
START_TIMEOUT = 120.0
# Readiness probes this far apart (each opens a client: a few ms); restarts wait on them.
_POLL_S = 0.25
# Rounds of probes (20 s) in which a healthy server refuses both passwords.
_REFUSALS_BEFORE_LOST = round(20 / _POLL_S)
ROOT_USER = "root"
_DEFAULT_ROOT_PASSWORD = "Milvus"  # what a fresh data directory starts with

# Every port is an offset from config.milvus_port (19530 gives 19529-19540), so one setting moves
# the whole server and nothing lands on Milvus's stock ports elsewhere: etcd's 2379/2380 and the
# metrics/health port 9091 (Prometheus pushgateway's default) are the likeliest to be taken on a
# developer machine. Kafka (19092/19093) and Triton (18000-18002) stay clear.
_PORT_OFFSETS = {
    "proxy_internal": -1,
    "query_coord": 1,
    "root_coord": 2,
    "data_coord": 3,
    "query_node": 4,
    "data_node": 5,
    "index_node": 6,
    "index_coord": 7,
    "etcd_client": 8,
    "etcd_peer": 9,
    "metrics": 10,
}
# Components whose advertised ``ip`` goes into etcd; pinning it keeps internal traffic on loopback.
_COMPONENTS = (
    "rootCoord",
    "proxy",
    "queryCoord",
    "queryNode",
    "indexNode",
    "dataCoord",
    "dataNode",
)
# Search while Milvus indexes and compacts (issue 25, docs/PERFORMANCE.md "Search while the
# collection grows"): measured with benchmarks/bench_growing.py, each against the stack's
# previous settings in the same run.
SEARCH_UNDER_LOAD: dict[str, Any] = {
    # A temporary IVF index (nlist 128, nprobe 16) for segments whose own index is not built
    # yet (sealed, not yet indexed: after a bulk write, most of the rows for minutes). Without
    # it every search scanned them by brute force: in the 5 minutes after 100k writes, by
    # vector p50 172 -> 28 ms, p99 785 -> 414 ms, by image p99 879 -> 507 ms (recall@10
    # 1.000 -> 0.992), benchmarks/bench_growing.py on the shared machine at load ~15, same run.
    # It had been turned off for cheaper writes, a gain within the spread between runs.
    "queryNode.segcore.interimIndex.enableIndex": True,
}
SERVER_ENVIRONMENT: dict[str, str] = {
    # Go's collector at its default (GOGC=100) kept the heap small and the kernel busy zeroing
    # the pages it gave back and faulted in again: 19 % of the server's CPU while it took writes
    # (perf). A 5x heap goal, and freed pages kept until the kernel wants them, cut that to 1 %;
    # writes and searches during an ingest got faster for ~1 GB more RSS at 100k vectors
    # (docs/PERFORMANCE.md, "Write path").
    "GOGC": "400",
    "GODEBUG": "madvdontneed=0",
}
# The health probe goes straight to loopback, whatever http_proxy the caller has set.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_PLACEHOLDER = re.compile(r"\{\{\s*\w+(?:\(\w+\))?\s*(?::\s*([^}]*?))?\s*\}\}")


class MilvusService:
    """Install, start, probe and stop the local Milvus standalone server."""

    name = "milvus"

    def __init__(
        self,
        config: StackConfig,
        *,
        settings: Mapping[str, Any] | None = None,
        environment: Mapping[str, str] | None = None,
        idle_builds: bool = True,
    ) -> None:
        """``settings`` (dotted ``milvus.yaml`` keys) and ``environment`` are applied over the
        stack's own at each start: benchmarks compare Milvus settings with them
        (``benchmarks/bench_growing.py``); the stack itself passes neither. ``idle_builds``:
        run the server's index builds at idle CPU priority (:mod:`devstack.build_priority`);
        benchmarks turn it off to measure what it does."""
        self.config = config
        self.idle_builds = idle_builds
        self.extra_settings = dict(settings or {})
        self.extra_environment = dict(environment or {})
        self.folder = config.folder(self.name)
        self._refused_rounds = 0
        # The wheel's venv and the unpacked server are shared by every stack on this machine.
        cache = config.cache_folder(self.name)
        self.venv = cache / "venv"
        self.server_dir = cache / "server"
        self.binary = self.server_dir / "bin" / "milvus"
        self.configs = self.folder / "configs"
        self.data = self.folder / "data"
        self.logs = self.folder / "logs"
        self.pip_log = cache / "pip.log"
        self.secret_file = self.folder / "secret"
        self.marker = self.server_dir / f".installed-{MILVUS_VERSION}"
        self.process = ManagedProcess(self.name, self.folder)
        self.build_priority = ManagedProcess(f"{self.name}-build-priority", self.folder)
        self.ports = {key: config.milvus_port + off for key, off in _PORT_OFFSETS.items()}
        self.all_ports = (config.milvus_port, *self.ports.values())

    @property
    def uri(self) -> str:
        """The client URI, e.g. ``http://127.0.0.1:19530``."""
        return self.config.milvus_uri

    @property
    def token(self) -> str:
        """``root:<password>`` for clients (the password is generated on first use)."""
        if not self.secret_file.exists():
            self.secret_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(24))
        return f"{ROOT_USER}:{self.secret_file.read_text().strip()}"

    @property
    def health_url(self) -> str:
        return f"http://{self.config.host}:{self.ports['metrics']}/healthz"

    # ---------------------------------------------------------------- install

    def install(self) -> None:
        """Create the venv, pip-install the wheel and unpack the server binary (idempotent).

        Raises:
            StackError: venv creation or pip failed (see ``pip.log``), or the unpacked binary
                misses a shared library.
        """
        if self.marker.exists() and self.binary.exists():
            return
        started = time.monotonic()
        python = self.venv / "bin" / "python"
        with self.pip_log.open("ab") as log:
            for step, argv in (
                ("create the venv", [self.config.python, "-m", "venv", str(self.venv)]),
                (
                    f"pip install milvus=={MILVUS_VERSION}",
                    [
                        str(python),
                        "-m",
                        "pip",
                        "install",
                        "--disable-pip-version-check",
                        f"milvus=={MILVUS_VERSION}",
                    ],
                ),
            ):
                if step.startswith("create") and python.exists():
                    continue
                log.write(f"\n===== {step}: {' '.join(argv)}\n".encode())
                log.flush()
                try:
                    done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False)
                except OSError as exc:
                    raise StackError(f"milvus: could not {step}: {exc}", self.pip_log) from exc
                if done.returncode != 0:
                    raise StackError(
                        f"milvus: could not {step} (exit {done.returncode}); see {self.pip_log}",
                        self.pip_log,
                    )
        self._unpack()
        self.marker.write_text(MILVUS_VERSION)
        logger.info("milvus %s installed in %.0fs", MILVUS_VERSION, time.monotonic() - started)

    def _unpack(self) -> None:
        packaged = next(self.venv.glob("lib/python*/site-packages/milvus/data"), None)
        if packaged is None:
            raise StackError(f"milvus: the wheel has no milvus/data in {self.venv}", self.pip_log)
        bin_dir = self.binary.parent
        bin_dir.mkdir(parents=True, exist_ok=True)
        for packed in sorted((packaged / "bin").glob("*.lzma")):
            target = bin_dir / packed.stem
            with lzma.open(packed) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            target.chmod(0o755)
        for name in ("config.yaml.template", "glog.conf"):
            shutil.copy(packaged / name, self.server_dir / name)
        # Fail at install, not at first start, if the host lacks a library the wheel assumes.
        ldd = subprocess.run(
            ["ldd", str(self.binary)],
            capture_output=True,
            text=True,
            check=False,
            env={"LD_LIBRARY_PATH": str(bin_dir)},
        )
        missing = [line.strip() for line in ldd.stdout.splitlines() if "not found" in line]
        if missing:
            raise StackError(f"milvus: the server binary misses libraries: {missing}")

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the server unless it runs, and wait until it answers ``list_collections``.

        Raises:
            StackError: not installed, the port is taken by another process, or the server
                exited or was not ready within 120 s (the message quotes ``milvus.log``).
        """
        if not self.marker.exists():
            raise StackError("milvus: not installed; run install() first")
        if not self.process.is_running():
            busy = [port for port in self.all_ports if port_open(self.config.host, port)]
            if busy:
                raise StackError(
                    f"milvus: ports {busy} already in use by another process "
                    "(a milvus left over from a lost pid file is cleaned up by stop())",
                    self.process.log_file,
                )
            self._write_configs()
            for folder in (self.data, self.logs, self.folder / "run"):
                folder.mkdir(parents=True, exist_ok=True)
            self.process.start(
                [str(self.binary), "run", "standalone"], env=self._env(), cwd=self.folder
            )
        started = time.monotonic()
        wait_until(
            self._secured,
            timeout=START_TIMEOUT,
            what="milvus",
            process=self.process,
            interval=_POLL_S,
        )
        self._watch_builds()
        # Loaded collections come back asynchronously after a restart; queries fail with
        # "collection not loaded" until then, so ready means reloaded too.
        wait_until(
            lambda: self._probe(loaded=True),
            timeout=START_TIMEOUT,
            what="milvus",
            process=self.process,
            interval=_POLL_S,
        )
        logger.info("milvus ready at %s after %.1fs", self.uri, time.monotonic() - started)

    def _watch_builds(self) -> None:
        """(Re)start the watcher that keeps this server's index builds at idle priority
        (:mod:`devstack.build_priority`; one per server: it ends with the server it watches,
        and a start replaces one that watched an earlier server)."""
        pid = self.process.pid()
        if not self.idle_builds or pid is None:
            return
        self.build_priority.stop(timeout=5.0)
        self.build_priority.start(
            [sys.executable, "-m", "devstack.build_priority", "--pid", str(pid)]
        )

    def healthy(self) -> bool:
        """True if the server runs, says healthy and answers ``list_collections``; never raises."""
        try:
            return self.process.is_running() and self._probe()
        except Exception as exc:  # any failure of the probe means "not healthy"
            logger.debug("milvus probe failed: %s", exc)
            return False

    def stop(self) -> None:
        """SIGTERM the server (SIGKILL after 15 s) and any stray server of this stack; data kept.

        Raises nothing; returns once no server of this stack (by working directory) is left.
        """
        # A clean stop takes 0.1-3.5 s, but 2.3.5's shutdown can hang for good when SIGTERM
        # lands during background DDL work (seen right after a drop_collection). SIGKILL loses
        # nothing acknowledged: the write-ahead log and etcd are on disk (kill() tests prove it).
        self.process.stop(timeout=15.0)
        self.build_priority.stop(timeout=5.0)
        for pid in self._server_pids():
            # A server of this stack whose pid file was lost: it runs in our folder, so ours.
            logger.warning("milvus: stopping stray server pid %d", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._wait_released()

    def kill(self) -> None:
        """SIGKILL the server at once (fault tests); the data stays as the crash left it.

        Raises nothing.
        """
        self.process.kill()
        self.build_priority.stop(timeout=5.0)
        self._wait_released()

    def reset(self) -> None:
        """Stop the server and delete all its data (collections, etcd metadata, message log).

        Raises nothing; the installed server and ``milvus.log`` are kept.
        """
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)
        shutil.rmtree(self.logs, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        """running, healthy, pid, uri and log of the server; never raises."""
        return {
            "name": self.name,
            "running": self.process.is_running(),
            "healthy": self.healthy(),
            "pid": self.process.pid(),
            "uri": self.uri,
            "log": str(self.process.log_file),
        }

    # ---------------------------------------------------------------- internals

    def _probe(self, *, loaded: bool = False) -> bool:
        """healthz says OK and ``list_collections`` answers; with ``loaded``, also no collection
        is still (re)loading, as happens for a while after every restart."""
        with _DIRECT.open(self.health_url, timeout=2) as response:
            if b"OK" not in response.read():
                return False
        # healthz can be OK a moment before the proxy serves requests; ask the real API too.
        # Imported here: pymilvus takes ~1 s to import and only a running server needs it.
        from pymilvus import MilvusClient  # noqa: PLC0415

        client = MilvusClient(uri=self.uri, token=self.token, timeout=5, alias=_probe_alias())
        try:
            names = client.list_collections()
            if loaded:
                states = [client.get_load_state(name)["state"].name for name in names]
                return "Loading" not in states
        finally:
            client.close()
        return True

    def _secured(self) -> bool:
        """Once the proxy answers: True when the root password is this stack's secret, setting
        it first on a fresh data directory (which starts with Milvus's default password).

        Raises:
            StackError: for many rounds in a row, neither the secret nor the default opened the
                healthy server (the data directory was secured with a secret since lost:
                ``trident-stack reset``).
        """
        from pymilvus import MilvusClient  # noqa: PLC0415

        with _DIRECT.open(self.health_url, timeout=2) as response:
            if b"OK" not in response.read():
                return False
        password = self.token.split(":", 1)[1]
        for candidate in (password, _DEFAULT_ROOT_PASSWORD):
            try:
                client = MilvusClient(
                    uri=self.uri, token=f"{ROOT_USER}:{candidate}", timeout=5, alias=_probe_alias()
                )
            except Exception as exc:  # a refused login and a proxy not serving yet look alike
                logger.debug("milvus: login as root refused or not served yet: %s", exc)
                continue
            try:
                if candidate != password:
                    client.update_password(ROOT_USER, candidate, password)
                    logger.info("milvus: root password set to the stack's secret")
            finally:
                client.close()
            self._refused_rounds = 0
            return True
        # pymilvus reports a wrong password as "fail connecting": only a refusal that lasts
        # while healthz says OK means the secret is lost.
        self._refused_rounds += 1
        if self._refused_rounds < _REFUSALS_BEFORE_LOST:
            return False
        raise StackError(
            f"milvus: the root password is neither {self.secret_file} nor the default; "
            "the data was secured with a lost secret (trident-stack reset starts afresh)",
            self.process.log_file,
        )

    def _env(self) -> dict[str, str]:
        # A clean environment: Milvus reads overrides from env vars (ETCD_*, COMMON_*, ...), so
        # nothing of the caller's environment may leak into the server's config.
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.folder),
            "LD_LIBRARY_PATH": str(self.binary.parent),
            "DEPLOY_MODE": "STANDALONE",
            "MILVUSCONF": f"{self.configs}/",
            "METRICS_PORT": str(self.ports["metrics"]),
            "MILVUS_RUN_DIR": str(self.folder / "run"),
            **SERVER_ENVIRONMENT,
            **self.extra_environment,
        }

    def _write_configs(self) -> None:
        host, p = self.config.host, self.ports
        template = (self.server_dir / "config.yaml.template").read_text()
        # The wheel's own mini template syntax: {{ key(type): default }}; take the defaults and
        # then set what we need on the parsed YAML.
        settings: dict[str, Any] = yaml.safe_load(
            _PLACEHOLDER.sub(lambda m: m.group(1) or "", template)
        )
        etcd_client = f"http://{host}:{p['etcd_client']}"
        etcd_peer = f"http://{host}:{p['etcd_peer']}"
        overrides: dict[str, Any] = {
            "etcd.endpoints": f"{host}:{p['etcd_client']}",
            "etcd.config.path": str(self.configs / "embedEtcd.yaml"),
            "etcd.data.dir": str(self.data / "etcd"),
            "etcd.log.path": str(self.logs / "etcd.log"),
            "etcd.log.level": "warn",
            "localStorage.path": str(self.data / "storage"),
            "rocksmq.path": str(self.data / "rocksmq"),
            "proxy.port": self.config.milvus_port,
            "proxy.internalPort": p["proxy_internal"],
            "rootCoord.port": p["root_coord"],
            "queryCoord.port": p["query_coord"],
            "queryNode.port": p["query_node"],
            "dataCoord.port": p["data_coord"],
            "dataNode.port": p["data_node"],
            "indexNode.port": p["index_node"],
            "indexCoord.bindIndexNodeMode.address": f"{host}:{p['index_coord']}",
            # A dev stack churns through collections: free dropped data after 10 min, not 3 h,
            # and keep 1 h / 1 GB of consumed write-ahead log, not 3 days / 8 GB.
            "dataCoord.gc.interval": 600,
            "dataCoord.gc.dropTolerance": 600,
            "dataCoord.gc.missingTolerance": 600,
            "rocksmq.retentionTimeInMinutes": 60,
            "rocksmq.retentionSizeInMB": 1024,
            # Cheaper writes, measured together with GOGC above (docs/PERFORMANCE.md): an
            # uncompressed write-ahead log (it is local and retained 1 h), and a 64 MiB insert
            # buffer instead of 16, so the data node flushes fewer, larger binlogs.
            "rocksmq.compressionTypes": [0, 0, 0, 0, 0],
            "dataNode.segment.insertBufSize": 64 * 1024 * 1024,
            # Only stdout, which ManagedProcess sends to milvus.log.
            "log.file.rootPath": "",
            # On SIGTERM the query node waits this long to hand its segments to another node;
            # standalone has none, so the wait is pure loss (data is safe in the WAL anyway).
            "common.gracefulStopTimeout": 3,
            # A restarted server waits for the previous run's sessions (never revoked by 2.3.5's
            # exit) to expire before DDL proceeds: the stock 30 s TTL stalled create_collection
            # for ~25 s after each restart.
            "common.session.ttl": 10,
            # Its gRPC ports listen on every interface: nobody gets in without the secret.
            "common.security.authorizationEnabled": True,
            **{f"{component}.ip": host for component in _COMPONENTS},
            **SEARCH_UNDER_LOAD,
            **self.extra_settings,
        }
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = settings
            for key in parents:
                if not isinstance(node.get(key), dict):  # e.g. "ip:" parses as None
                    node[key] = {}
                node = node[key]
            node[leaf] = value
        self.configs.mkdir(parents=True, exist_ok=True)
        (self.configs / "milvus.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        # Without its own config the embedded etcd takes etcd's stock localhost:2379/2380.
        embed_etcd = {
            "name": "milvus",
            "listen-client-urls": etcd_client,
            "advertise-client-urls": etcd_client,
            "listen-peer-urls": etcd_peer,
            "initial-advertise-peer-urls": etcd_peer,
            "initial-cluster": f"milvus={etcd_peer}",
            "log-level": "warn",
            "log-outputs": [str(self.logs / "etcd.log")],
        }
        (self.configs / "embedEtcd.yaml").write_text(yaml.safe_dump(embed_etcd))
        glog = (self.server_dir / "glog.conf").read_text()
        glog = re.sub(r"--log_dir=.*", f"--log_dir={self.logs}/", glog)
        (self.configs / "glog.conf").write_text(glog)

    def _wait_released(self, timeout: float = 10.0) -> None:
        # Also waits for a server this stack did not record (a leftover of an earlier run).
        deadline = time.monotonic() + timeout
        while self._server_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        wait_ports_closed(self.config.host, self.all_ports, max(0.0, deadline - time.monotonic()))

    def _server_pids(self) -> list[int]:
        """Pids of live Milvus servers of *this* stack: the cached binary (shared by every stack
        on the machine) running with this stack's folder as its working directory."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ours = Path(os.readlink(entry / "cwd")) == self.folder
                    if ours and Path(os.readlink(entry / "exe")) == self.binary:
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids


def _probe_alias() -> str:
    # A connection of the probe's own: pymilvus shares connections by URI and token otherwise,
    # and the probe's close() would close them for every other client of this process.
    return f"stack-probe-{secrets.token_hex(8)}"
