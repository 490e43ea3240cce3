"""The Kafka broker of the local stack: Apache Kafka 4.x jars from Maven Central, KRaft nodes.

Each JVM is both broker and controller (``process.roles=broker,controller``), listening on the
configured loopback host only. The stack runs one node (:class:`KafkaService`); fault tests run a
three-node replicated cluster beside it (:class:`KafkaCluster`). The jars of each version
(``libs-<version>/``) and the Maven log of the install live in the shared cache
(``<cache>/kafka/``); ``server.properties``, the log4j2 configuration, the data (``data/``), the
process log (``kafka.log``) and the pid file of a node under its folder (``<root>/kafka/``, or
``<root>/kafka-cluster/node-<id>/``).
"""

from __future__ import annotations

import base64
import logging
import shutil
import subprocess
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from devstack._process import ManagedProcess, port_open, wait_ports_closed, wait_until
from devstack.config import StackConfig
from devstack.errors import StackError

logger = logging.getLogger(__name__)

_INSTALL_TIMEOUT = 1200.0  # a cold ~/.m2 downloads ~90 jars; Maven Central can be slow
_FORMAT_TIMEOUT = 120.0
_START_TIMEOUT = 90.0
_STOP_TIMEOUT = 30.0  # a clean shutdown flushes logs and writes checkpoints: a few seconds
_PROBE_TIMEOUT = 2.0
# Readiness probes this far apart while a broker starts; restarts in the fault tests wait on it.
_POLL_S = 0.25

# Console only: the process's stdout already goes to ManagedProcess's log file. Kafka logs ~150
# INFO lines per start (thread starts, per-partition state); keep warnings, the server
# lifecycle and the version banner.
_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
"""
_INFO_LOGGERS = (
    "kafka.server.BrokerServer",
    "kafka.server.ControllerServer",
    "kafka.server.KafkaRaftServer",
    "org.apache.kafka.common.utils.AppInfoParser",
)


@dataclass(frozen=True)
class KafkaNode:
    """One KRaft node's id and loopback ports."""

    node_id: int
    port: int
    controller_port: int


