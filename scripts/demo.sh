#!/usr/bin/env bash
# Set up .venv if needed, then run the quick-start demo on a tiny model built from a config.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/quickstart.py "$@"
