#!/usr/bin/env bash
# Regenerates the committed gRPC/protobuf stubs (and their .pyi types) from protos/.
# Usage: scripts/gen_protos.sh [OUTPUT_ROOT]   (default: the repository root; CI passes a temp dir and diffs)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
py=${PYTHON:-$root/.venv/bin/python}
mkdir -p "$out/fedcompute/v1"
rm -f "$out"/fedcompute/v1/*_pb2*.py "$out"/fedcompute/v1/*_pb2*.pyi
plugin_dir=$(dirname "$py")
"$py" -m grpc_tools.protoc -I "$root/protos" \
  --plugin=protoc-gen-mypy="$plugin_dir/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$plugin_dir/protoc-gen-mypy_grpc" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  "$root"/protos/fedcompute/v1/*.proto
[ -f "$out/fedcompute/v1/__init__.py" ] || printf '"""Generated protocol stubs (never edited by hand; see scripts/gen_protos.sh)."""\n' > "$out/fedcompute/v1/__init__.py"
