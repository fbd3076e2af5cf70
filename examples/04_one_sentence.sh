#!/usr/bin/env bash
# Greedy decoding, cut at the first full stop, continuation only: a building block for scripts.
set -euo pipefail
nlgen generate --greedy -n 40 --stop "." --completion-only "The capital of France is"
echo
