#!/usr/bin/env bash
# Regenerate constraints.txt, the pinned set the README's commands install: the newest
# versions that install today next to torch 2.13, resolved in a scratch venv. Run it, then
# run the suite (bash scripts/test.sh) and commit constraints.txt only if it is green.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$PY" -m venv "$scratch/venv"
PIP="$scratch/venv/bin/python -m pip -q --disable-pip-version-check"
$PIP install "torch==2.13.0"
plugins=()
for dir in plugins/*/; do
  [ -f "$dir/pyproject.toml" ] && plugins+=(-e "$dir")
done
$PIP install -e ".[test]" "${plugins[@]}" -e contrib/peft-plugin-example tox  # tox: .ci/run installs it from the pins too
{
  echo "# The pinned set: what scripts/setup.sh installs (pip -c), so that a fresh machine reproduces CI."
  echo "# Regenerate with scripts/pin.sh; tox -e latest shows what newer releases would change."
  "$scratch/venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -v '^-e ' | sed -E 's/^(torch==[^+]*)\+.*/\1/'
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
