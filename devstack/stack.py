"""The whole local stack: Kafka, Milvus and Triton, plus worker and query-API processes.

Used by ``trident-stack`` (and so ``make up``/``make down``) and by the tests. Every server binds
to loopback (see the README for Milvus's exceptions, and its authentication), keeps its data,
logs and pid file under ``StackConfig.root``, and is started and stopped idempotently. A stack
stops only the processes it started (pid files, working directories under its root): several
stacks, e.g. the quick start and the tests, share one install cache but never each other's
processes.

Triton serves EfficientNet-Lite0 (its uint8- and float32-input models), the region model of
each served model that has a region recipe (Lite0 uint8's, for collections with region vectors:
issue 24), and, when asked, other built-in models of the registry (``LocalStack(models=...)``,
``trident-stack up --models``). The choice is remembered in ``<root>/triton/extra_models.json``,
so a later ``up`` without a choice (``make up``, the tests' fixture) serves the same models
instead of restarting Triton without them; an empty choice goes back to Lite0 alone. Models no
longer asked for leave the repository (and Triton, which is restarted when it changes).
:meth:`LocalStack.serve_models` (``trident-stack models add``) adds models to the running Triton
without a restart.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import yaml

from devstack._locking import exclusive_file_lock
from devstack._process import ManagedProcess, port_open, wait_until
from devstack.config import StackConfig
from devstack.errors import StackError
from devstack.kafka import KafkaService
from devstack.milvus import MilvusService
from devstack.triton import TritonService
from engine.errors import ConfigurationError
from engine.models import UINT8_MODEL_SPEC, ModelSpec, model_spec, region_model_of
from engine.settings import Settings
from reembed.local import stop_all

logger = logging.getLogger(__name__)

# A process changing the model repository waits this long for another one's change (a write and
# the loads into Triton, each bounded by LOAD_TIMEOUT) before it gives up.
_REPOSITORY_LOCK_TIMEOUT_S = 300.0


def region_models(specs: Sequence[ModelSpec]) -> list[ModelSpec]:
    """The region models (:func:`engine.models.region_model_of`) of the ``specs`` that have a
    region recipe, in order, without repeats: a stack serving a model serves its regions' too,
    so that a collection with region vectors needs no extra step."""
    found: list[ModelSpec] = []
    for spec in specs:
        if spec.regions is not None:
            region = region_model_of(spec)
            if region not in found:
                found.append(region)
    return found


class Service(Protocol):
    name: str

    def install(self) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def healthy(self) -> bool: ...
    def status(self) -> dict[str, Any]: ...


class LocalStack:
    """Install, start, inspect and stop the local services and application processes.

    ``models``: the built-in models (Triton names, :func:`engine.models.model_registry`) that
    Triton serves besides Lite0's two; ``None`` keeps the last choice made for this root.

    Raises:
        UnknownModelError: a name in ``models`` is not a built-in model.
    """

    def __init__(
        self, config: StackConfig | None = None, *, models: Sequence[str] | None = None
    ) -> None:
        self.config = config or StackConfig()
        self.kafka = KafkaService(self.config)
        self.milvus = MilvusService(self.config)
        self.model_repository = self.config.folder("triton") / "models"
        self.triton = TritonService(self.config, self.model_repository)
        self.apps_folder = self.config.folder("apps")
        self._models_choice = self.config.folder("triton") / "extra_models.json"
        # Checked now: an unknown name fails before anything is installed or started.
        self._asked = None if models is None else [model_spec(name).name for name in models]

    @property
    def extra_models(self) -> list[str]:
        """The models served besides Lite0's: those asked for, else the remembered choice."""
        if self._asked is not None:
            return list(dict.fromkeys(self._asked))
        return self._remembered_models()

    def _remembered_models(self) -> list[str]:
        """The choice the last repository write of this root remembered ([] when none)."""
        try:
            remembered = json.loads(self._models_choice.read_text())
        except (FileNotFoundError, ValueError):
            return []
        return [str(name) for name in remembered] if isinstance(remembered, list) else []

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

        Writes Lite0's models (uint8- and float32-input), :attr:`extra_models` and the region
        models of those with a region recipe (:func:`region_models`), removes the
        built-in models no longer asked for, and remembers the choice. A running Triton that
        loaded another repository content is restarted by ``up()`` (see
        :meth:`TritonService.start`).

        Raises:
            UnknownModelError: a remembered model is no longer in the registry.
            ConfigurationError, TorchPickleError, OSError: as ``write_served_models``.
            StackError: another process kept the repository locked for too long.
        """
        with self._repository_locked():
            return self._write_repository()

    def _write_repository(self) -> Path:
        """:meth:`build_model_repository`, for a caller that holds :meth:`_repository_locked`."""
        # onnx (the model extra) is needed only here, not by the other stack commands.
        from model_build.triton_repository import (  # noqa: PLC0415
            builtin_specs,
            remove_builtin_models,
            write_served_models,
        )

        extra = builtin_specs(self.extra_models)
        served = [*extra, *(s for s in region_models([UINT8_MODEL_SPEC, *extra]) if s not in extra)]
        folders = write_served_models(self.model_repository, backend="python", extra=served)
        remove_builtin_models(self.model_repository, keep=[folder.name for folder in folders])
        self._models_choice.write_text(json.dumps([spec.name for spec in extra]))
        return self.model_repository

    def serve_models(self, names: Sequence[str]) -> list[str]:
        """Make the running Triton serve these registry models too, without a restart.

        Builds them into the repository (as ``up --models`` does), loads them into Triton while
        the models it serves keep answering, and remembers them like ``--models``, so that a
        later ``up`` keeps the same server. A model that fails to load is forgotten again and
        its folder removed.

        Returns:
            The names newly loaded (a model served already is not loaded again).

        Raises:
            StackError: a name is not in the registry (the message lists it), Triton is not
                running or was started before it could load models (``up`` restarts it), the
                repository could not be written, or Triton did not load a model within
                ``LOAD_TIMEOUT`` (the message quotes Triton's reason).
        """
        try:
            asked = [model_spec(name).name for name in names]
        except ConfigurationError as exc:
            raise StackError(str(exc)) from None
        self.triton.check_loadable()
        with self._repository_locked():
            # Another process of this root (a second `models add`, the tests' processes) may
            # have added models since this object last read the choice: keep theirs too, or
            # the rewrite would take their folders out of the repository.
            previous = list(dict.fromkeys([*self._remembered_models(), *(self._asked or [])]))
            self._asked = [*previous, *asked]
            try:
                self._build_for_stack()
                return self.triton.load_models(asked)
            except BaseException:
                self._asked = previous
                self._build_for_stack()
                raise

    def _build_for_stack(self) -> None:
        """:meth:`_write_repository` (the lock held), its failures as StackError."""
        try:
            self._write_repository()
        except (ConfigurationError, OSError) as exc:
            raise StackError(f"triton: could not write the model repository: {exc}") from exc

    @contextmanager
    def _repository_locked(self) -> Iterator[None]:
        """Hold this root's model-repository lock: one process at a time reads the remembered
        choice, rewrites the repository and loads models.

        Raises:
            StackError: another process held it for over ``_REPOSITORY_LOCK_TIMEOUT_S``.
        """
        lock = self.config.folder("triton") / ".models.lock"
        try:
            with exclusive_file_lock(
                lock, timeout_s=_REPOSITORY_LOCK_TIMEOUT_S, what="another process's model change"
            ):
                yield
        except TimeoutError as exc:
            raise StackError(f"triton: {exc}; is a `trident-stack models add` stuck?") from None

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
            # trident-reembed's rebuild workers live with the stack: `down` stops them.
            "reembed": {"state_dir": str(self.reembed_folder)},
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

    @property
    def reembed_folder(self) -> Path:
        """Where ``trident-reembed`` keeps its state and local rebuild workers for this stack."""
        return self.config.root / "reembed"

    def stop_apps(self) -> None:
        """Stop the applications this stack started, the rebuild workers of
        ``trident-reembed start`` included."""
        stopped = stop_all(self.reembed_folder)
        if stopped:
            logger.info("stopped %d rebuild worker(s) of trident-reembed", stopped)
        for process in self._app_processes():
            process.stop()
