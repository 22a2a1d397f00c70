"""The ``conveyor`` command line: dev mode, coordinator, worker, task commands, bench."""
