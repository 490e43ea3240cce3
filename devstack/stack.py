"""The whole local stack: Kafka, Milvus and Triton, plus worker and query-API processes.

Used by ``trident-stack`` (and so ``make up``/``make down``) and by the tests. Every server binds
to loopback (see the README for Milvus's exceptions, and its authentication), keeps its data,
logs and pid file under ``StackConfig.root``, and is started and stopped idempotently. A stack
stops only the processes it started (pid files, working directories under its root): several
stacks, e.g. the quick start and the tests, share one install cache but never each other's
processes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import yaml

from devstack._process import ManagedProcess, port_open, wait_until
from devstack.config import StackConfig
from devstack.errors import StackError
from devstack.kafka import KafkaService
from devstack.milvus import MilvusService
from devstack.triton import TritonService
from engine.settings import Settings

logger = logging.getLogger(__name__)


class Service(Protocol):
    name: str

    def install(self) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def healthy(self) -> bool: ...
    def status(self) -> dict[str, Any]: ...


class LocalStack:
    """Install, start, inspect and stop the local services and application processes."""

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        self.kafka = KafkaService(self.config)
        self.milvus = MilvusService(self.config)
        self.model_repository = self.config.folder("triton") / "models"
        self.triton = TritonService(self.config, self.model_repository)
        self.apps_folder = self.config.folder("apps")

    @property
    def services(self) -> list[Service]:
        return [self.kafka, self.milvus, self.triton]

    # Services -----------------------------------------------------------------------------

    def install(self) -> None:
        """Install every service (in parallel: they download from different registries).

        Raises:
            StackError: an install failed; the message names the service and its log.
        """
        steps: list[Callable[[], object]] = [
            self.kafka.install,
            self.milvus.install,
            self.triton.install,
            self.build_model_repository,
        ]
        self._all(steps)

    def build_model_repository(self) -> Path:
        """Convert the models and write the Triton model repository (no-op when up to date).

        Writes every model the applications use (uint8- and float32-input); a running Triton
        that loaded another repository content is restarted by ``up()`` (see
        :meth:`TritonService.start`).
        """
        # onnx (the model extra) is needed only here, not by the other stack commands.
        from model_build.triton_repository import write_served_models  # noqa: PLC0415

        write_served_models(self.model_repository, backend="python")
        return self.model_repository

    def up(self) -> None:
        """Install what is missing and start every service; a second call is harmless.

        Raises:
            StackError: a service did not come up; the message names it and its log.
        """
        started = time.monotonic()
        self.install()
        self._all([service.start for service in self.services])
        logger.info("stack up in %.1fs", time.monotonic() - started)

    def down(self) -> None:
        """Stop the application processes, then every service. Data is kept."""
        self.stop_apps()
        for service in reversed(self.services):
            service.stop()

    def status(self) -> dict[str, dict[str, Any]]:
        report = {service.name: service.status() for service in self.services}
        for process in self._app_processes():
            report[process.name] = {
                "running": process.is_running(),
                "pid": process.pid(),
                "log": str(process.log_file),
            }
        return report

    @staticmethod
    def _all(steps: list[Callable[[], object]]) -> None:
        with ThreadPoolExecutor(max_workers=len(steps)) as pool:
            futures = [pool.submit(step) for step in steps]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise StackError("\n".join(str(e) for e in errors))

    # Settings for the applications ----------------------------------------------------------

    def settings(self, **sections: Any) -> Settings:
        """Application settings pointing at this stack (``sections`` override whole sections)."""
        values: dict[str, Any] = {
            "kafka": {"bootstrap_servers": self.config.kafka_bootstrap},
            "triton": {"url": self.config.triton_grpc_url, "protocol": "grpc"},
            "milvus": {"uri": self.config.milvus_uri, "token": self.milvus.token},
        }
        for name, overrides in sections.items():
            values[name] = {**values.get(name, {}), **overrides}
        return Settings(**values)

    def write_settings(self, settings: Settings, name: str = "trident.yaml") -> Path:
        path = self.apps_folder / name
        path.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
        return path

    # Application processes ------------------------------------------------------------------

    def start_worker(
        self,
        settings_file: Path,
        *,
        name: str = "worker-1",
        env: Mapping[str, str] | None = None,
    ) -> ManagedProcess:
        """Start a worker process (no-op if one of that name runs).

        ``env`` is the process's whole environment (default: this process's).
        """
        process = ManagedProcess(name, self.apps_folder)
        if not process.is_running():
            process.start(
                [
                    sys.executable,
                    "-m",
                    "worker.cli",
                    "--config",
                    str(settings_file),
                    "--worker-id",
                    name,
                ],
                env=env,
            )
        return process

    def start_api(self, settings_file: Path, *, port: int) -> ManagedProcess:
        """Start the query API and wait until it answers.

        Raises:
            StackError: it did not come up within 120 s (the message quotes its log).
        """
        process = ManagedProcess("query-api", self.apps_folder)
        if not process.is_running():
            process.start([sys.executable, "-m", "query_api.cli", "--config", str(settings_file)])
        wait_until(
            lambda: port_open(self.config.host, port),
            timeout=120,
            what="query API",
            process=process,
        )
        return process

    def _app_processes(self) -> list[ManagedProcess]:
        return [
            ManagedProcess(pid_file.stem, self.apps_folder)
            for pid_file in sorted(self.apps_folder.glob("*.pid"))
        ]

    def stop_apps(self) -> None:
        for process in self._app_processes():
            process.stop()
