#!/usr/bin/env bash
# A reader that stops early (head) ends nlgen quietly: no traceback, no error, exit 0.
set -euo pipefail
cd "$(dirname "$0")"
nlgen generate --seed 1 -n 12 --format jsonl --file data/prompts.txt | head -n 1
