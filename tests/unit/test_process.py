"""ManagedProcess: start detached, stop the whole group, no orphans, idempotent."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from devstack._process import ManagedProcess, port_open, wait_ports_closed

# A parent that starts a child (same process group) and a listening socket, then idles.
SCRIPT = """
import socket, subprocess, sys, threading, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen()
print(server.getsockname()[1], flush=True)
threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
time.sleep(600)
"""


def _started(tmp_path: Path) -> tuple[ManagedProcess, int, int]:
    process = ManagedProcess("demo", tmp_path)
    process.start([sys.executable, "-c", SCRIPT])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = [line for line in process.log_file.read_text().splitlines() if line.isdigit()]
        if len(lines) == 2:
            return process, int(lines[0]), int(lines[1])
        time.sleep(0.05)
    raise AssertionError(process.log_tail())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def test_stop_takes_the_whole_group_and_frees_the_port(tmp_path: Path) -> None:
    process, child, port = _started(tmp_path)
    assert process.is_running() and _alive(child) and port_open("127.0.0.1", port)
    assert process.stop(timeout=10) is True
    assert not process.is_running()
    assert not _alive(child), "the child was orphaned"
    assert wait_ports_closed("127.0.0.1", [port], timeout=5) == []
    assert process.stop() is False  # a second stop is harmless


def test_kill_reports_gone_only_when_every_thread_exited(tmp_path: Path) -> None:
    process, child, port = _started(tmp_path)
    process.kill()
    assert not process.is_running()
    assert not _alive(child)
    assert not port_open("127.0.0.1", port)
