"""The Conveyor coordinator: gRPC API, dispatcher, leases and the PostgreSQL store."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.coordinator.config import ConfigError, CoordinatorConfig
    from conveyor.coordinator.server import Coordinator, serve

__all__ = ["ConfigError", "Coordinator", "CoordinatorConfig", "serve"]

# The server (and with it aiohttp, asyncpg, the gRPC services) is imported on first use,
# not with the package: the CLI's client commands import small modules of it (bounds,
# validation) to check flags, and paid ~0.5 s of CPU per command for the whole server.
_HOMES = {
    "ConfigError": "conveyor.coordinator.config",
    "CoordinatorConfig": "conveyor.coordinator.config",
    "Coordinator": "conveyor.coordinator.server",
    "serve": "conveyor.coordinator.server",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'conveyor.coordinator' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
