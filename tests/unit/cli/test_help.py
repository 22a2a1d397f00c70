"""Every command documents itself: an example in --help, and the global options."""

from __future__ import annotations

import pytest

from conveyor.cli.app import GLOBAL_OPTIONS
from conveyor.cli.main import command_tree, main

# The commands scripts, tests and the README use; renaming one breaks them.
KNOWN = {
    "dev", "coordinator", "worker", "submit", "get", "tasks", "queues", "cancel", "retry",
    "status", "health", "top", "bench", "bench-schedules", "bench-failover",
    "schedules create", "schedules list", "schedules get", "schedules pause",
    "schedules resume", "schedules delete",
    "keys generate", "keys create", "keys list", "keys revoke",
    "tenants list", "tenants get", "tenants set", "audit list", "audit verify",
    "bench-tenants", "bench-console",
    "bench-deps", "bench-streams", "bench-floor",
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


def test_unknown_commands_suggest_the_nearest_and_flags_show_no_type(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Issue 20, first hour: `conveyor list` said only "No such command"; switches showed
    # `<bool>` as if they took a value.
    for argv, suggested in (
        (["list"], "conveyor: No such command 'list'. Did you mean 'tasks'?"),
        (["subit"], "Did you mean 'submit'?"),
        (["ls"], "Did you mean 'tasks'?"),
        (["schedules", "lst"], "conveyor schedules: No such command 'lst'. Did you mean 'list'?"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert suggested in err and err.count("Did you mean") == 1, err
    assert main(["xyz"]) == 2
    assert "Did you mean" not in capsys.readouterr().err
    # A bad choice says what is wrong, without the "Value error, " of pydantic's wording.
    assert main(["tasks", "--state", "deadd"]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for '--state': 'deadd' is not one of 'pending'" in err, err
    assert "Value error" not in err
    assert main(["bench-tenants", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "issue" not in help_text and "within 2x" in help_text
    assert main(["submit", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "<bool>" not in help_text and "--wait" in help_text and "DURATION" in help_text
