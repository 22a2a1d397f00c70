"""The public :class:`Worker`: registration, run, graceful drain and signals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import grpc
from opentelemetry import trace

from conveyor.observability import logs
from conveyor.observability.metrics import parse_listen
from conveyor.observability.tracing import SERVICE_WORKER, Tracing
from conveyor.transport import ConnectionOptions, parse_addresses
from conveyor.transport._encryption import PayloadCodec
from conveyor.transport._gc import freeze_startup_heap
from conveyor.transport._options import WORKER_CONNECT_TIMEOUT
from conveyor.worker._connection import Connector
from conveyor.worker._effects import HandlerCalls
from conveyor.worker._errors import NoHandlersError
from conveyor.worker._registry import TaskRegistry
from conveyor.worker._runtime import SHUTDOWN_ERROR, Runtime
from conveyor.worker._session import HelloInfo

if TYPE_CHECKING:
    from conveyor.observability.metrics import MetricsServer, WorkerProcessState

__all__ = ["Worker"]

logger = logging.getLogger("conveyor.worker")

F = TypeVar("F", bound=Callable[..., Any])

#: After the in-flight work is done (or stopped), how long to wait for the coordinator to
#: acknowledge the last results before giving up on them (their tasks then come back
#: when their leases expire).
RESULT_ACK_TIMEOUT = 5.0
#: How long the final half-close may take before the stream is cut.
CLOSE_TIMEOUT = 2.0
#: How long stopped async handlers get to unwind at the very end.
HANDLER_EXIT_TIMEOUT = 1.0

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def _bounded(awaitable: Awaitable[None], seconds: float) -> bool:
    """Await ``awaitable`` for at most ``seconds``; whether it finished in time."""
    try:
        async with asyncio.timeout(seconds):
            await awaitable
    except TimeoutError:
        return False
    return True


def default_worker_id() -> str:
    """``hostname-pid-random``: unique per process, and readable in ``conveyor status``.

    The random part keeps two processes apart even where pids repeat (containers that
    all run as pid 1 on hosts with the same name).
    """
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _configure_logging() -> None:
    """Log to stderr the way ``conveyor worker`` does, unless the application set logging
    up itself (the root logger has handlers)."""
    if not logging.getLogger().handlers:
        logs.configure(os.environ.get("CONVEYOR_LOG_LEVEL", "info"))


def _process_tracing(worker_id: str) -> Tracing:
    """Tracing for a worker's own process (run_sync, ``conveyor worker``): from the
    ``OTEL_*`` environment, as the global provider, unless the application set one up
    (then it is the application's to run and to shut down)."""
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return Tracing.disabled()
    return Tracing.from_env(SERVICE_WORKER, instance_id=worker_id, set_global=True)


class Worker:
    """A Conveyor worker process: handlers for task types, run against a coordinator.

    Register handlers with :meth:`task`, then run the worker with ``await worker.run()``,
    ``worker.run_sync()`` or ``async with worker: ...``::

        worker = Worker("127.0.0.1:50051", queues=["emails"], concurrency=20)

        @worker.task("send-email")
        async def send_email(ctx: TaskContext, payload: dict) -> dict:
            ...
            return {"sent": True}

        worker.run_sync()

    The worker holds one stream to the leader coordinator, takes at most ``concurrency``
    tasks at a time, renews their leases, reports results, reconnects (cycling through
    ``coordinators``) when the stream breaks while handlers keep running, and drains
    gracefully on :meth:`shutdown`, SIGTERM or SIGINT.

    Args:
        coordinators: Coordinator address(es) as ``host:port``: a sequence, or one string
            (comma-separated for several). Any replica will do; followers redirect to the
            leader.
        queues: The queues to take work from.
        concurrency: How many attempts may run at once (the credit the worker grants).
        worker_id: This worker's id, stable across reconnects. It must be unique among
            live worker processes: the coordinator refuses a second process with the same
            id (:class:`WorkerIdInUseError`, which stops the worker). The default,
            ``hostname-pid-random``, is unique per process.
        grace_period: On shutdown (SIGTERM, SIGINT, :meth:`shutdown`), seconds that
            running handlers get to finish. The rule: when it runs out, the handlers still
            running are cancelled and reported INTERRUPTED; the coordinator makes those
            tasks ready again at once, and the interrupted attempt does not count against
            ``max_attempts``. ``0`` interrupts them at once.
        sync_threads: Threads for sync handlers; defaults to ``concurrency``.
        credentials: gRPC channel credentials for TLS; plaintext when ``None`` (a shortcut
            for ``options=ConnectionOptions(credentials=...)``).
        metadata: gRPC metadata sent when opening the stream.
        api_key: Sent as ``authorization: Bearer <api_key>`` when opening the stream.
        options: Transport settings shared with the client: TLS, metadata, message
            limits, keepalive, client interceptors.
        metrics_listen: ``host:port`` to serve this process's Prometheus metrics on
            (``/metrics``; port 0 picks a free one, see :attr:`metrics_url`): handler runs
            by outcome and their duration, slots in use, connection state, reconnects.
            ``None`` (the default): no endpoint, and nothing is recorded.
        tracer_provider: The OpenTelemetry tracer provider for the ``execute`` span of
            each attempt (a child of the task's trace); by default the process's global
            one once the application sets one up, and no spans (at no cost) until then.
            :meth:`run_sync` and ``conveyor worker`` set up a global one from the
            ``OTEL_EXPORTER_OTLP_ENDPOINT`` environment when the application has none.
        codec: Decodes every payload before its handler sees it and encodes every
            result, such as ``EncryptionCodec.from_key_file("keys.json")`` for end-to-end
            encryption (the clients need the same keys). The worker names the keys it
            holds to the coordinator (none without a codec), which gives it only tasks
            it can open; a task sealed with a key it lacks after all (a key file
            rewritten without it) goes back, not counted, for a worker that holds it. A
            payload that does not open with the key it names (altered, or sealed for
            another task) fails its task for good, with the reason.
    """

    def __init__(
        self,
        coordinators: str | Sequence[str] = "127.0.0.1:50051",
        *,
        queues: str | Sequence[str] = ("default",),
        concurrency: int = 10,
        worker_id: str | None = None,
        grace_period: float = 30.0,
        sync_threads: int | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        api_key: str | None = None,
        options: ConnectionOptions | None = None,
        metrics_listen: str | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        codec: PayloadCodec | None = None,
    ) -> None:
        self._addresses: list[str] = []
        self._metrics_listen: str | None = None
        self._tracer_provider = tracer_provider
        self._metrics_server: MetricsServer | None = None
        self._queues: tuple[str, ...] = ()
        self._concurrency = 1
        self._worker_id = default_worker_id()
        # The default id names the process that made it; a Worker made before a fork
        # (a pre-forking server importing the app) gets a fresh one in each child.
        self._default_id_pid: int | None = os.getpid()
        self._grace_period = 0.0
        self._sync_threads: int | None = None
        self._options = ConnectionOptions.merge(
            options, api_key=api_key, credentials=credentials, metadata=metadata
        )
        if self._options.connect_timeout is None:  # a fleet reconnecting at once needs it
            self._options = dataclasses.replace(
                self._options, connect_timeout=WORKER_CONNECT_TIMEOUT
            )
        self._registry = TaskRegistry()
        self._codec = codec
        # Set for the duration of one run.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runtime: Runtime | None = None
        self._connector: Connector | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop_requested: asyncio.Event | None = None
        self._force: asyncio.Event | None = None
        self._signals_installed: list[signal.Signals] = []
        self._context_task: asyncio.Task[None] | None = None
        self._calls: HandlerCalls | None = None
        # Created lazily, by run() or by an early wait_connected(), so that it belongs to
        # the loop the worker runs on; dropped when the run ends.
        self._connected: asyncio.Event | None = None
        self.configure(
            coordinators=coordinators,
            queues=queues,
            concurrency=concurrency,
            worker_id=worker_id,
            grace_period=grace_period,
            sync_threads=sync_threads,
            metrics_listen=metrics_listen,
        )

    # -- configuration -------------------------------------------------------------------

    def configure(
        self,
        *,
        coordinators: str | Sequence[str] | None = None,
        queues: str | Sequence[str] | None = None,
        concurrency: int | None = None,
        worker_id: str | None = None,
        grace_period: float | None = None,
        sync_threads: int | None = None,
        metrics_listen: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        codec: PayloadCodec | None = None,
        api_key: str | None = None,
    ) -> Self:
        """Change settings before the worker runs; ``None`` keeps a setting as it is.

        ``credentials`` replaces the TLS credentials the worker was made with, ``codec``
        its payload codec, ``api_key`` its API key.

        Meant for ``conveyor worker MODULE`` to apply its command-line flags to a worker
        loaded with :func:`load_worker`. Validates everything before changing anything.

        Raises:
            ValueError: A setting is invalid.
            RuntimeError: The worker is running.
        """
        if self._loop is not None:
            raise RuntimeError("cannot configure a running worker")
        addresses = self._addresses if coordinators is None else parse_addresses(coordinators)
        queue_tuple = self._queues
        if queues is not None:
            queue_tuple = (queues,) if isinstance(queues, str) else tuple(queues)
            if not queue_tuple or not all(isinstance(q, str) and q for q in queue_tuple):
                raise ValueError(f"queues must be non-empty strings, got {queues!r}")
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if grace_period is not None and grace_period < 0:
            raise ValueError(f"grace_period must not be negative, got {grace_period}")
        if sync_threads is not None and sync_threads < 1:
            raise ValueError(f"sync_threads must be at least 1, got {sync_threads}")
        if worker_id is not None and (not worker_id.strip() or "\x00" in worker_id):
            raise ValueError(f"worker_id must be a non-empty string without NUL, got {worker_id!r}")
        if metrics_listen:
            parse_listen(metrics_listen)  # raises ValueError naming what is wrong
        options = self._options
        if api_key is not None:
            options = dataclasses.replace(options, api_key=api_key)  # validates it
        if credentials is not None:
            options = dataclasses.replace(options, credentials=credentials)
        self._options = options
        self._addresses = addresses
        self._queues = queue_tuple
        self._concurrency = self._concurrency if concurrency is None else concurrency
        if worker_id is not None:
            self._worker_id = worker_id
            self._default_id_pid = None
        self._grace_period = self._grace_period if grace_period is None else grace_period
        self._sync_threads = self._sync_threads if sync_threads is None else sync_threads
        if metrics_listen is not None:
            self._metrics_listen = metrics_listen or None
        if codec is not None:
            self._codec = codec
        return self

    @property
    def worker_id(self) -> str:
        """The id this worker registers with (stable across reconnects)."""
        return self._worker_id

    @property
    def coordinators(self) -> tuple[str, ...]:
        """The coordinator addresses, in the order they are tried."""
        return tuple(self._addresses)

    @property
    def queues(self) -> tuple[str, ...]:
        """The queues this worker takes work from."""
        return self._queues

    @property
    def concurrency(self) -> int:
        """How many attempts may run at once."""
        return self._concurrency

    @property
    def grace_period(self) -> float:
        """Seconds running handlers get to finish on shutdown."""
        return self._grace_period

    @property
    def task_types(self) -> tuple[str, ...]:
        """The task types with a registered handler."""
        return tuple(self._registry.types())

    @property
    def running(self) -> bool:
        """Whether :meth:`run` is in progress."""
        return self._loop is not None

    @property
    def metrics_listen(self) -> str | None:
        """Where metrics are to be served (``None``: not at all)."""
        return self._metrics_listen

    @property
    def metrics_url(self) -> str:
        """The URL of the running worker's metrics endpoint ("" when there is none)."""
        return self._metrics_server.url if self._metrics_server is not None else ""

    def task(self, task_type: str, *, raw: bool = False) -> Callable[[F], F]:
        """Register the decorated function as the handler of ``task_type``.

        The handler is called as ``handler(ctx, payload)`` with a :class:`TaskContext`.
        ``async def`` handlers run on the event loop; plain functions run in a thread pool
        (they must not touch the loop, and should poll ``ctx.is_cancelled()`` if long).
        An ``async def`` handler runs in its own asyncio task, except one without any
        ``await``, ``async for`` or ``async with``: that one cannot suspend, so it runs to
        its end as its attempt starts, outside any task (``asyncio.current_task()`` is
        ``None`` in it), in a copy of the context as a task would.

        With ``raw=False`` (the default) the payload is decoded from JSON (an empty
        payload gives ``None``) and the return value is JSON-encoded as the result. With
        ``raw=True`` the handler receives the payload bytes and returns bytes (or
        ``None`` for an empty result).

        Raise :class:`NonRetryableError` to fail the task for good; any other exception
        fails the attempt and the task is retried (while attempts remain).

        The function is returned unchanged, so it can still be called directly.
        """

        def decorator(func: F) -> F:
            self._registry.register(task_type, func, raw=raw)
            return func

        return decorator

    def register(self, task_type: str, func: Callable[..., Any], *, raw: bool = False) -> None:
        """Register ``func`` as the handler of ``task_type``; see :meth:`task`."""
        self._registry.register(task_type, func, raw=raw)

    # -- running -------------------------------------------------------------------------

    async def run(self, *, install_signal_handlers: bool | None = None) -> None:
        """Run until :meth:`shutdown` (or SIGTERM/SIGINT), then drain and return.

        Args:
            install_signal_handlers: Handle SIGTERM and SIGINT: the first one drains
                gracefully, a second one stops at once. Defaults to ``True`` when called
                on the main thread (signal handlers can only be installed there).

        Raises:
            NoHandlersError: No task handler is registered (nothing could run).
            WorkerIdInUseError: The coordinator refused the worker id: another live worker
                process uses it.
            UnauthenticatedError: The API key is missing, malformed, expired or revoked
                (also while the worker runs), or the coordinator still does not know it
                after a minute (a new key reaches every coordinator within seconds).
            PermissionDeniedError: The API key lacks the worker scope.
            RuntimeError: The worker is already running.
        """
        self._start(install_signal_handlers)
        await self._serve()

    def run_sync(self, *, install_signal_handlers: bool | None = None) -> None:
        """Run the worker in a new event loop (:func:`asyncio.run`) until it is done.

        Sets logging up as ``conveyor worker`` does (INFO, or ``CONVEYOR_LOG_LEVEL``, to
        stderr) unless the application configured logging itself; likewise tracing, when
        ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and the application has no tracer provider
        of its own (the spans still buffered are exported before it returns).
        """
        _configure_logging()
        tracing = _process_tracing(self._worker_id)
        # The process is the worker's: what it imported and set up lives as long as it
        # does, and full collections need not walk it again (``transport/_gc.py``).
        freeze_startup_heap()
        try:
            asyncio.run(self.run(install_signal_handlers=install_signal_handlers))
        finally:
            tracing.shutdown()

    def shutdown(self, *, force: bool = False) -> None:
        """Ask the running worker to drain and stop; returns at once.

        The worker sends Drain to the coordinator, takes no new work, gives running
        handlers up to ``grace_period`` to finish, cancels the rest (reported INTERRUPTED:
        their tasks are ready again at once, without using an attempt), waits briefly for
        its last results to be acknowledged, and then :meth:`run` returns. ``force=True``
        skips the waiting: handlers are interrupted at once. Safe to call from any
        thread, and a no-op when the worker is not running.
        """
        loop = self._loop
        if loop is None:
            return
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            self._request_stop(force)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._request_stop, force)

    async def wait_connected(self) -> None:
        """Wait until the worker has a live session with a coordinator.

        May be called before :meth:`run` has started (for example right after
        ``asyncio.create_task(worker.run())``); bound it with ``asyncio.timeout``.
        """
        if self._connected is None:
            self._connected = asyncio.Event()
        await self._connected.wait()

    async def __aenter__(self) -> Self:
        """Start the worker in the background; leaving the block drains and stops it."""
        self._start(install_signal_handlers=False)
        self._context_task = asyncio.get_running_loop().create_task(
            self._serve(), name="conveyor-worker"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Drain and stop the worker started by ``async with``."""
        task, self._context_task = self._context_task, None
        if task is None:
            return
        self.shutdown()
        await task

    # -- internals -------------------------------------------------------------------

    def _start(self, install_signal_handlers: bool | None) -> None:
        if self._loop is not None:
            raise RuntimeError("the worker is already running")
        loop = asyncio.get_running_loop()
        if self._default_id_pid is not None and self._default_id_pid != os.getpid():
            self._worker_id = default_worker_id()
            self._default_id_pid = os.getpid()
        if not len(self._registry):
            # It could take no task, and an empty list of types would read as "anything".
            raise NoHandlersError(
                f"worker {self._worker_id} has no task handlers: register at least one with "
                f"@worker.task('TYPE') before starting it"
            )
        metrics = None
        if self._metrics_listen:
            from conveyor.observability.metrics import MetricsServer, WorkerMetrics

            metrics = WorkerMetrics()
            server = MetricsServer(metrics.registry, self._metrics_listen)
            server.start()  # first: a port in use fails before anything else starts
            self._metrics_server = server
            logger.info("serving metrics on %s", server.url)
        tracing = (
            Tracing(self._tracer_provider)
            if self._tracer_provider is not None
            else Tracing.from_global()
        )
        self._registry.freeze()
        self._loop = loop
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._sync_threads or self._concurrency,
            thread_name_prefix="conveyor-worker",
        )
        self._stop_requested = asyncio.Event()
        self._force = asyncio.Event()
        # Looked up now that the addresses are final (configure may change them): the key
        # of a local conveyor dev on one of them, when none was given. The stream and the
        # handlers' calls (ledger, locks) use the same key.
        options = ConnectionOptions.merge(self._options, addresses=self._addresses)
        self._calls = HandlerCalls(self._addresses, options)
        self._runtime = Runtime(
            self._registry,
            concurrency=self._concurrency,
            executor=self._executor,
            worker_id=self._worker_id,
            metrics=metrics,
            tracing=tracing,
            codec=self._codec,
            calls=self._calls,
        )
        self._runtime.on_drain_requested = self._on_drain_requested
        if metrics is not None:
            metrics.watch_process(self._process_state, loop=loop)
        info = HelloInfo(
            worker_id=self._worker_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            queues=self._queues,
            task_types=tuple(self._registry.types()),
        )
        if self._connected is None:
            self._connected = asyncio.Event()
        self._connector = Connector(
            self._addresses,
            connected=self._connected,
            info=info,
            runtime=self._runtime,
            options=options,
            metrics=metrics,
        )
        if install_signal_handlers is None:
            install_signal_handlers = threading.current_thread() is threading.main_thread()
        if install_signal_handlers:
            for sig in _SIGNALS:
                try:
                    loop.add_signal_handler(sig, self._on_signal, sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    # No signal support on this loop or platform: shutdown() still works.
                    logger.debug("cannot install a handler for %s", sig.name)
                else:
                    self._signals_installed.append(sig)
        logger.info(
            "worker %s starting: queues %s, task types %s, concurrency %d, coordinators %s",
            self._worker_id,
            ",".join(self._queues),
            ",".join(info.task_types),
            self._concurrency,
            ",".join(self._addresses),
        )

    async def _serve(self) -> None:
        assert self._connector is not None and self._runtime is not None
        assert self._stop_requested is not None
        loop = asyncio.get_running_loop()
        connector, runtime = self._connector, self._runtime
        connection = loop.create_task(connector.run(), name="conveyor-connection")
        stop_wait = loop.create_task(self._stop_requested.wait())
        try:
            await asyncio.wait({connection, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if connection.done():
                error = connection.exception()
                if error is None:  # it only ends early on a fatal refusal, or a bug
                    raise RuntimeError("the connection loop ended unexpectedly")
                # A fatal refusal (the worker id is taken, the key cannot work): retrying
                # cannot help, so stop the running attempts (their leases expire) and
                # raise it to the caller, who reports it (conveyor worker: in one line).
                runtime.stop_all()
                raise error
            await self._drain(connector, runtime)
        except asyncio.CancelledError:
            # Cancelled from outside (e.g. Ctrl-C without our signal handlers): still
            # report the running attempts, so that their tasks come back quickly.
            runtime.stop_all()
            await _bounded(connector.close(), HANDLER_EXIT_TIMEOUT)
            raise
        finally:
            stop_wait.cancel()
            connection.cancel()
            await asyncio.gather(connection, stop_wait, return_exceptions=True)
            await _bounded(runtime.close(), HANDLER_EXIT_TIMEOUT)
            runtime.report_leftovers()
            calls, self._calls = self._calls, None
            if calls is not None:
                await _bounded(calls.close(), CLOSE_TIMEOUT)
            server, self._metrics_server = self._metrics_server, None
            if server is not None:
                await asyncio.to_thread(server.stop)
            self._teardown()
        logger.info("worker %s stopped", self._worker_id)

    async def _drain(self, connector: Connector, runtime: Runtime) -> None:
        logger.info(
            "worker %s draining: %d task(s) running, grace period %gs",
            self._worker_id,
            runtime.running_count(),
            self._grace_period,
        )
        connector.drain()
        if runtime.running_count():
            await _bounded(self._unless_forced(runtime.wait_idle()), self._grace_period)
        if runtime.running_count():
            logger.warning("stopping %d unfinished task(s)", runtime.running_count())
            runtime.stop_all(SHUTDOWN_ERROR)
        if runtime.pending_results():
            await _bounded(self._unless_forced(runtime.pending.wait_settled()), RESULT_ACK_TIMEOUT)
        if runtime.pending_results():
            logger.warning(
                "%d result(s) not acknowledged; their tasks will run again once their "
                "leases expire",
                runtime.pending_results(),
            )
        if not await _bounded(connector.close(), CLOSE_TIMEOUT):
            logger.warning("the stream did not close in time; cutting it")

    async def _unless_forced(self, awaitable: Awaitable[None]) -> None:
        """Wait for ``awaitable``, or until a forced stop is requested."""
        assert self._force is not None
        waiter = asyncio.ensure_future(awaitable)
        forced = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait({waiter, forced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            forced.cancel()
            await asyncio.gather(waiter, forced, return_exceptions=True)

    def _process_state(self) -> WorkerProcessState:
        """What the metrics endpoint reads at scrape time (on the worker's loop)."""
        from conveyor.observability.metrics import WorkerProcessState

        runtime, connected = self._runtime, self._connected
        if runtime is None:
            return WorkerProcessState(self._concurrency, 0, False)
        runtime.record_runs()
        return WorkerProcessState(
            self._concurrency, runtime.busy_slots(), connected is not None and connected.is_set()
        )

    def _request_stop(self, force: bool) -> None:
        if self._stop_requested is None or self._force is None:
            return
        if force:
            self._force.set()
        self._stop_requested.set()

    def _on_drain_requested(self, reason: str) -> None:
        """The coordinator asked this worker to drain (DrainWorker): as on SIGTERM, it
        finishes what it holds (within the grace period) and exits."""
        assert self._stop_requested is not None
        if not self._stop_requested.is_set():
            logger.info("the coordinator asked this worker to drain (%s): draining", reason)
            self._request_stop(force=False)

    def _on_signal(self, sig: signal.Signals) -> None:
        assert self._stop_requested is not None
        if not self._stop_requested.is_set():
            logger.info("received %s: draining (send it again to stop at once)", sig.name)
            self._request_stop(force=False)
        else:
            logger.warning("received %s again: stopping at once", sig.name)
            self._request_stop(force=True)

    def _teardown(self) -> None:
        loop = self._loop
        if loop is not None:
            for sig in self._signals_installed:
                loop.remove_signal_handler(sig)
        self._signals_installed = []
        if self._executor is not None:
            # Never wait here: a sync handler that ignores cancellation would hang the
            # shutdown; queued-but-unstarted calls are dropped.
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._registry.freeze(False)
        self._loop = None
        self._runtime = None
        self._connector = None
        self._executor = None
        self._stop_requested = None
        self._force = None
        self._connected = None
