"""Micro-benchmark: what end-to-end payload encryption costs per task, in the client and
in the worker (the coordinator does none of it).

    .venv/bin/python tests/support/encryption_microbench.py [--sizes 100,1024,65536]

Per payload size it times, in microseconds per task:

- client, submit: ``seal_request`` on a SubmitTaskRequest (random nonce; and with an
  idempotency key, the HMAC-derived nonce);
- worker: opening the payload and sealing a result of the same size, what
  ``Runtime`` adds to one attempt;
- client, read: ``open_task`` on a finished task (payload and result);

and the bytes an envelope adds. A script, not a timed test: timings on a shared machine
are not assertions.
"""

from __future__ import annotations

import argparse
import os
import timeit
from collections.abc import Callable

from conveyor.client._encryption import open_task, seal_request
from conveyor.client._models import Task, TaskState
from conveyor.transport._encryption import Binding, EncryptionCodec, KeyRing
from conveyor.v1 import task_service_pb2 as pb


def measure(codec: EncryptionCodec, size: int, number: int) -> dict[str, float]:
    data = os.urandom(size)

    def submit(key: str) -> None:
        seal_request(
            codec,
            pb.SubmitTaskRequest(type="t", payload=data, idempotency_key=key, request_id="id-1"),
        )

    sealed = pb.SubmitTaskRequest(
        type="t", payload=data, content_type="application/json", request_id="id-1"
    )
    seal_request(codec, sealed)
    result, _ = codec.encode(data, "application/json", Binding.result("t", "id-1"))
    task = Task(
        id="id-1",
        state=TaskState.SUCCEEDED,
        queue="default",
        type="t",
        payload=sealed.payload,
        content_type=sealed.content_type,
        result=result,
    )

    def worker() -> None:
        codec.decode(sealed.payload, sealed.content_type, Binding.payload("t", task_id="id-1"))
        codec.encode(data, "application/json", Binding.result("t", "id-1"))

    def per_task(fn: Callable[[], object]) -> float:
        return timeit.timeit(fn, number=number) / number * 1e6

    return {
        "submit": per_task(lambda: submit("")),
        "submit_keyed": per_task(lambda: submit("order-1")),
        "worker": per_task(worker),
        "read": per_task(lambda: open_task(codec, task)),
        "overhead_bytes": len(sealed.payload) - size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1024,16384,262144,1048576")
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    args = parser.parse_args()
    codec = EncryptionCodec(KeyRing.generate("k20260101-abcdef01"))
    print(f"{'payload':>9}  {'submit':>8}  {'keyed':>8}  {'worker':>8}  {'read':>8}  overhead")
    for size in (int(s) for s in args.sizes.split(",")):
        # Aim for about --seconds per measurement whatever the size.
        number = max(20, int(args.seconds / (2e-6 + size / 1.5e9)))
        row = measure(codec, size, number)
        print(
            f"{size:>8}B  {row['submit']:>6.1f}us  {row['submit_keyed']:>6.1f}us  "
            f"{row['worker']:>6.1f}us  {row['read']:>6.1f}us  {row['overhead_bytes']:.0f} B"
        )


if __name__ == "__main__":
    main()
