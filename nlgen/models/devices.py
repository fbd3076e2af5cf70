"""Devices and dtypes: ``--device`` and ``--dtype`` checked early, resolved when loading.

``auto`` picks the fastest choice that keeps results sound: see :func:`resolve_dtype`.
"""

from __future__ import annotations

import math
import os
import re
import time

from nlgen.errors import ModelError, UsageError

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_device_spec(device: str) -> str:
    """Validate ``--device`` syntax before anything heavy is imported (a usage error)."""
    if not DEVICE_RE.match(device):
        raise UsageError(f"invalid --device {device!r}", hint="use auto, cpu, cuda, cuda:N or mps")
    return device


def check_dtype_spec(dtype: str) -> str:
    if dtype not in DTYPES:
        raise UsageError(f"invalid --dtype {dtype!r}", hint="use one of: " + ", ".join(DTYPES))
    return dtype


def resolve_device(device: str) -> str:
    """``auto`` -> the first GPU when there is one, else Apple's MPS, else the CPU."""
    import torch

    check_device_spec(device)
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda:0"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: CUDA is not available on this machine",
                             hint="use --device cpu or auto")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        return f"cuda:{index}"
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ModelError("--device mps: MPS is not available on this machine",
                         hint="use --device cpu or auto")
    return device


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX).

    Measured on the 2-core avx512_bf16 machines (benchmarks/bench_generate.py, README):
    bfloat16 decoding is ~1.5x faster than float32 there. Without these instructions torch
    emulates bfloat16 and it is slower than float32, so auto keeps float32.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = f.read()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_dtype(dtype: str, device: str, purpose: str = "generate") -> str:
    """``auto`` -> the fastest dtype that keeps results sound on this device.

    ``purpose="score"`` keeps float32 on the CPU: perplexity is a measurement, and bfloat16's
    drift (README) is larger than the differences users compare.
    """
    import torch

    check_dtype_spec(dtype)
    if dtype != "auto":
        if dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            raise ModelError(f"--dtype bfloat16 is not supported on {device}",
                             hint="use --dtype float16 or float32")
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "mps":
        return "float16"
    if purpose == "generate" and cpu_has_fast_bf16():
        return "bfloat16"
    return "float32"


# ----------------------------------------------------------------------------- processes


def process_alive(pid: int) -> bool:
    """Is process ``pid`` (on this machine) still running? A zombie, dead but not yet reaped
    by its parent, is not."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            if f.read().rpartition(")")[2].split()[:1] == ["Z"]:
                return False
    except OSError:
        pass  # gone, or no /proc here: os.kill decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, another user's
        return True
    return True


# ----------------------------------------------------------------------------- CPU threads


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall seconds, CPU seconds busy on the whole machine, CPU seconds of this process), or
    None where /proc/stat cannot be read (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    own = os.times()
    return time.monotonic(), (sum(fields[:8]) - idle) / tick, own.user + own.system


def spare_threads(since: tuple[float, float, float] | None, threads: int) -> int:
    """How many of torch's ``threads`` to use, given what other processes did since ``since``.

    torch's CPU kernels split each operation over all their threads and wait for the last one.
    When other processes keep some cores busy, a thread left waiting for a core stalls every
    operation: on the 2-core machine with one busy-loop process holding a core, decoding ran at
    ~20 tokens/s with 2 threads and ~48 with one (README, "Design notes"). So leave
    the cores that others used (in the window, averaged) to them; never fewer than one thread.
    OMP_NUM_THREADS, when set, is the user's choice and kept.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return threads  # the user's own choice
    now = cpu_snapshot()
    if since is None or now is None or now[0] - since[0] < 0.2:
        return threads  # no measurement, or too short a window to trust
    others = ((now[1] - since[1]) - (now[2] - since[2])) / (now[0] - since[0])  # cores
    cores = os.cpu_count() or threads
    return max(1, min(threads, math.floor(cores - others + 0.5)))
