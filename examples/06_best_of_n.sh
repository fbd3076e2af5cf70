#!/usr/bin/env bash
# Best of N: sample several continuations, score each with perplexity, keep the most likely one.
# generate -> jq (the texts) -> perplexity --per-line -> jq (sort by perplexity, take the first).
set -euo pipefail
nlgen generate --seed 7 -N 4 -n 24 --format jsonl "The old lighthouse keeper" \
  | jq -r '.text | gsub("\n"; " ")' \
  | nlgen perplexity --per-line --format jsonl \
  | jq -s -r 'sort_by(.perplexity) | .[0] | "\(.perplexity | tostring | .[0:6])\t\(.text)"'
