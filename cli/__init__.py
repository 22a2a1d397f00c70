"""The ``conveyor`` command line: dev mode, coordinator, worker, task commands, bench."""

import os

# Set before gRPC is first imported (it reads this once). Conveyor's processes fork only
# to exec another program (pg_ctl, workers, coordinators); gRPC's fork handlers then run
# in the child between fork and exec, where they can crash it (seen as pg_ctl dying of
# SIGSEGV while gRPC threads were busy).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
