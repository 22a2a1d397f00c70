#!/usr/bin/env bash
# The project's test command: installs the project with its dev extras into .venv
# (created when missing), then lints and runs the tests. Arguments go to pytest,
# e.g. `scripts/test.sh tests/unit -k proto`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Bytecode is written and reused: with PYTHONDONTWRITEBYTECODE set (some shells and CI
# images set it), every process the suite starts (hundreds of coordinators, workers and
# CLI commands) compiled the package's ~180 modules from source again, about 0.5 s of CPU
# each.
unset PYTHONDONTWRITEBYTECODE

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/pip install -q -e '.[dev]'

# ruff (lint and format), buf lint, buf breaking and mypy --strict
scripts/check.sh

# The tests under coverage, the processes they start included ([tool.coverage.run] in
# pyproject.toml). The report comes last; on a full run (no arguments) it fails below the
# floor, fail_under in [tool.coverage.report].
rm -rf build/coverage
mkdir -p build/coverage
status=0
# Four test processes (pytest-xdist) on two cores: the suite mostly waits on the
# processes and servers it starts, so four run it in 7.5-10.5 minutes (1,311 tests in
# 7 min 27 s on the quiet 2-core VM at the end of the fourth stop; 1,272 took 9 min 27 s
# to 10 min 29 s at the end of the third) where two took 9-10 with 1,173.
# `scripts/test.sh -n 0 ...` runs in one process.
.venv/bin/coverage run -m pytest -q -n 4 "$@" || status=$?
.venv/bin/coverage combine -q
echo
if [ $# -eq 0 ]; then
  .venv/bin/coverage report || status=$((status ? status : 1))
else
  .venv/bin/coverage report --fail-under=0
fi
exit $status
