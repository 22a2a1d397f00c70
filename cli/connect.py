"""How the CLI's raw calls reach a coordinator: channels that carry the API key.

Commands that use the client library pass it :meth:`Globals.connection_options()
<conveyor.cli.app.Globals.connection_options>`; commands that call a stub themselves (the
AdminService, fields the client models lack) open their channel with :func:`open_channel`,
which adds the same metadata (``authorization: Bearer <key>``) to every call on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from grpc import aio

from conveyor.transport import ConnectionOptions


def _with_metadata(details: aio.ClientCallDetails, pairs: Sequence[tuple[str, str]]) -> Any:
    metadata = aio.Metadata(*(details.metadata or ()), *pairs)
    return aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _UnaryUnaryMetadata(aio.UnaryUnaryClientInterceptor):
    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self._pairs = pairs

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_metadata(client_call_details, self._pairs), request)


class _UnaryStreamMetadata(aio.UnaryStreamClientInterceptor):
    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self._pairs = pairs

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_metadata(client_call_details, self._pairs), request)


def open_channel(options: ConnectionOptions, address: str) -> aio.Channel:
    """A channel to ``address`` (``options``' credentials) whose unary and server-streaming
    calls all send ``options.call_metadata()``."""
    pairs = options.call_metadata()
    if not pairs:
        return options.open_channel(address)
    extra = (_UnaryUnaryMetadata(pairs), _UnaryStreamMetadata(pairs))
    channel_options = dataclasses.replace(options, interceptors=(*options.interceptors, *extra))
    return channel_options.open_channel(address)
