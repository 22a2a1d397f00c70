#!/usr/bin/env bash
# Static checks: ruff (lint and format), buf lint and mypy --strict over the package and
# the tests.
#
# mypy cannot follow the import hook that setuptools' editable install uses for our
# package-dir mapping (conveyor.coordinator -> coordinator/ ...). So this script builds a
# tree of symlinks, build/mypy-tree/conveyor/<pkg> -> <folder>, from the package-dir table in
# pyproject.toml, and runs .venv's mypy from the root: [tool.mypy] names that tree and
# tests/ as what to check (so a plain `.venv/bin/mypy` works too, once the tree exists).
# Run scripts/test.sh (or pip install -e '.[dev]') once first to create .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  echo "no .venv: run scripts/test.sh first (or python3 -m venv .venv && .venv/bin/pip install -e '.[dev]')" >&2
  exit 2
fi

# Only the project's own folders: the packages mapped in pyproject.toml, the tests and
# the scripts. A file of the user's own in the clone (the README's myapp/tasks.py, say)
# must not fail the project's checks.
mapfile -t folders < <(.venv/bin/python - <<'PY'
import tomllib
from pathlib import Path

package_dir = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"][
    "package-dir"
]
tops = {folder.split("/")[0] for folder in package_dir.values()} | {"tests", "scripts"}
print("\n".join(sorted(t for t in tops if Path(t).is_dir())))
PY
)

status=0
.venv/bin/ruff check "${folders[@]}" || status=1
.venv/bin/ruff format --check "${folders[@]}" || status=1
.venv/bin/buf lint || status=1
# The API stays wire- and JSON-compatible with the last release (or the last deliberate
# break): proto/reference/api.json, recorded by scripts/api_reference.sh.
.venv/bin/buf breaking --against proto/reference/api.json || status=1

tree=build/mypy-tree
rm -rf "$tree"
.venv/bin/python - "$tree" <<'PY'
import os
import sys
import tomllib
from pathlib import Path

tree = Path(sys.argv[1])
root = Path.cwd()
package_dir = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
    "package-dir"
]
# Only the top-level mapped packages: nested ones (conveyor.coordinator.store) live inside
# their parent's folder already.
for name, folder in sorted(package_dir.items()):
    parent = name.rpartition(".")[0]
    if parent in package_dir:
        continue
    link = tree.joinpath(*name.split("."))
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(root / folder, link, target_is_directory=True)
PY
.venv/bin/mypy || status=1

exit $status
