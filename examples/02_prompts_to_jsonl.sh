#!/usr/bin/env bash
# Many prompts, one a line, generated in batches; one JSON object per result, in input order.
# jq picks the fields a script needs.
set -euo pipefail
cd "$(dirname "$0")"
cat data/prompts.txt \
  | nlgen generate --seed 1 -n 20 --format jsonl \
  | jq -r '[.index, .completion_tokens, .finish_reason, .completion] | @tsv'
