"""Keeps one session open: reconnects with backoff, cycles addresses, follows redirects.

Addresses, redirects and backoff follow the shared rules of
:mod:`conveyor.transport._failover`. The worker's own rules:

* A failed attempt moves on at once to the next address (or to the leader a coordinator
  redirected to) until every address was tried once; only a whole round without a
  session backs off. A refused connection costs nothing, and during a failover the next
  address may well be the new leader.
* A round of redirects means a leader change is under way (the cluster answers): look
  again shortly, without growing the backoff.
* A fatal refusal ends the loop with that error: retrying cannot fix a misconfiguration
  (``WORKER_ID_IN_USE``, a key without the worker scope) or a key that is missing,
  malformed, expired or revoked (a revoked key stays revoked).
* A key the coordinator does not know may be a new one still on its way there: the
  worker retries for :data:`UNKNOWN_KEY_PATIENCE`, saying so once, then stops the same
  way.
* Logs: one line per failed attempt, with the wait before the next one: "cannot reach the
  coordinator at X" when nothing answered there, "lost the stream" when an established
  session broke. WARNING for the first failure of an outage, INFO for the next ones; a
  refusal (a coordinator saying no) is an ERROR each time, since someone must act.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence

from conveyor.observability.metrics import WorkerMetrics
from conveyor.transport import AddressBook, Backoff, ConnectionOptions
from conveyor.worker._runtime import Runtime
from conveyor.worker._session import HelloInfo, Session, SessionEnd

__all__ = ["RECONNECT_BACKOFF", "UNKNOWN_KEY_PATIENCE", "Connector"]

logger = logging.getLogger("conveyor.worker")

#: Waits between rounds of failed attempts. Kept short: during a leader failover the
#: cluster is back within a few seconds, and a worker asleep in a long backoff would
#: stretch that outage for its tasks.
RECONNECT_BACKOFF = Backoff(initial=0.1, maximum=2.0)
#: The pause before looking again after a round of redirects (a leader being elected).
_ELECTION_PAUSE = (0.05, 0.15)
#: How long a worker whose API key the coordinator does not know keeps trying. A key just
#: created reaches every coordinator within a second (LISTEN/NOTIFY), or at the latest at
#: the coordinator's next full reload of the keys (every 30 s by default).
UNKNOWN_KEY_PATIENCE = 60.0


class Connector:
    """Runs sessions back to back until closed, keeping the runtime connected."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        connected: asyncio.Event,
        info: HelloInfo,
        runtime: Runtime,
        options: ConnectionOptions,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._book = AddressBook(addresses)
        self._metrics = metrics
        self._sessions_welcomed = 0
        self._info = info
        self._runtime = runtime
        self._options = options
        self._session: Session | None = None
        self._draining = False
        self._closing = False
        self._wakeup = asyncio.Event()
        # Set while a welcomed session is open.
        self.connected = connected

    @property
    def session(self) -> Session | None:
        """The current session, if any."""
        return self._session

    def drain(self) -> None:
        """Stop granting credit, on this session and every later one."""
        self._draining = True
        if self._session is not None:
            self._session.drain()

    async def close(self) -> None:
        """Start no other session, and let the current one end in order.

        Unbounded: the caller bounds it and then cancels the task running :meth:`run`.
        """
        self._closing = True
        self._wakeup.set()
        if self._session is not None:
            await self._session.close()

    async def run(self) -> None:
        """Connect, and reconnect whenever the stream ends, until :meth:`close`.

        Raises:
            WorkerIdInUseError: The coordinator refused this worker's id (another live
                process uses it).
            UnauthenticatedError: The API key is missing, malformed, expired or revoked,
                or still unknown after :data:`UNKNOWN_KEY_PATIENCE`.
            PermissionDeniedError: The API key lacks the worker scope.
        """
        failures = 0  # rounds through the addresses without a session
        tried = 0  # attempts in the current round
        answered = False  # some coordinator answered (redirected) in this round
        unknown_since: float | None = None  # refused for an unknown key since (loop time)
        loop = asyncio.get_running_loop()
        target = self._book.current
        while not self._closing:
            session = Session(
                target,
                info=self._info,
                runtime=self._runtime,
                draining=self._draining,
                options=self._options,
                on_welcome=self._welcomed,
            )
            self._session = session
            try:
                logger.debug("connecting to coordinator %s", target)
                end = await session.run()
            finally:
                self._session = None
                self.connected.clear()
            if end.fatal is not None:
                raise end.fatal
            if self._closing:
                return
            if end.welcomed:
                self._book.answered(target)
                failures = 0
                tried = 0
                unknown_since = None
            quiet = False
            if end.unknown_key is not None:
                if unknown_since is None:
                    unknown_since = loop.time()
                    logger.warning(
                        "coordinator %s does not know this worker's API key; a new key takes "
                        "a moment to reach every coordinator, so the worker tries again for "
                        "up to %gs",
                        target,
                        UNKNOWN_KEY_PATIENCE,
                    )
                elif loop.time() - unknown_since >= UNKNOWN_KEY_PATIENCE:
                    end.unknown_key._append(f"(still unknown after {UNKNOWN_KEY_PATIENCE:g}s)")
                    raise end.unknown_key
                quiet = True
            tried += 1
            round_over = tried >= len(self._book.addresses)
            if end.redirect is not None:
                logger.info(
                    "coordinator %s redirected to the leader at %s",
                    target,
                    end.redirect or "(unknown)",
                )
                next_target = self._book.redirect(end.redirect, from_address=target)
                answered = True
                delay = random.uniform(*_ELECTION_PAUSE) if round_over else 0.0
            else:
                next_target = self._book.next_after(target)
                if end.rejected or (round_over and not answered):
                    delay = RECONNECT_BACKOFF.delay(failures + 1)
                elif round_over:
                    delay = random.uniform(*_ELECTION_PAUSE)
                else:
                    delay = 0.0
                if not quiet:
                    _log_failure(target, end, delay, first=end.welcomed or failures == 0)
            if delay > 0:
                if not answered:
                    failures += 1
                tried = 0
                answered = False
            target = next_target
            await self._pause(delay)

    def _welcomed(self, session: Session) -> None:
        self.connected.set()
        self._sessions_welcomed += 1
        if self._sessions_welcomed > 1 and self._metrics is not None:
            self._metrics.reconnects.inc()

    async def _pause(self, delay: float) -> None:
        if delay <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wakeup.wait()


def _log_failure(target: str, end: SessionEnd, delay: float, *, first: bool) -> None:
    """One line for one failed attempt (the rules are in the module docstring)."""
    if end.rejected:
        log = logger.error
    elif first:
        log = logger.warning
    else:
        log = logger.info
    then = f"trying again in {delay:.2f}s" if delay > 0 else "trying the next address"
    if not end.reached:
        log("cannot reach the coordinator at %s (%s); %s", target, end.error or "no answer", then)
    elif end.welcomed:
        log("lost the stream to coordinator %s (%s); %s", target, end.error or "closed", then)
    else:
        log("coordinator %s did not accept the worker (%s); %s", target, end.error, then)
