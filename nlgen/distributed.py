"""Rank and world size of a multi-process launch (torchrun, ``accelerate launch``).

Read from the environment the launchers set, so that asking costs no torch import.
"""

from __future__ import annotations

import os


def world_size() -> int:
    """How many processes a launcher started for this run (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a multi-process launch."""
    return rank() == 0 and os.environ.get("LOCAL_RANK", "0") in ("0", "-1")
