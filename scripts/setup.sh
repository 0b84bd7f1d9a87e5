#!/usr/bin/env bash
# Create (or reuse) .venv with the kernel, every first-party plugin and the test tools, at the
# versions pinned in constraints.txt (the set CI tested). Needs only a Python >= 3.11. Safe to
# run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PEFT_KERNEL_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip -q --disable-pip-version-check"
stamp="$VENV/.peft-kernel-installed"
want=$(cat pyproject.toml plugins/*/pyproject.toml contrib/*/pyproject.toml scripts/setup.sh constraints.txt | sha1sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
$PIP install "torch==2.13.0"
plugins=()
for dir in plugins/*/; do
  [ -f "$dir/pyproject.toml" ] && plugins+=(-e "$dir")
done
# contrib/peft-plugin-example: the out-of-tree plugin whose tests prove third parties pass the kit
$PIP install -c constraints.txt -e ".[test]" "${plugins[@]}" -e contrib/peft-plugin-example
echo "$want" > "$stamp"