class KafkaService:
    """One Kafka node (KRaft, combined broker + controller) on loopback.

    By default the stack's single node, its own quorum; with ``node`` and ``voters``, one member
    of a replicated cluster (see :class:`KafkaCluster`).
    """

    name = "kafka"

    def __init__(
        self,
        config: StackConfig,
        *,
        node: KafkaNode | None = None,
        voters: Sequence[KafkaNode] = (),
        folder: Path | None = None,
        cluster_id: str | None = None,
    ) -> None:
        self.config = config
        self.node = node or KafkaNode(1, config.kafka_port, config.kafka_controller_port)
        self.voters = tuple(voters) or (self.node,)
        self.folder = folder or config.folder(self.name)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._cluster_id = cluster_id
        # The jars are shared by every stack on this machine (quick start, tests): a cache.
        self.cache = config.cache_folder("kafka")
        self.libs = self.cache / f"libs-{config.kafka_version}"
        self.data_dir = self.folder / "data"
        self.properties_file = self.folder / "server.properties"
        self.log4j_file = self.folder / "log4j2.properties"
        self.process = ManagedProcess(self.name, self.folder)

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` of the broker's client listener."""
        return f"{self.config.host}:{self.node.port}"

    def install(self) -> None:
        """Fetch the broker's jars with Maven into ``libs-<version>/``; a no-op once done.

        Raises:
            StackError: ``mvn`` is missing, fails or times out (the message names its log).
        """
        version = self.config.kafka_version
        marker = self.libs / ".complete"
        if marker.exists():
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError("kafka: Apache Maven (`mvn`) is not on PATH; install it first.")
        # A folder without the marker is a copy an earlier run did not finish: start afresh.
        shutil.rmtree(self.libs, ignore_errors=True)
        # Package data beside this module (read by path: works from a checkout, an editable and
        # a regular install alike).
        template = Path(__file__).with_name("kafka_pom.xml")
        pom = self.cache / f"pom-{version}.xml"
        pom.write_text(template.read_text(encoding="utf-8").replace("@KAFKA_VERSION@", version))
        mvn_log = self.cache / f"mvn-{version}.log"
        argv = [mvn, "-B", "-q", "-f", str(pom), "dependency:copy-dependencies"]
        argv.append(f"-DoutputDirectory={self.libs}")
        logger.info("kafka: fetching Kafka %s jars with Maven (log %s)", version, mvn_log)
        try:
            rc = _run_logged(argv, mvn_log, _INSTALL_TIMEOUT, append=False)
        except subprocess.TimeoutExpired as exc:
            raise StackError(
                f"kafka: mvn did not finish within {_INSTALL_TIMEOUT:.0f}s; see {mvn_log}", mvn_log
            ) from exc
        if rc != 0 or not any(self.libs.glob("kafka_2.13-*.jar")):
            text = mvn_log.read_text(errors="replace")
            # Quote Maven's first error (past the colour codes it prints even in batch mode).
            errors = [ln[ln.index("[ERROR]") :] for ln in text.splitlines() if "[ERROR]" in ln]
            raise StackError(
                f"kafka: mvn could not fetch Kafka {version} (exit {rc}); see {mvn_log}"
                + (f"\n{errors[0]}" if errors else ""),
                mvn_log,
            )
        marker.write_text(f"{version}\n")

    def start(self) -> None:
        """Install if needed, format the data dir once, start the broker and wait until it answers.

        Raises:
            StackError: java or mvn missing, install or format failed, a port is taken by another
                process, or the broker did not answer a metadata request within 90 s.
        """
        if self.process.is_running():
            if not self.healthy():  # started by someone else a moment ago: let it come up
                self._wait_ready()
            return
        busy = self._wait_ports_released()
        if busy:
            raise StackError(
                f"kafka: {self.config.host}:{busy[0]} is in use by a process this stack did not "
                f"start (pid file {self.process.pid_file}); stop it or change the port.",
                self.process.log_file,
            )
        self.install()
        java = shutil.which("java")
        if java is None:
            raise StackError("kafka: `java` (17 or newer) is not on PATH; install a JDK first.")
        self._write_config()
        self._format_once(java)
        self.process.start([java, *self._jvm_args(), "kafka.Kafka", str(self.properties_file)])
        self._wait_ready()

    def healthy(self) -> bool:
        """True if the broker answers a metadata request within about 2 s."""
        # Checking the port first keeps librdkafka from retrying (and logging) against nothing.
        if not port_open(self.config.host, self.node.port):
            return False
        admin = AdminClient(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "socket.connection.setup.timeout.ms": int(_PROBE_TIMEOUT * 1000),
            },
            # librdkafka's own messages go to Python logging instead of stderr.
            logger=logging.getLogger(f"{__name__}.probe"),
        )
        try:
            metadata = admin.list_topics(timeout=_PROBE_TIMEOUT)
        except KafkaException as exc:
            logger.debug("kafka: metadata probe failed: %s", exc)
            return False
        return bool(metadata.brokers)

    def stop(self) -> None:
        """Stop the broker cleanly (SIGTERM, SIGKILL after 30 s); the data is kept. Never raises."""
        if self.process.stop(timeout=_STOP_TIMEOUT):
            self._wait_ports_released()

    def kill(self) -> None:
        """SIGKILL the broker at once (fault tests); the data is kept. Never raises."""
        was_running = self.process.is_running()
        self.process.kill()
        if was_running:
            self._wait_ports_released()

    def status(self) -> dict[str, str | int | bool | None]:
        """Running, healthy, pid, address and log path of the broker. Never raises."""
        pid = self.process.pid()
        return {
            "name": self.name,
            "running": pid is not None,
            "healthy": pid is not None and self.healthy(),
            "pid": pid,
            "address": self.bootstrap_servers,
            "log": str(self.process.log_file),
        }

    def reset(self) -> None:
        """Stop the broker and delete its data (topics, offsets, metadata); jars are kept.

        Never raises.
        """
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        logger.info("kafka: data deleted (%s)", self.data_dir)

    def _wait_ports_released(self, timeout: float = 10.0) -> list[int]:
        """Wait until no one listens on the broker's ports; return those still in use."""
        ports = (self.node.port, self.node.controller_port)
        return wait_ports_closed(self.config.host, ports, timeout)

    def _wait_ready(self) -> None:
        wait_until(
            self.healthy,
            timeout=_START_TIMEOUT,
            what=f"kafka at {self.bootstrap_servers}",
            process=self.process,
            interval=_POLL_S,
        )
        logger.info("kafka: ready at %s", self.bootstrap_servers)

    def _jvm_args(self) -> list[str]:
        return [
            f"-Xmx{self.config.kafka_heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_file}",
            "-cp",
            f"{self.libs}/*",  # expanded by java itself, not by a shell
        ]

    def _write_config(self) -> None:
        """Write server.properties and the log4j2 configuration (rewritten on every start)."""
        host, node = self.config.host, self.node
        # One node: no replication possible. A cluster: 3 replicas, and a write needs 2.
        replicas = str(min(3, len(self.voters)))
        min_isr = "2" if len(self.voters) >= 3 else "1"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            # A static voter set (no dynamic membership): this node alone, or the cluster's.
            "controller.quorum.voters": ",".join(
                f"{v.node_id}@{host}:{v.controller_port}" for v in self.voters
            ),
            "listeners": f"PLAINTEXT://{host}:{node.port},CONTROLLER://{host}:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{host}:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "4",
            "default.replication.factor": replicas,
            "min.insync.replicas": min_isr,
            "auto.create.topics.enable": "true",
            # Internal topics default to 3 replicas and 50 partitions: impossible, resp. slow to
            # create, on one small node.
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": "8",
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            # Tests join and leave groups constantly; the default 3 s delay only slows them down.
            "group.initial.rebalance.delay.ms": "0",
            # After a SIGKILL the restarted broker waits until its old registration's session
            # expires (9 s by default), and fault tests do that often. Not lower: on a loaded
            # 2-core machine heartbeats then time out in the controller's queue.
            "broker.heartbeat.interval.ms": "1000",
            "broker.session.timeout.ms": "6000",
            "log.segment.bytes": str(16 * 1024 * 1024),
            "log.retention.hours": "24",
            # The ingest topic is compacted: an idle cleaner looks for work every second instead
            # of every 15, so that compaction tests (small segments, min.cleanable.dirty.ratio
            # near 0) see it run within seconds. Production brokers keep Kafka's defaults.
            "log.cleaner.backoff.ms": "1000",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
        }
        self.properties_file.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        loggers = "".join(
            f"logger.l{i}.name = {name}\nlogger.l{i}.level = INFO\n"
            for i, name in enumerate(_INFO_LOGGERS)
        )
        self.log4j_file.write_text(_LOG4J2 + loggers)

    def _format_once(self, java: str) -> None:
        """Format the data dir with a new cluster id unless it already holds a formatted log.

        Raises:
            StackError: the storage tool failed or timed out.
        """
        if (self.data_dir / "meta.properties").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [java, *self._jvm_args(), "kafka.tools.StorageTool", "format"]
        argv += ["-t", self._cluster_id or _new_cluster_id(), "-c", str(self.properties_file)]
        log = self.process.log_file
        logger.info("kafka: formatting %s", self.data_dir)
        try:
            rc = _run_logged(argv, log, _FORMAT_TIMEOUT, append=True)
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"kafka: formatting the data dir timed out; see {log}", log) from exc
        if rc != 0:
            raise StackError(f"kafka: formatting the data dir failed (exit {rc}); see {log}", log)


class KafkaCluster:
    """Three KRaft nodes (each broker and controller) on loopback: replication factor 3 and
    ``min.insync.replicas=2`` everywhere, for failover tests. Its data lives under
    ``<root>/kafka-cluster/``; the nodes are this stack's processes like any other."""

    name = "kafka-cluster"

    def __init__(self, config: StackConfig, nodes: Sequence[KafkaNode]) -> None:
        self.folder = config.folder(self.name)
        id_file = self.folder / "cluster.id"
        if not id_file.exists():  # every node of one cluster is formatted with the same id
            id_file.write_text(_new_cluster_id())
        cluster_id = id_file.read_text().strip()
        self.brokers = {
            node.node_id: KafkaService(
                config,
                node=node,
                voters=nodes,
                folder=self.folder / f"node-{node.node_id}",
                cluster_id=cluster_id,
            )
            for node in nodes
        }

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(broker.bootstrap_servers for broker in self.brokers.values())

    def start(self) -> None:
        """Start every node at once (a node is ready only once a quorum of them runs).

        Raises:
            StackError: as :meth:`KafkaService.start`, for the first node that failed.
        """
        with ThreadPoolExecutor(max_workers=len(self.brokers)) as pool:
            for future in [pool.submit(broker.start) for broker in self.brokers.values()]:
                future.result()

    def stop(self) -> None:
        """Stop every node; never raises."""
        for broker in self.brokers.values():
            broker.stop()

    def reset(self) -> None:
        """Kill every node (all at once) and delete the cluster's data; never raises.

        A clean shutdown only preserves data that is deleted next: SIGKILL is as good, and
        takes no time.
        """
        with ThreadPoolExecutor(max_workers=len(self.brokers)) as pool:
            list(pool.map(KafkaService.kill, self.brokers.values()))
        shutil.rmtree(self.folder, ignore_errors=True)

    def busiest_leader(self, topic: str) -> int:
        """The node id leading most partitions of ``topic``.

        Raises:
            StackError: the cluster did not answer, or the topic has no partitions.
        """
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        try:
            metadata = admin.list_topics(topic, timeout=10)
        except KafkaException as exc:
            raise StackError(f"kafka cluster: no metadata for {topic}: {exc}") from exc
        leaders = Counter(p.leader for p in metadata.topics[topic].partitions.values())
        if not leaders:
            raise StackError(f"kafka cluster: topic {topic} has no partitions")
        return leaders.most_common(1)[0][0]


def _run_logged(argv: list[str], log: Path, timeout: float, *, append: bool) -> int:
    """Run a command to completion with its output in ``log``; return its exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab" if append else "wb") as out:
        out.write(f"\n===== running: {' '.join(argv)}\n".encode())
        out.flush()
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        ).returncode


def _new_cluster_id() -> str:
    """A random cluster id in Kafka's format: 16 random bytes, URL-safe base64, no padding."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):  # Kafka's own generator avoids these: CLI-unfriendly
            return cluster_id
