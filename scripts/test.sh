#!/usr/bin/env bash
# Set up .venv if needed, then run the default test suite (kernel, plugins, differential tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
