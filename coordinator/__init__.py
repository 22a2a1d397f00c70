"""The Conveyor coordinator: gRPC API, dispatcher, leases and the PostgreSQL store."""

from conveyor.coordinator.config import ConfigError, CoordinatorConfig
from conveyor.coordinator.server import Coordinator, serve

__all__ = ["ConfigError", "Coordinator", "CoordinatorConfig", "serve"]
