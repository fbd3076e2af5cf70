#!/usr/bin/env bash
# A chat-tuned model through its chat template: the prompt is the user's turn, the reply is printed.
set -euo pipefail
nlgen generate --model "${NLGEN_MODEL:-builtin}" --chat --greedy -n 60 \
  "Give me three tips for writing clear shell scripts."
