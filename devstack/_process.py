"""Start, watch and stop one background server process of the local stack.

Every service of the stack is a single long-running process started in its own session (so a
stop can signal the whole process group and leave no orphans), with its output in one log file
and its pid in a pid file, both in the service's folder under the stack root.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from devstack.errors import StackError

logger = logging.getLogger(__name__)

# Children started by this process, kept so they can be reaped: a stopped child that nobody
# waits for stays a zombie (and looks alive to pid checks) until this process exits.
_children: dict[int, subprocess.Popen[bytes]] = {}


class ManagedProcess:
    """A server process identified by a pid file; safe to start and stop repeatedly."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.folder = folder
        self.pid_file = folder / f"{name}.pid"
        self.log_file = folder / f"{name}.log"

    def pid(self) -> int | None:
        """The pid of the running process, or None when it is not running."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        if _is_zombie(pid):
            return None
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> int:
        """Start the process detached, appending its output to the log file; return its pid.

        Raises:
            StackError: the executable could not be started.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            log.write(f"\n===== {stamp} starting: {' '.join(argv)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dict(env) if env is not None else None,
                    cwd=cwd,
                    # A new session makes the process a group leader: stop() signals the group,
                    # which takes any children (e.g. Triton's python-backend stubs) with it.
                    start_new_session=True,
                )
            except OSError as exc:
                raise StackError(
                    f"{self.name}: could not start {argv[0]}: {exc}", self.log_file
                ) from exc
        _children[proc.pid] = proc
        self.pid_file.write_text(str(proc.pid))
        logger.info("%s started (pid %d), log %s", self.name, proc.pid, self.log_file)
        return proc.pid

    def stop(self, timeout: float = 20.0) -> bool:
        """Stop the process group: SIGTERM, then SIGKILL after ``timeout``.

        Returns True if a process was running.
        """
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.1)
        if _group_alive(pid):
            logger.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
            _signal_group(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _group_alive(pid):
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        logger.info("%s stopped", self.name)
        return True

    def kill(self) -> None:
        """SIGKILL the whole process group at once (used by fault tests)."""
        pid = self.pid()
        if pid is not None:
            _signal_group(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _group_alive(pid):
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log yet)"
        return "\n".join(text.splitlines()[-lines:])


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _group_alive(pgid: int) -> bool:
    """True while any non-zombie process of the group is left."""
    _reap(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) succeeds for zombies too; look for a live member.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and _has_live_thread(int(entry.name)):
            return True
    return False


def _is_zombie(pid: int) -> bool:
    _reap(pid)
    return not _has_live_thread(pid)


def _has_live_thread(pid: int) -> bool:
    """True while any thread of the process is not a zombie.

    A killed multithreaded process (a JVM, a Go server) shows its leader thread as a zombie while
    its other threads are still exiting and holding its sockets: it is not gone yet.
    """
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return False
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state != "Z":
            return True
    return False


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_ports_closed(host: str, ports: Sequence[int], timeout: float = 10.0) -> list[int]:
    """Wait until nothing listens on ``ports``; return those still open after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        busy = [port for port in ports if port_open(host, port)]
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.1)


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    process: ManagedProcess | None = None,
    interval: float = 0.2,
) -> None:
    """Poll ``check`` every ``interval`` seconds until it is true.

    The default is short because every restart in the fault tests waits here: a probe costs a
    few milliseconds, a late look costs the whole interval.

    Raises:
        StackError: the timeout passed, or ``process`` died while waiting; the message names the
            service and its log, and quotes the end of the log. A StackError from ``check``
            itself is raised at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except StackError:  # the probe knows it can never succeed: say so at once
            raise
        except Exception as exc:  # a failing probe just means "not yet"
            logger.debug("%s: probe failed: %s", what, exc)
        if process is not None and not process.is_running():
            raise StackError(
                f"{what}: the process exited while starting.\n"
                f"--- last lines of {process.log_file}:\n{process.log_tail()}",
                process.log_file,
            )
        if time.monotonic() > deadline:
            log_file = process.log_file if process is not None else None
            tail = f"\n--- last lines of {log_file}:\n{process.log_tail()}" if process else ""
            raise StackError(f"{what}: not ready after {timeout:.0f}s.{tail}", log_file)
        time.sleep(interval)
