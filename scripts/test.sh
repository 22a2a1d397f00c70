#!/usr/bin/env bash
# The project's test command: installs the project with its dev extras into .venv
# (created when missing), then lints and runs the tests. Arguments go to pytest,
# e.g. `scripts/test.sh tests/unit -k proto`.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/pip install -q -e '.[dev]'

# ruff (lint and format), buf lint and mypy --strict
scripts/check.sh
.venv/bin/pytest -q "$@"
