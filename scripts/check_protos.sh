#!/usr/bin/env bash
# Fails if the committed stubs differ from what scripts/gen_protos.sh produces now.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$root/scripts/gen_protos.sh" "$tmp" >/dev/null 2>&1
if ! diff -r -x __pycache__ "$tmp/fedcompute/v1" "$root/fedcompute/v1"; then
  echo "generated stubs are stale: run 'make protos' and commit fedcompute/v1" >&2
  exit 1
fi
echo "generated stubs are up to date"
