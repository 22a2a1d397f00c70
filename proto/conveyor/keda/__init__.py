"""Generated stubs of KEDA's external scaler API (vendored, see README.md); regenerate with
scripts/gen_protos.sh."""
