"""The arithmetic of ``conveyor bench``'s CPU per task, and its reading of real processes."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from conveyor.bench import cpu


def test_per_task_is_the_difference_per_group_over_the_tasks() -> None:
    before = {"coordinator": {10: 1.0}, "workers": {20: 0.5, 21: 0.5}, "client": {30: 2.0}}
    after = {"coordinator": {10: 1.7}, "workers": {20: 0.7, 21: 0.8}, "client": {30: 2.25}}
    figures = cpu.per_task_us(before, after, tasks=10_000)
    assert figures == {"coordinator": 70.0, "workers": 50.0, "client": 25.0, "total": 145.0}


def test_a_process_started_within_the_phase_counts_whole() -> None:
    before = {"postgres": {1: 5.0}}
    after = {"postgres": {1: 5.5, 2: 0.25}}  # pid 2: a backend opened mid-phase
    assert cpu.per_task_us(before, after, tasks=1000)["postgres"] == 750.0


def test_a_process_gone_counts_nothing_and_a_reused_pid_never_subtracts() -> None:
    before = {"postgres": {1: 5.0, 2: 3.0, 3: 9.0}}
    after = {"postgres": {1: 6.0, 3: 0.5}}  # 2 exited; 3 is a new process with an old pid
    assert cpu.per_task_us(before, after, tasks=1000)["postgres"] == 1000.0


def test_no_tasks_is_refused() -> None:
    with pytest.raises(ValueError, match="tasks"):
        cpu.per_task_us({}, {}, tasks=0)


def test_sample_reads_this_process_and_skips_one_that_exited() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    exited = psutil.Process(child.pid)
    child.wait()
    sum(i * i for i in range(200_000))  # some CPU, so the reading is above zero
    taken = cpu.sample({"client": [psutil.Process(), exited]})
    assert list(taken["client"]) == [os.getpid()]
    assert taken["client"][os.getpid()] > 0


def test_rss_and_the_postmaster_of_processes_that_are_not_postgres() -> None:
    assert cpu.rss_mb(os.getpid()) > 1
    assert cpu.postmaster_of(os.getpid()) is None, "python is not a PostgreSQL backend"
    assert cpu.with_children(2**22 + 12345) == [], "no such process"
