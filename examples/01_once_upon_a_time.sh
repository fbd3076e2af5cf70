#!/usr/bin/env bash
# The main job: continue a prompt. Offline, the default model (gpt2) falls back to the built-in
# SmolLM2-135M-Instruct and says so on stderr. --seed makes the output reproducible.
set -euo pipefail
nlgen generate --seed 42 -n 40 "Once upon a time"
