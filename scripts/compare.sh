#!/usr/bin/env bash
# The main job: install what is missing, build, and run the comparison on the
# built-in sample image (`nestor bench --quick`). Extra arguments go to nestor bench.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(scripts/setup.sh | tail -n 1)
exec "$BIN/nestor" bench --quick "$@"
