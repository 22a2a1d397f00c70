"""The Conveyor worker SDK: run Python functions as handlers of Conveyor tasks.

::

    from conveyor.worker import NonRetryableError, TaskContext, Worker

    worker = Worker("127.0.0.1:50051", queues=["default"], concurrency=10)

    @worker.task("send-email")
    async def send_email(ctx: TaskContext, payload: dict) -> dict:
        if "to" not in payload:
            raise NonRetryableError("payload has no 'to'")
        ...
        return {"sent": True}

    if __name__ == "__main__":
        worker.run_sync()  # or: conveyor worker myapp.tasks:worker

All logging goes to the ``conveyor.worker`` logger.
"""

from conveyor.client._locks import Lock
from conveyor.transport._encryption import (
    Binding,
    DecryptionError,
    EncryptionCodec,
    EncryptionError,
    KeyedCodec,
    KeyRing,
    KeyRingError,
    KeyUnavailableError,
    PayloadCodec,
)
from conveyor.transport._errors import LeaseNotHeldError, LockNotHeldError, WorkerIdInUseError
from conveyor.transport._options import ConnectionOptions
from conveyor.transport._tls import TLSConfigError, tls_credentials
from conveyor.worker._context import CancellationSignal, TaskContext
from conveyor.worker._effects import Ledger, LedgerEntry, fencing_token
from conveyor.worker._errors import NoHandlersError, NonRetryableError, WorkerLoadError
from conveyor.worker._loader import load_worker
from conveyor.worker._worker import Worker

__all__ = [
    "Binding",
    "CancellationSignal",
    "ConnectionOptions",
    "DecryptionError",
    "EncryptionCodec",
    "EncryptionError",
    "KeyRing",
    "KeyRingError",
    "KeyUnavailableError",
    "KeyedCodec",
    "LeaseNotHeldError",
    "Ledger",
    "LedgerEntry",
    "Lock",
    "LockNotHeldError",
    "NoHandlersError",
    "NonRetryableError",
    "PayloadCodec",
    "TLSConfigError",
    "TaskContext",
    "Worker",
    "WorkerIdInUseError",
    "WorkerLoadError",
    "fencing_token",
    "load_worker",
    "tls_credentials",
]
