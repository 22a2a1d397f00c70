"""CPU time and memory of the benchmark's processes, read with psutil.

``conveyor bench`` samples the user+system CPU seconds of every process it runs (and of
the PostgreSQL server with all its backends) before and after the end-to-end phase, and
divides the difference by the tasks run: CPU per task, by process group. The arithmetic
is here, apart from the sampling, so that it can be tested without processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import psutil

Sample = dict[str, dict[int, float]]
"""CPU seconds (user + system) of each process, by pid, by group."""

GROUPS = ("coordinator", "workers", "client", "postgres")
"""The groups ``conveyor bench`` reports, in its order."""


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of one process (all its threads), its children excluded."""
    times = proc.cpu_times()
    return float(times.user + times.system)


def with_children(pid: int) -> list[psutil.Process]:
    """The process and its descendants; nothing if it has exited."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def sample(groups: Mapping[str, Iterable[psutil.Process]]) -> Sample:
    """Reads each process's CPU seconds now; processes gone meanwhile are left out."""
    out: Sample = {}
    for name, procs in groups.items():
        seen: dict[int, float] = {}
        for proc in procs:
            try:
                seen[proc.pid] = cpu_seconds(proc)
            except psutil.Error:
                continue
        out[name] = seen
    return out


def per_task_us(before: Sample, after: Sample, tasks: int) -> dict[str, float]:
    """Microseconds of CPU per task for each group, and ``total``, between two samples.

    A process found only in ``after`` started within the interval, so all its CPU counts
    (a PostgreSQL backend opened mid-phase). One found only in ``before`` has exited and
    its last interval is lost: nothing counts for it (the benchmark's processes live
    through the phase; a short-lived backend is the only case, and a small one)."""
    if tasks <= 0:
        raise ValueError("tasks must be positive")
    figures: dict[str, float] = {}
    total = 0.0
    for name, now in after.items():
        then = before.get(name, {})
        # max(0, …): a pid reused by a new process would otherwise subtract.
        spent = sum(max(0.0, seconds - then.get(pid, 0.0)) for pid, seconds in now.items())
        total += spent
        figures[name] = round(spent / tasks * 1e6, 1)
    figures["total"] = round(total / tasks * 1e6, 1)
    return figures


@dataclass
class ProcessGroups:
    """The pids of ``conveyor bench``'s process groups, resolved afresh at each sample
    (PostgreSQL's backends come and go)."""

    coordinator: int
    workers: list[int] = field(default_factory=list)
    client: int = field(default_factory=os.getpid)
    postmaster: int | None = None
    """The PostgreSQL server's main process when it runs on this machine, else None (its
    CPU is then not measured, and ``postgres`` is left out)."""

    def resolve(self) -> dict[str, list[psutil.Process]]:
        groups = {
            "coordinator": with_children(self.coordinator),
            "workers": [p for pid in self.workers for p in with_children(pid)],
            # The client alone: the embedded PostgreSQL may have been started from it.
            "client": [psutil.Process(self.client)],
        }
        if self.postmaster is not None:
            groups["postgres"] = with_children(self.postmaster)
        return groups


def postmaster_of(backend_pid: int) -> int | None:
    """The PostgreSQL server process whose backend has this pid, if it is on this machine.

    A backend's parent is the postmaster. A remote server's backend pid may happen to
    name some local process, so the process must also be called postgres."""
    try:
        backend = psutil.Process(backend_pid)
        parent = backend.parent()
        if parent is None or "postgres" not in " ".join(backend.cmdline() or [backend.name()]):
            return None
        return parent.pid
    except psutil.Error:
        return None


def rss_mb(pid: int) -> float:
    """Resident memory of one process, in MiB."""
    return round(psutil.Process(pid).memory_info().rss / (1024 * 1024), 1)
