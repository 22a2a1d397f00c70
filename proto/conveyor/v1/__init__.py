"""Generated stubs of the Conveyor API (conveyor.v1); regenerate with scripts/gen_protos.sh."""
