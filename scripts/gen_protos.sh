#!/usr/bin/env bash
# Regenerates the committed Python stubs under proto/conveyor/v1 (the API) and
# proto/conveyor/keda (KEDA's external scaler API, vendored) from the .proto files.
# The .proto files are the source of truth; tests/unit/test_proto_drift.py fails when the
# committed stubs differ from what this script produces.
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's venv by default: protoc's mypy plugins are scripts beside its python.
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
py=${PYTHON:-python}
bindir=$(dirname "$(command -v "$py")")
export PATH="$bindir:$PATH"
out=${1:-proto}
for pkg in v1 keda; do
  mkdir -p "$out/conveyor/$pkg"
  rm -f "$out/conveyor/$pkg"/*_pb2*.py "$out/conveyor/$pkg"/*_pb2*.pyi
  "$py" -m grpc_tools.protoc -I proto \
    --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
    proto/conveyor/$pkg/*.proto
done
