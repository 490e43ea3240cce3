"""A process's threads as Linux shows them: name (``/proc/<pid>/task/<tid>/comm``) and policy."""

from __future__ import annotations

import os
from pathlib import Path


def thread_policies(pid: int) -> dict[str, set[int]]:
    """Thread name -> the scheduling policies (``os.SCHED_*``) its threads of ``pid`` run under;
    threads that end meanwhile are left out."""
    found: dict[str, set[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            found.setdefault(name, set()).add(os.sched_getscheduler(int(task.name)))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found
