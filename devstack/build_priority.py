"""Milvus's index builds at idle CPU priority, so that searches keep the CPU while it builds.

Milvus 2.3.5 (its knowhere engine) builds indexes in threads named ``Knowhere_Build<N>`` and
runs searches in threads named ``Knowhere_Search``, both at nice 19. While it builds, which on a
growing collection is most of the time (each sealed segment, then again after compaction; for
minutes after a bulk write), a search's threads get only their equal share of contested CPU,
and searches' tail grows. Lowering the searches' nice value would need ``CAP_SYS_NICE``; putting
one's own threads into ``SCHED_IDLE`` needs nothing. So this watcher, started by the local
stack beside its server (:meth:`devstack.milvus.MilvusService.start`), moves each build thread
into ``SCHED_IDLE`` as it appears: a build then uses only the CPU that nothing else wants, and
still all of it when nothing else does. Measured (docs/PERFORMANCE.md, "On a quiet machine, and
index builds at idle CPU priority"): in the minutes after a 100,000-vector bulk write on a quiet
2-core machine, the searches' p99 was 31-37 % lower in two of three same-run pairs and the same
within the noise in the third; the builds take longer while searches run.

Run as ``python -m devstack.build_priority --pid PID``; it ends by itself when the server ends.
Linux only (``SCHED_IDLE``); elsewhere it logs that and ends.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["BUILD_THREAD_PREFIX", "idle_build_threads", "main"]

# knowhere's name for its index-build pool threads (Knowhere_Build0, Knowhere_Build1, ...).
BUILD_THREAD_PREFIX = "Knowhere_Build"
# The pool's threads start with the first build after a start, and a new server makes new ones.
_INTERVAL_S = 1.0


def idle_build_threads(pid: int) -> list[int]:
    """Put every index-build thread of process ``pid`` that is not yet there into ``SCHED_IDLE``.

    Returns:
        The thread ids moved now (threads that ended meanwhile are skipped).

    Raises:
        ProcessLookupError: process ``pid`` is gone.
    """
    try:
        tids = [int(name) for name in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    moved: list[int] = []
    for tid in tids:
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            if not name.startswith(BUILD_THREAD_PREFIX):
                continue
            if os.sched_getscheduler(tid) != os.SCHED_IDLE:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                moved.append(tid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between the listing and now
    return moved


def main(argv: Sequence[str] | None = None) -> int:
    """Watch process ``--pid`` until it ends; exit 0 then (1 where SCHED_IDLE does not exist)."""
    parser = argparse.ArgumentParser(prog="python -m devstack.build_priority")
    parser.add_argument("--pid", type=int, required=True, help="the Milvus server's pid")
    parser.add_argument("--interval", type=float, default=_INTERVAL_S)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not hasattr(os, "SCHED_IDLE"):
        logger.warning("this platform has no SCHED_IDLE: Milvus's builds keep their priority")
        return 1
    logger.info("moving the index-build threads of milvus pid %d to SCHED_IDLE", args.pid)
    while True:
        try:
            moved = idle_build_threads(args.pid)
        except ProcessLookupError:
            logger.info("milvus pid %d ended", args.pid)
            return 0
        except PermissionError as exc:  # another user's server: nothing this process may do
            logger.warning("cannot change milvus pid %d's threads (%s); stopping", args.pid, exc)
            return 1
        if moved:
            logger.info("index-build threads %s now at idle priority", moved)
        time.sleep(args.interval)


if __name__ == "__main__":
    raise SystemExit(main())
