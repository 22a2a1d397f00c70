"""Every command documents itself: an example in --help, and the global options."""

from __future__ import annotations

from conveyor.cli.app import GLOBAL_OPTIONS
from conveyor.cli.main import command_tree

# The commands scripts, tests and the README use; renaming one breaks them.
KNOWN = {
    "dev", "coordinator", "worker", "submit", "get", "tasks", "queues", "cancel", "retry",
    "status", "health", "top", "bench", "bench-schedules", "bench-failover",
    "schedules create", "schedules list", "schedules get", "schedules pause",
    "schedules resume", "schedules delete",
    "keys generate", "keys create", "keys list", "keys revoke",
    "tenants list", "tenants get", "tenants set", "audit list", "audit verify",
    "bench-tenants",
    "bench-deps",
    "encryption new-key", "encryption rotate", "encryption list", "console",
    "limits set", "limits list", "limits delete",
    "dead list", "dead groups", "dead retry", "purge", "workers drain",
    "webhooks create", "webhooks list", "webhooks delete", "webhooks deliveries",
    "webhooks replay", "types set", "types get", "types list", "types delete",
}  # fmt: skip


def test_every_command_has_an_example_and_the_global_options() -> None:
    tree = command_tree()
    assert set(tree) == KNOWN
    for path, info in tree.items():
        assert f"conveyor {path}" in info.epilog, f"conveyor {path} --help shows no example"
        missing = {opt.flag for opt in GLOBAL_OPTIONS} - info.options
        assert not missing, f"conveyor {path} does not take {missing} after the command"
