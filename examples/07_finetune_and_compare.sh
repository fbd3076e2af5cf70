#!/usr/bin/env bash
# A model of one's own: fine-tune briefly on a text, then compare perplexity before and after.
set -euo pipefail
cd "$(dirname "$0")"
out="$(mktemp -d)/garden-model"
trap 'rm -rf "$(dirname "$out")"' EXIT
base="${NLGEN_MODEL:-builtin}"
nlgen finetune data/garden.txt --model "$base" --output-dir "$out" \
  --block-size 64 --batch-size 2 --max-steps 6 --learning-rate 1e-4 --seed 0 >/dev/null
echo "before: $(nlgen perplexity --model "$base" --format jsonl data/garden.txt | jq .perplexity)"
echo "after:  $(nlgen perplexity --model "$out" --format jsonl data/garden.txt | jq .perplexity)"
nlgen generate --model "$out" --seed 0 -n 20 "In the garden"
