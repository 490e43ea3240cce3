"""The local rebuild workers: ``trident-worker`` processes started in the background, each in
a session of its own (a stop signals its whole group), with their settings, logs and pid files
in the rebuild's state folder (``reembed.plan.alias_folder``).

``stop_all(state_dir)`` stops every one of them (``trident-stack down`` calls it) and
``start_all(state_dir)`` starts them again (the quick start's ``up`` calls it). The
runtime packages never import the local stack (``devstack``): this is its own small copy of
starting and stopping a process by pid file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from engine.errors import ConfigurationError
from engine.settings import Settings
from reembed.plan import alias_folder, all_states

logger = logging.getLogger(__name__)

_SETTINGS_FILE = "worker.yaml"
_PREFIX = "rebuild-worker-"
# After SIGKILL, how long a process group gets to disappear.
_KILL_WAIT_S = 10.0


def write_worker_settings(folder: Path, settings: Settings) -> Path:
    """Write the rebuild workers' settings file into ``folder``; return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / _SETTINGS_FILE
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    return path


def _names(folder: Path, count: int | None = None) -> list[str]:
    if count is None:
        return sorted(path.stem for path in folder.glob(f"{_PREFIX}*.pid"))
    return [f"{_PREFIX}{n}" for n in range(1, count + 1)]


def _pid(folder: Path, name: str) -> int | None:
    """The pid of the running worker ``name``, or None."""
    try:
        pid = int((folder / f"{name}.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):
        # Our own child, exited: reap it (a zombie would look alive).
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def start_workers(folder: Path, count: int) -> list[int]:
    """Start the rebuild workers of ``folder`` that are not running (``count`` in all);
    return the pids of those started.

    Raises:
        ConfigurationError: the folder holds no settings file (run ``start``), or a worker
            could not be started.
    """
    settings_file = folder / _SETTINGS_FILE
    if not settings_file.is_file():
        raise ConfigurationError(f"no rebuild worker settings in {folder}: run start again")
    started = []
    for name in _names(folder, count):
        if _pid(folder, name) is not None:
            continue
        argv = [sys.executable, "-m", "worker.cli", "--config", str(settings_file)]
        argv += ["--worker-id", name, "--health-port", "0"]
        with (folder / f"{name}.log").open("ab") as log:
            try:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ConfigurationError(f"could not start {name}: {exc}") from exc
        (folder / f"{name}.pid").write_text(str(process.pid))
        logger.info("%s started (pid %d), log %s", name, process.pid, folder / f"{name}.log")
        started.append(process.pid)
    return started


def running_workers(folder: Path) -> dict[str, int]:
    """The running rebuild workers of ``folder``: name -> pid."""
    found = {}
    for name in _names(folder):
        pid = _pid(folder, name)
        if pid is not None:
            found[name] = pid
    return found


def stop_workers(folder: Path, *, timeout_s: float = 30.0) -> int:
    """Stop the rebuild workers of ``folder``: SIGTERM (they finish their batch and leave the
    group), SIGKILL after ``timeout_s``; return how many were running."""
    running = running_workers(folder)
    for pid in running.values():
        _signal(pid, signal.SIGTERM)
    _wait_gone(list(running.values()), timeout_s)
    left = [pid for pid in running.values() if _alive(pid)]
    for pid in left:
        logger.warning("rebuild worker %d did not stop within %.0fs: killing it", pid, timeout_s)
        _signal(pid, signal.SIGKILL)
    _wait_gone(left, _KILL_WAIT_S)
    for name in running:
        (folder / f"{name}.pid").unlink(missing_ok=True)
    return len(running)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def stop_all(state_dir: Path, *, timeout_s: float = 30.0) -> int:
    """Stop every local rebuild worker under ``state_dir``; return how many were running."""
    folders = {path.parent for path in state_dir.glob(f"*/{_PREFIX}*.pid")}
    return sum(stop_workers(folder, timeout_s=timeout_s) for folder in sorted(folders))


def start_all(state_dir: Path) -> int:
    """Start the workers of every recorded rebuild under ``state_dir`` that are not running
    (after the stack or the machine restarted: once switched, they are what writes the rebuilt
    collection); return how many were started.

    Raises:
        ConfigurationError: a state file is unreadable, or a worker could not be started.
    """
    started = 0
    for state in all_states(state_dir):
        folder = alias_folder(state_dir, state.alias)
        if (folder / _SETTINGS_FILE).is_file():
            started += len(start_workers(folder, state.workers))
    return started
