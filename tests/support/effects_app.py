"""A worker application for the exactly-once tests: ``conveyor worker effects_app:worker``.

Each ``effect`` task does one effect (a row in the ``effects`` table of the database named
by ``CONVEYOR_TEST_EFFECTS_DSN``) guarded by the ledger its payload names, and kills its
own process with SIGKILL at the point its payload names, once per task (a file
``kill-<task id>`` in ``CONVEYOR_TEST_KILL_DIR`` says it happened and where; a retry does
not kill again). The guarded sections run one at a time in
the process, so a kill lands at the chosen point of one task while the others are before
or after their sections: never between another task's effect and its record, the one gap
the coordinator's ledger does not close (its docs say so).

Run as a script (``python effects_app.py CONTROL_DIR``) it is a fork server: it imports
everything once, then for each file ``go-N`` that appears in CONTROL_DIR forks a worker
process, waits for it and writes its exit status (negative: the signal) to ``exit-N``.
So a test restarts a killed worker in milliseconds, not in the seconds an import of
gRPC and asyncpg takes on a busy machine; every life is still a process of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from conveyor.worker import TaskContext, Worker, pg_ledger

worker = Worker(
    os.environ.get("CONVEYOR_COORDINATOR", "127.0.0.1:50051"),
    queues=["effects"],
    concurrency=int(os.environ.get("CONVEYOR_TEST_CONCURRENCY", "20")),
    worker_id=os.environ.get("CONVEYOR_TEST_WORKER_ID") or None,
    grace_period=1.0,
)

_DSN = os.environ.get("CONVEYOR_TEST_EFFECTS_DSN", "")
# One guarded section at a time (see the module docstring).
_section = asyncio.Lock()


def _kill_here(ctx: TaskContext, point: str, wanted: str) -> None:
    """SIGKILLs this process if ``point`` is the task's kill point and it was not killed
    there yet (the mark is made first, outside the effect's transaction, so the retry
    knows)."""
    if point != wanted:
        return
    mark = Path(os.environ["CONVEYOR_TEST_KILL_DIR"]) / f"kill-{ctx.task_id}"
    try:
        fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, point.encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


async def _do_effect(conn: asyncpg.Connection, ctx: TaskContext) -> None:
    await conn.execute(
        "INSERT INTO effects (task_id, attempt, fencing_token) VALUES ($1, $2, $3)",
        ctx.task_id,
        ctx.attempt,
        ctx.fencing_token,
    )


@worker.task("effect")
async def effect(ctx: TaskContext, payload: dict[str, Any]) -> str:
    point = payload["kill"]
    conn = await asyncpg.connect(_DSN)
    try:
        async with _section:
            _kill_here(ctx, point, "before_effect")
            if payload["ledger"] == "postgres":
                async with conn.transaction():
                    if await pg_ledger.is_processed(conn, ctx, "effect"):
                        return "skipped"
                    await _do_effect(conn, ctx)
                    _kill_here(ctx, point, "in_transaction")
                    await pg_ledger.mark_processed(conn, ctx, "effect")
            else:
                if await ctx.ledger.get("effect") is not None:
                    return "skipped"
                await _do_effect(conn, ctx)
                await ctx.ledger.record("effect", {"attempt": ctx.attempt})
            _kill_here(ctx, point, "after_record")
        return "done"
    finally:
        await conn.close()


def _serve_forks(control: Path) -> None:
    life = 0
    while True:
        go = control / f"go-{life}"
        while not go.exists():
            if (control / "stop").exists():
                return
            time.sleep(0.01)
        pid = os.fork()
        if pid == 0:  # the worker process
            try:
                worker.run_sync()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        # Written aside and renamed: the test polls for the file and must never read it
        # created but not yet written (an empty status).
        written = control / f".exit-{life}"
        written.write_text(str(os.waitstatus_to_exitcode(status)))
        written.replace(control / f"exit-{life}")
        life += 1


if __name__ == "__main__":
    _serve_forks(Path(sys.argv[1]))
