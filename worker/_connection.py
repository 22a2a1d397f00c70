"""Keeps one session open: reconnects with backoff, cycles addresses, follows redirects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence

import grpc

from conveyor.worker._runtime import Runtime
from conveyor.worker._session import HelloInfo, Session

__all__ = ["Connector", "backoff_delay"]

logger = logging.getLogger("conveyor.worker")

BACKOFF_INITIAL = 0.1
# Kept short: during a leader failover the cluster is back within a few seconds, and a
# worker asleep in a long backoff would stretch that outage for its tasks.
BACKOFF_MAX = 2.0


def backoff_delay(failures: int, *, rng: random.Random | None = None) -> float:
    """Delay before the next connection attempt after ``failures`` failed ones in a row.

    Exponential from :data:`BACKOFF_INITIAL`, capped at :data:`BACKOFF_MAX`, with jitter
    over the upper half of the range so that workers that lost the same coordinator do not
    all come back in the same instant, while still waiting at least half the step.
    """
    step = min(BACKOFF_MAX, BACKOFF_INITIAL * (2 ** min(failures, 32)))
    return (rng or random).uniform(step / 2, step)


class Connector:
    """Runs sessions back to back until closed, keeping the runtime connected."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        connected: asyncio.Event,
        info: HelloInfo,
        runtime: Runtime,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        if not addresses:
            raise ValueError("at least one coordinator address is needed")
        self._addresses = list(addresses)
        self._info = info
        self._runtime = runtime
        self._credentials = credentials
        self._metadata = tuple(metadata)
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

        Failed attempts are retried at once on the next address (or the leader a
        coordinator redirected to) until every address was tried once; only a whole round
        without a session backs off. A refused connection costs nothing, and during a
        failover the next address may well be the new leader.
        """
        failures = 0  # rounds through the addresses without a session
        tried = 0  # attempts in the current round
        answered = False  # some coordinator answered (redirected) in this round
        index = 0
        redirect_to: str | None = None
        while not self._closing:
            target = redirect_to or self._addresses[index % len(self._addresses)]
            redirect_to = None
            session = Session(
                target,
                info=self._info,
                runtime=self._runtime,
                draining=self._draining,
                credentials=self._credentials,
                metadata=self._metadata,
                on_welcome=lambda _session: self.connected.set(),
            )
            self._session = session
            try:
                logger.debug("connecting to coordinator %s", target)
                end = await session.run()
            finally:
                self._session = None
                self.connected.clear()
            if self._closing:
                return
            if end.welcomed:
                failures = 0
                tried = 0
            tried += 1
            round_over = tried > len(self._addresses)
            if end.redirect is not None:
                logger.info(
                    "coordinator %s redirected to the leader at %s",
                    target,
                    end.redirect or "(unknown)",
                )
                if end.redirect:
                    redirect_to = end.redirect
                else:
                    index += 1
                # Follow a redirect at once. A round of them means a leader change is
                # under way (the cluster answers): look again shortly, without growing
                # the backoff, so the new leader is found as soon as it is elected.
                answered = True
                delay = random.uniform(0.05, 0.15) if round_over else 0.0
            else:
                index += 1
                if end.rejected or (round_over and not answered):
                    delay = backoff_delay(failures)
                elif round_over:
                    delay = random.uniform(0.05, 0.15)
                else:
                    delay = 0.0
                # Once per outage at WARNING, then quieter; a refusal needs a human each time.
                if end.rejected:
                    log = logger.error
                elif end.welcomed or failures == 0:
                    log = logger.warning
                else:
                    log = logger.info
                log(
                    "lost the stream to coordinator %s (%s); reconnecting in %.2fs",
                    target,
                    end.error or "closed",
                    delay,
                )
            if delay > 0:
                if not answered:
                    failures += 1
                tried = 0
                answered = False
            await self._pause(delay)

    async def _pause(self, delay: float) -> None:
        if delay <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wakeup.wait()
