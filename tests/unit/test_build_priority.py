"""The build-priority watcher (devstack/build_priority.py) on a real process: threads named like
knowhere's build pool go to SCHED_IDLE, once; the others keep their policy; a process that is gone
ends the watch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from devstack.build_priority import BUILD_THREAD_PREFIX, idle_build_threads, main
from tests.support.threads import thread_policies

# A process with three named threads (Linux: a thread's name is its /proc comm file).
_CHILD = f"""
import threading, time
def named(name):
    open(f"/proc/self/task/{{threading.get_native_id()}}/comm", "w").write(name)
    time.sleep(600)
for name in ("{BUILD_THREAD_PREFIX}0", "{BUILD_THREAD_PREFIX}1", "Knowhere_Search"):
    threading.Thread(target=named, args=(name,), daemon=True).start()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture
def child() -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    time.sleep(0.2)  # the threads name themselves
    yield process
    process.kill()
    process.wait()


def test_build_threads_go_idle_once_and_the_others_stay(child: subprocess.Popen[str]) -> None:
    before = thread_policies(child.pid)
    assert before[f"{BUILD_THREAD_PREFIX}0"] == {os.SCHED_OTHER}
    moved = idle_build_threads(child.pid)
    assert len(moved) == 2
    after = thread_policies(child.pid)
    assert after[f"{BUILD_THREAD_PREFIX}0"] == after[f"{BUILD_THREAD_PREFIX}1"] == {os.SCHED_IDLE}
    assert after["Knowhere_Search"] == {os.SCHED_OTHER}
    assert after["python"] == before["python"] == {os.SCHED_OTHER}  # the main thread
    assert idle_build_threads(child.pid) == []  # already there: nothing moved again


def test_a_process_that_is_gone_ends_the_watch(child: subprocess.Popen[str]) -> None:
    pid = child.pid
    child.kill()
    child.wait()
    with pytest.raises(ProcessLookupError):
        idle_build_threads(pid)
    assert main(["--pid", str(pid), "--interval", "0.05"]) == 0
