#!/usr/bin/env bash
# Set up .venv if needed, then the demo: fine-tune a tiny Llama (built from a config, no
# downloads) with LoRA on the shipped toy data, inspect the adapter, merge it into the base,
# and check that the merged model gives the adapter's outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
export PATH="$PWD/.venv/bin:$PATH"
peft-kernel finetune --method lora --steps 120 --output "$out/adapter"
peft-kernel inspect "$out/adapter"
peft-kernel merge default "$out/adapter" --output "$out/merged"
python examples/check_merge.py "$out/adapter" "$out/merged"
