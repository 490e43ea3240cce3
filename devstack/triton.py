"""The Triton service of the local stack: NVIDIA's tritonserver 2.51 with only the python backend.

No registry reachable here carries Triton's onnxruntime backend, but the PyPI wheel
``nvidia-pytriton==0.7.0`` ships the tritonserver binary, its shared libraries and the python
backend. ``install()`` puts the wheel in its own venv (with ``numpy<2``: under numpy 2 the python
backend silently returns empty outputs; the main venv keeps numpy 2 for JAX) and lays out a
self-contained server: the wheel keeps one backend stub per Python version apart from the
backend, while the backend looks for ``triton_python_backend_stub`` next to itself. ``start()``
runs the binary directly through :class:`ManagedProcess` (own session, pid and log files) on the
model repository the caller built (python-backend ``model.py`` running onnxruntime).

Layout: the install in the shared cache ``<cache>/triton``: ``venv/``, ``bin/tritonserver``,
``backends/python/`` (backend library, its utils module and the stub), ``install.json``
(marker), ``pip.log``; the running server's ``triton.log``/``triton.pid`` under ``<root>/triton``,
and ``loaded.json``: the command line the server runs with and the fingerprint of the model
repository it serves. The server runs with explicit model control: it loads the repository's
models at start (``--load-model``), polls nothing, and loads more when asked
(:meth:`TritonService.load_models`, which records the new state). ``start()`` restarts a running
server whose record differs from what a fresh start would be (models rebuilt or added behind its
back, other flags, or a server started before this record existed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devstack._process import ManagedProcess, port_open, wait_until
from devstack.config import StackConfig
from devstack.errors import StackError

logger = logging.getLogger(__name__)

REQUIREMENTS = ("numpy<2", "nvidia-pytriton==0.7.0", "onnxruntime")
START_TIMEOUT = 120.0
# A model loaded into the running server: its python-backend stubs start and build their sessions.
LOAD_TIMEOUT = 120.0
# Triton drains in-flight requests for at most this long on SIGTERM; ManagedProcess kills later.
EXIT_TIMEOUT = 10
_STOP_TIMEOUT = 20.0
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
# What the venv's own interpreter reports about itself; the stub embeds that same libpython.
_PROBE = (
    "import json, sys, sysconfig; print(json.dumps({"
    "'version': f'{sys.version_info[0]}.{sys.version_info[1]}', "
    "'purelib': sysconfig.get_paths()['purelib'], "
    "'libdir': sysconfig.get_config_var('LIBDIR'), "
    "'ldlibrary': sysconfig.get_config_var('LDLIBRARY')}))"
)


class TritonService:
    """Install, start, probe and stop the local Triton Inference Server.

    ``model_repository`` is built by the caller; ``models`` are the models whose readiness
    ``start()`` waits for (default: every folder of the repository holding a ``config.pbtxt``).
    """

    name = "triton"

    def __init__(
        self,
        config: StackConfig,
        model_repository: Path,
        *,
        models: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.model_repository = model_repository.resolve()
        self._models = tuple(models) if models is not None else None
        self.folder = config.folder(self.name)
        # Venv, binary and backends are shared by every stack on this machine: a cache.
        cache = config.cache_folder(self.name)
        self.venv = cache / "venv"
        self.binary = cache / "bin" / "tritonserver"
        self.backends = cache / "backends"
        self.marker = cache / "install.json"
        self.pip_log = cache / "pip.log"
        self.process = ManagedProcess(self.name, self.folder)
        # The python backend's shared-memory regions in /dev/shm carry this prefix, so that the
        # regions a SIGKILLed server leaves behind can be told apart from anyone else's.
        self.shm_prefix = f"triton_stack_{config.triton_http_port}_"

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP/REST endpoint (tritonclient.http wants no scheme)."""
        return f"{self.config.host}:{self.config.triton_http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"{self.config.host}:{self.config.triton_grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.config.triton_metrics_port}/metrics"

    @property
    def models(self) -> tuple[str, ...]:
        if self._models is not None:
            return self._models
        return tuple(sorted(p.parent.name for p in self.model_repository.glob("*/config.pbtxt")))

    # ---------------------------------------------------------------- install

    def install(self) -> None:
        """Create the venv, pip-install the wheel and lay out binary and backend (idempotent).

        Raises:
            StackError: venv creation or pip failed (the message names ``pip.log``), the wheel
                has no stub for the venv's Python version, or that Python has no shared libpython.
        """
        if self._installed() is not None:
            return
        started = time.monotonic()
        python = self.venv / "bin" / "python"
        if not python.exists():
            self._run_logged("create the venv", [self.config.python, "-m", "venv", str(self.venv)])
        self._run_logged(
            "pip install " + " ".join(REQUIREMENTS),
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", *REQUIREMENTS],
        )
        probe = subprocess.run(
            [str(python), "-c", _PROBE], capture_output=True, text=True, check=False
        )
        if probe.returncode != 0:
            raise StackError(f"triton: the venv's python failed: {probe.stderr.strip()}")
        info: dict[str, str] = json.loads(probe.stdout)
        libpython = Path(info["libdir"]) / info["ldlibrary"]
        if not info["ldlibrary"].endswith(".so") or not libpython.exists():
            raise StackError(
                f"triton: {self.config.python} ({info['version']}) has no shared libpython "
                f"({libpython}); the python backend stub needs one (pyenv: "
                "PYTHON_CONFIGURE_OPTS=--enable-shared)"
            )
        wheel = Path(info["purelib"]) / "pytriton" / "tritonserver"
        stub = wheel / "python_backend_stubs" / info["version"] / "triton_python_backend_stub"
        if not stub.exists():
            raise StackError(
                f"triton: nvidia-pytriton has no python backend stub for Python "
                f"{info['version']} ({stub}); use another config.python"
            )
        python_backend = self.backends / "python"
        python_backend.mkdir(parents=True, exist_ok=True)
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        # copy2 keeps the executable bits.
        shutil.copy2(wheel / "bin" / "tritonserver", self.binary)
        shutil.copy2(stub, python_backend / stub.name)
        for name in _PYTHON_BACKEND_FILES:
            shutil.copy2(wheel / "backends" / "python" / name, python_backend / name)
        info["requirements"] = " ".join(REQUIREMENTS)
        self.marker.write_text(json.dumps(info, indent=2))
        logger.info("triton installed in %.0fs", time.monotonic() - started)

    def _installed(self) -> dict[str, str] | None:
        """The install record if install() completed with the current requirements."""
        try:
            info: dict[str, str] = json.loads(self.marker.read_text())
        except (FileNotFoundError, ValueError):
            return None
        stub = self.backends / "python" / "triton_python_backend_stub"
        files = (self.binary, stub, Path(info.get("purelib", "")) / "nvidia_pytriton.libs")
        if info.get("requirements") != " ".join(REQUIREMENTS) or not all(map(Path.exists, files)):
            return None
        return info

    def _run_logged(self, step: str, argv: list[str]) -> None:
        with self.pip_log.open("ab") as log:
            log.write(f"\n===== {step}: {' '.join(argv)}\n".encode())
            log.flush()
            try:
                done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False)
            except OSError as exc:
                raise StackError(f"triton: could not {step}: {exc}", self.pip_log) from exc
        if done.returncode != 0:
            raise StackError(
                f"triton: could not {step} (exit {done.returncode}); see {self.pip_log}",
                self.pip_log,
            )

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the server unless it runs; wait until it and every model are ready.

        Raises:
            StackError: not installed, tritonclient missing, no model in the repository, a port
                is taken by another process, or the server exited or was not ready within 120 s
                (the message quotes ``triton.log``; a server that did not get ready is stopped).
        """
        info = self._installed()
        if info is None:
            raise StackError("triton: not installed; run install() first")
        try:
            # The readiness probe needs it: failing now beats 120 s of silently failing probes.
            import tritonclient.http  # noqa: F401, PLC0415
        except ImportError as exc:
            raise StackError(f"triton: tritonclient[http] cannot be imported: {exc}") from exc
        if not self.models:
            raise StackError(f"triton: no model (*/config.pbtxt) in {self.model_repository}")
        if self.process.is_running() and self._loaded_record() != self._expected_record():
            logger.info("triton: its models or flags changed since it started; restarting")
            self.stop()
        if not self.process.is_running():
            ports = (
                self.config.triton_http_port,
                self.config.triton_grpc_port,
                self.config.triton_metrics_port,
            )
            busy = [port for port in ports if port_open(self.config.host, port)]
            if busy:
                raise StackError(
                    f"triton: ports {busy} already in use by another process",
                    self.process.log_file,
                )
            self._remove_stale_shm()
            record = self._expected_record()
            self.process.start(record["argv"], env=self._env(info), cwd=self.folder)
            self._write_record(record)
        started = time.monotonic()
        try:
            wait_until(self._probe, timeout=START_TIMEOUT, what="triton", process=self.process)
        except StackError:
            self.stop()
            raise
        logger.info(
            "triton ready at %s (models %s) after %.1fs",
            self.http_url,
            ", ".join(self.models),
            time.monotonic() - started,
        )

    def healthy(self) -> bool:
        """True if the server runs and reports itself and every model ready; never raises."""
        try:
            return self.process.is_running() and self._probe()
        except Exception as exc:  # any failure of the probe means "not healthy"
            logger.debug("triton probe failed: %s", exc)
            return False

    def stop(self) -> None:
        """SIGTERM the process group (server and python-backend stubs), SIGKILL after 20 s.

        Never raises.
        """
        self.process.stop(timeout=_STOP_TIMEOUT)
        self._remove_stale_shm()

    def kill(self) -> None:
        """SIGKILL the process group at once (fault tests); never raises."""
        self.process.kill()
        self._remove_stale_shm()

    def status(self) -> dict[str, Any]:
        """Running/healthy state, pid, endpoints and log file; never raises."""
        return {
            "name": self.name,
            "running": self.process.is_running(),
            "healthy": self.healthy(),
            "pid": self.process.pid(),
            "http_url": self.http_url,
            "grpc_url": self.grpc_url,
            "metrics_url": self.metrics_url,
            "models": list(self.models),
            "log": str(self.process.log_file),
        }

    @property
    def loaded_marker(self) -> Path:
        return self.folder / "loaded.json"

    def repository_fingerprint(self) -> dict[str, list[int]]:
        """Size and modification time of every file of the repository, by relative path.

        The repository writer replaces a file only when its content changes, so this changes
        exactly when a model, its config or its model.py does. Left out: the python backend's
        own ``__pycache__`` and the writer's dot-prefixed temporary files.
        """
        return {
            str(path.relative_to(self.model_repository)): [stat.st_size, stat.st_mtime_ns]
            for path in sorted(self.model_repository.rglob("*"))
            if path.is_file()
            and not path.name.startswith(".")
            and "__pycache__" not in path.relative_to(self.model_repository).parts
            for stat in [path.stat()]
        }

    def load_models(self, names: Sequence[str], *, timeout: float = LOAD_TIMEOUT) -> list[str]:
        """Load models of the repository into the running server, without a restart.

        The models it serves already keep answering while the others load. Then records the
        server's state, so that the next ``start()`` keeps it running.

        Returns:
            The names that were not ready before, in order.

        Raises:
            StackError: the server is not running, it was started with other flags or models
                than a start would use now (``start()`` restarts it), a name has no folder in
                the repository, Triton refused a model (its message), or the loads took longer
                than ``timeout`` seconds.
        """
        self.check_loadable()
        missing = [name for name in names if not (self.model_repository / name).is_dir()]
        if missing:
            raise StackError(f"triton: no model {missing} in {self.model_repository}")
        deadline = time.monotonic() + timeout
        newly = self._load(names, deadline)
        self._write_record(self._expected_record())
        return newly

    def check_loadable(self) -> None:
        """Return if the running server can load models now (:meth:`load_models`).

        Raises:
            StackError: the server is not running, or was started with other flags than a
                start would use now (e.g. before it could load models; ``start()`` restarts it).
        """
        if not self.process.is_running():
            raise StackError("triton: not running; start the stack first (trident-stack up)")
        loaded = self._loaded_record()
        if loaded is None or loaded["argv"] != self._argv(self._started_models(loaded)):
            raise StackError(
                "triton: this server was started with other flags (before models could be "
                "loaded into it); restart it with trident-stack up",
                self.process.log_file,
            )

    def model_states(self, *, timeout: float = 5.0) -> dict[str, str]:
        """Every model of the repository with Triton's state for it (``READY``, ``UNAVAILABLE``,
        or ``not loaded``).

        Raises:
            StackError: the server did not answer within ``timeout`` seconds.
        """
        import tritonclient.grpc as grpcclient  # noqa: PLC0415
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            index = client.get_model_repository_index(as_json=True, client_timeout=timeout)
        except InferenceServerException as exc:
            raise StackError(f"triton at {self.grpc_url} did not answer: {exc.message()}") from exc
        finally:
            client.close()
        return {
            str(entry["name"]): str(entry.get("state") or "not loaded")
            for entry in index.get("models", [])
        }

    def _load(self, names: Sequence[str], deadline: float) -> list[str]:
        # gRPC: its client_timeout bounds each call; the HTTP client's timeouts are per socket.
        import tritonclient.grpc as grpcclient  # noqa: PLC0415
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        client = grpcclient.InferenceServerClient(self.grpc_url)
        newly: list[str] = []
        try:
            for name in dict.fromkeys(names):
                if client.is_model_ready(name, client_timeout=5.0):
                    continue
                started = time.monotonic()
                remaining = deadline - started
                if remaining <= 0:
                    raise StackError(f"triton: no time left to load {name!r}")
                try:
                    client.load_model(name, client_timeout=remaining)
                except InferenceServerException as exc:
                    raise StackError(
                        f"triton: could not load {name!r}: {exc.message()}", self.process.log_file
                    ) from exc
                logger.info("triton: loaded %s in %.1fs", name, time.monotonic() - started)
                newly.append(name)
        finally:
            client.close()
        return newly

    def _expected_record(self) -> dict[str, Any]:
        """What :attr:`loaded_marker` holds for a server started now on the repository."""
        return {"argv": self._argv(self.models), "files": self.repository_fingerprint()}

    @staticmethod
    def _started_models(record: dict[str, Any]) -> list[str]:
        prefix = "--load-model="
        return [arg.removeprefix(prefix) for arg in record["argv"] if arg.startswith(prefix)]

    def _write_record(self, record: dict[str, Any]) -> None:
        self.loaded_marker.write_text(json.dumps(record, indent=1))

    def _loaded_record(self) -> dict[str, Any] | None:
        """The running server's record; None if missing or from before records held argv."""
        try:
            loaded = json.loads(self.loaded_marker.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(loaded, dict) or not isinstance(loaded.get("argv"), list):
            return None
        return loaded

    # ---------------------------------------------------------------- internals

    def _argv(self, models: Sequence[str]) -> list[str]:
        host = self.config.host
        return [
            str(self.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.backends}",
            f"--http-address={host}",
            f"--http-port={self.config.triton_http_port}",
            f"--grpc-address={host}",
            f"--grpc-port={self.config.triton_grpc_port}",
            f"--metrics-address={host}",
            f"--metrics-port={self.config.triton_metrics_port}",
            "--allow-gpu-metrics=false",
            # No GPU: the pinned pool only produces a CUDA warning at start.
            "--pinned-memory-pool-byte-size=0",
            # No polling: the server loads these models at start, and more only when asked
            # (load_models), so a model written into the repository never half-loads.
            "--model-control-mode=explicit",
            *(f"--load-model={model}" for model in models),
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={EXIT_TIMEOUT}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]

    def _env(self, info: dict[str, str]) -> dict[str, str]:
        base = _base_env()
        libs = Path(info["purelib"]) / "nvidia_pytriton.libs"
        return {
            **base,
            # The stub embeds libpython and finds its prefix (hence the venv's site-packages with
            # numpy<2 and onnxruntime) by looking up python on PATH: the venv's bin goes first.
            "PATH": os.pathsep.join([str(self.venv / "bin"), base["PATH"]]),
            # The venv's own LIBDIR first: otherwise the stub may load Debian's libpython3.11,
            # which fails inside multiprocessing. The wheel's libs serve the copied binaries,
            # whose RPATH ($ORIGIN/...) no longer points at them.
            "LD_LIBRARY_PATH": os.pathsep.join([info["libdir"], str(libs)]),
            "VIRTUAL_ENV": str(self.venv),
            # Packages in ~/.local must not shadow the venv's numpy<2.
            "PYTHONNOUSERSITE": "1",
        }

    def _probe(self) -> bool:
        # Imported late: tritonclient.http pulls in gevent, and only a running server needs it.
        import tritonclient.http as httpclient  # noqa: PLC0415

        client = httpclient.InferenceServerClient(
            self.http_url, connection_timeout=2.0, network_timeout=2.0
        )
        try:
            return bool(client.is_server_ready()) and all(
                client.is_model_ready(model) for model in self.models
            )
        finally:
            client.close()

    def _remove_stale_shm(self) -> None:
        """Delete this stack's python-backend regions in /dev/shm once no server of ours runs.

        A clean stop removes them; a SIGKILL leaves them (up to the model's tensor sizes each).
        """
        if self.process.is_running():
            return
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            logger.debug("triton: removing stale shared memory %s", region)
            region.unlink(missing_ok=True)


def _base_env() -> dict[str, str]:
    """The few variables of the caller's environment the server may inherit.

    Everything else is set explicitly: an inherited PYTHONPATH, PYTHONHOME, VIRTUAL_ENV or
    LD_LIBRARY_PATH (e.g. of the main venv, with numpy 2) would change what the backend stub's
    embedded interpreter imports. HOME, USER, locale and TMPDIR are harmless basics; PATH keeps
    the system tools, minus the main venv's bin.
    """
    keep = ("HOME", "USER", "LANG", "LC_ALL", "TMPDIR")
    env = {key: os.environ[key] for key in keep if key in os.environ}
    main_bin = str(Path(sys.prefix) / "bin")
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != main_bin]
    env["PATH"] = os.pathsep.join(path or ["/usr/local/bin", "/usr/bin", "/bin"])
    return env
