"""The coordinator's gRPC server options that its connections depend on."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from conveyor.coordinator.api import server as api_server
from conveyor.coordinator.config import CoordinatorConfig
from conveyor.transport._options import FLOW_CONTROL_OPTIONS


async def test_the_server_uses_the_sdks_flow_control(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fixed HTTP/2 window without BDP pings on both ends of a worker's connection
    # (issue 19, sixth round): the server's side is its own channel arguments.
    made: list[list[tuple[str, Any]]] = []
    real = grpc.aio.server

    def recording(*args: Any, **kwargs: Any) -> grpc.aio.Server:
        made.append(list(kwargs["options"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(grpc.aio, "server", recording)
    config = CoordinatorConfig(dsn="postgresql://unused", listen="127.0.0.1:0")
    api_server.ApiServer(config, interceptors=[], tls=None)
    assert len(made) == 1
    assert set(FLOW_CONTROL_OPTIONS) <= set(made[0])
