#!/usr/bin/env bash
# Records the API as it is now as the reference that `buf breaking` compares against
# (scripts/check.sh): proto/reference/api.json, a buf image (JSON, one field per line so a
# change reads as a diff), without comments or source positions, which breaking rules do
# not look at.
#
# Run it when a release is cut (the reference is "the API as last released"), and when a
# breaking change is made on purpose: then also say in CHANGELOG.md what breaks and what
# clients must do (see README.md, "Changing the API").
set -euo pipefail
cd "$(dirname "$0")/.."
buf=.venv/bin/buf
[ -x "$buf" ] || buf=buf
image=$(mktemp --suffix=.json)
trap 'rm -f "$image"' EXIT
"$buf" build --exclude-source-info -o "$image"
python3 - "$image" proto/reference/api.json <<'PY'
import json
import sys

source, target = sys.argv[1:]
with open(source, encoding="utf-8") as f:
    image = json.load(f)
with open(target, "w", encoding="utf-8") as f:
    json.dump(image, f, indent=1, sort_keys=True)
    f.write("\n")
PY
echo "recorded the API reference: proto/reference/api.json"
