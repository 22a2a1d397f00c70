"""A process without ``OTEL_EXPORTER_OTLP_ENDPOINT``, for the tracing tests: each part
of Conveyor decides about tracing as its process would, and the report says what that
turned on and what it loaded.

    python trace_hop.py disabled    prints a JSON report
"""

from __future__ import annotations

import asyncio
import json
import sys

from conveyor.observability.tracing import SERVICE_WORKER, Tracing


async def disabled() -> None:
    from conveyor.cli.main import build
    from conveyor.client import AsyncClient
    from conveyor.coordinator import CoordinatorConfig
    from conveyor.coordinator.telemetry import Telemetry
    from conveyor.worker._worker import _process_tracing

    build()  # every command's module, as `conveyor` imports them
    tracing = Tracing.from_env(SERVICE_WORKER)
    telemetry = Telemetry(CoordinatorConfig(dsn="postgresql://nowhere/db"), node_id="n")
    async with AsyncClient("127.0.0.1:9") as client:
        client_tracing = client._tracing()
    with tracing.execution_span(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        task_id="t",
        queue="q",
        type_="x",
        attempt=1,
    ) as span:
        pass
    loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk"))
    report = {
        "enabled": [
            tracing.enabled,
            telemetry.tracing.enabled,
            _process_tracing("w").enabled,
            client_tracing.enabled,
        ],
        "span": span is not None,
        "sdk": loaded,
        "interceptors": len(telemetry.interceptors()),
    }
    print(json.dumps(report))


def main(argv: list[str]) -> None:
    command, *_ = argv
    if command == "disabled":
        asyncio.run(disabled())
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
