"""Data parallelism under ``torchrun`` or ``accelerate launch``: one model per process.

Rank and world come from the environment those launchers set (RANK, WORLD_SIZE, LOCAL_RANK).
Each rank takes a round-robin share of the inputs (:func:`shard`), works through it, and
:func:`gather_in_order` brings every result to rank 0 in input order while the work goes on;
:func:`reduce_sums` adds up totals (perplexity) exactly.

With one process (WORLD_SIZE unset or 1) every function here is the obvious no-op, so the
commands call them unconditionally. torch is imported inside the functions that use it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import pickle
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

from nlgen.errors import NlgenError, UsageError
from nlgen.models.devices import process_alive

log = logging.getLogger("nlgen")

T = TypeVar("T")
K = TypeVar("K")

DEFAULT_ROUND_SIZE = 8  # results each rank hands in per round of gather_in_order

_owned_group = False  # True when init() created the process group (so shutdown() destroys it)


class DistributedError(NlgenError):
    """Another rank failed: this rank stops too, with that rank's message and exit code."""

    def __init__(self, message: str, hint: str | None = None, *, origin_rank: int,
                 exit_code: int = 1) -> None:
        super().__init__(message, hint)
        self.origin_rank = origin_rank
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- who am I


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not an integer",
                         hint="it is set by torchrun or accelerate launch; unset it to run "
                              "in one process") from None


def rank() -> int:
    """This process's rank among all processes (0 without a launcher)."""
    return _env_int("RANK", 0)


def world_size() -> int:
    """How many processes share the work (1 without a launcher)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's rank on its own machine: which GPU it takes."""
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """Rank 0: the one that writes results, summaries and progress."""
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def device_for_rank(requested: str = "auto") -> str:
    """The ``--device`` this rank loads its model on: one process, ``requested`` unchanged;
    several, each its own GPU (``cuda:LOCAL_RANK``) when CUDA is asked for or found, else the
    CPU. Under a launcher ``cuda:N`` means "CUDA" too (else every rank shares one GPU)."""
    if not is_distributed():
        return requested
    if requested == "mps":
        raise UsageError("--device mps is a single device; run one process without torchrun")
    if requested == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank() >= count:
            log.warning("local rank %d but %d CUDA device(s): GPUs are shared", local_rank(), count)
        return f"cuda:{local_rank() % count}"
    if requested.startswith("cuda"):
        raise UsageError(f"--device {requested}: CUDA is not available on this machine",
                         hint="use --device cpu or auto")
    return "cpu"


# ----------------------------------------------------------------------------- the process group


def init(device: str = "cpu", timeout_s: float | None = None) -> bool:
    """Join the process group once, when launched with WORLD_SIZE > 1.

    True when this call created the group (:func:`shutdown` destroys it); False with one
    process, or when someone else (accelerate) set it up. CUDA ranks get
    ``cpu:gloo,cuda:nccl``: NCCL for GPU tensors, gloo for the object collectives of
    :func:`gather_in_order` and :func:`reduce_sums` (no copies to and from the GPU).
    """
    global _owned_group
    if not is_distributed():
        return False
    import torch.distributed as dist

    if not dist.is_available():
        raise NlgenError("this torch build has no torch.distributed; run one process")
    if dist.is_initialized():
        return False
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, **kwargs)
    _owned_group = True
    log.info("rank %d of %d joined the process group (%s)", rank(), world_size(), backend)
    know_peers()
    return True


_peers: list[tuple[str, int]] = []  # (host, pid) of every rank, once know_peers() ran


def know_peers() -> None:
    """Every rank's host and pid on every rank (one collective; every rank calls it at the
    same point: :func:`init` does, finetune once accelerate set up the group)."""
    global _peers
    if not _peers and is_distributed():
        table: list[Any] = [None] * world_size()
        _require_group().all_gather_object(table, (socket.gethostname(), os.getpid()))
        _peers = [tuple(entry) for entry in table]


def peer_failure(*, resumable: bool) -> DistributedError | None:
    """Rank 0's one-line error when another rank (on this host) is gone, else None: the
    launcher ends the job at once, so rank 0 sees a collective whose peer left, or SIGTERM.
    ``resumable``: the job keeps its work (--output, checkpoints) for --resume."""
    host, lost = socket.gethostname(), []
    for _ in range(40 if _peers and is_distributed() else 0):
        lost = [r for r, (peer_host, pid) in enumerate(_peers)
                if r != rank() and peer_host == host and not process_alive(pid)]
        if lost:
            who = ("rank " if len(lost) == 1 else "ranks ") + ", ".join(map(str, lost))
            again = "; rerun with --resume to continue" if resumable else ""
            return DistributedError(f"{who} stopped before the job was done{again}",
                                    hint=f"{who}'s own output, if any, says why (a kill, or "
                                    "the out-of-memory killer)", origin_rank=lost[0])
        time.sleep(0.05)  # its sockets close a moment before its process is seen to end
    return None


def shutdown() -> None:
    """Destroy the process group if :func:`init` created it."""
    global _owned_group
    if not _owned_group:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _owned_group = False


@contextmanager
def session(device: str = "cpu", timeout_s: float | None = None) -> Iterator[None]:
    """``with session(device): ...``: :func:`init` on entry, :func:`shutdown` on exit."""
    created = init(device, timeout_s)
    try:
        yield
    finally:
        if created:
            shutdown()


def _require_group() -> Any:
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("WORLD_SIZE > 1 but no process group: call distributed.init() first")
    return dist


# ----------------------------------------------------------------------------- sharding


def shard(items: Iterable[T], *, this_rank: int | None = None,
          ranks: int | None = None) -> Iterator[T]:
    """This rank's share of ``items``: item i goes to rank ``i % world``.

    Round-robin, not blocks: it needs no length (a pipe), it streams (after each round of
    :func:`gather_in_order` every rank has done the *same* region, so rank 0 writes a prefix at
    once; with blocks rank 1's results would wait for rank 0's whole block), and it spreads
    costs that drift along the file. Every rank reads the whole input, so inputs must be files
    every rank can read, not STDIN. Pass ``enumerate(items)`` to keep the global index.
    """
    r = rank() if this_rank is None else this_rank
    w = world_size() if ranks is None else ranks
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is outside a world of {w}")
    return itertools.islice(items, r, None, w)


# ----------------------------------------------------------------------------- collectives


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. the keys a resumed job has already done)."""
    if not is_distributed():
        return obj
    dist = _require_group()
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def reduce_sums(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` (as many on every rank) over all ranks, everywhere.

    Gathered as float64 and added with :func:`math.fsum`, which rounds once: exact to float64
    whatever the order of the ranks (an all_reduce's last digits vary with the world size).
    """
    if not is_distributed():
        return [float(v) for v in values]
    import torch

    dist = _require_group()
    local = torch.tensor([float(v) for v in values], dtype=torch.float64)  # (n,)
    if "gloo" not in str(dist.get_backend()):  # an NCCL-only group (set up by someone else)
        local = local.to(f"cuda:{torch.cuda.current_device()}")
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    columns = torch.stack(parts).cpu().tolist()  # (world, n)
    return [math.fsum(column) for column in zip(*columns)]


# ----------------------------------------------------------------------------- gathering in order


def gather_in_order(local_results: Iterable[tuple[K, T]], *,
                    round_size: int = DEFAULT_ROUND_SIZE) -> Iterator[tuple[K, T]]:
    """Rank 0 yields every rank's ``(key, result)`` in global key order, as results come in.

    Each rank passes ``(key, result)`` pairs, keys non-decreasing (the global index, or
    ``(index, sequence)``), each key from one rank only. Other ranks yield nothing but must
    iterate, since the work happens while they do.

    In rounds: each rank takes up to ``round_size`` results, then all meet in one
    ``gather_object`` to rank 0 and one broadcast of what happens next. A rank whose share is
    used up joins the rounds with nothing until all are done (no rank waits in a collective
    nobody joins). An exception on any rank travels in the same round: every rank stops, the
    failing one with its own exception, the others a :class:`DistributedError`. Rank 0 yields
    a result once no unfinished rank can produce a smaller key, so gaps hold nothing up.

    Close the iterator (``contextlib.closing``) when rank 0 stops early, so that the others are
    told to stop instead of waiting for the next round.
    """
    if round_size < 1:
        raise ValueError("round_size must be at least 1")
    if not is_distributed():
        yield from local_results
        return
    dist = _require_group()
    merger = _Merger(world_size()) if rank() == 0 else None
    source = iter(local_results)
    exhausted = False
    while True:
        items, failure, packed = [], None, b""
        try:
            while not exhausted and len(items) < round_size:
                item = next(source, _END)
                if item is _END:
                    exhausted = True
                else:
                    items.append(item)
            # Pickled here, not inside the collective: a result that cannot be pickled must
            # become this round's error, not a rank that never joins the gather.
            packed = pickle.dumps(items)
        except Exception as exc:  # every rank must hear of it, or the others wait forever
            failure = exc
        decision, ready = _round(dist, merger, packed, exhausted, _describe(failure))
        if decision[0] == "error":
            if failure is not None:
                raise failure
            _, origin, kind, message, hint, code = decision
            if kind != "NlgenError":
                message = f"rank {origin} failed: {message}"
                hint = f"rank {origin}'s own output has the details"
            raise DistributedError(message, hint, origin_rank=origin, exit_code=code)
        if decision[0] == "abort":  # rank 0 stopped reading: our results are not wanted
            log.info("rank %d: rank 0 stopped early; stopping", rank())
            return
        try:
            yield from ready
        except GeneratorExit:
            if decision[0] == "go":
                _abort_round(dist)
            raise
        if decision[0] == "done":
            return


_END = object()


def _describe(exc: BaseException | None) -> tuple | None:
    """An exception as plain data for the other ranks (exceptions may not pickle)."""
    if exc is None:
        return None
    if isinstance(exc, NlgenError):
        return ("NlgenError", exc.message, exc.hint, exc.exit_code)
    return (type(exc).__name__, f"{type(exc).__name__}: {exc}", None, 1)


def _round(dist: Any, merger: _Merger | None, packed: bytes, exhausted: bool,
           failure: tuple | None) -> tuple[tuple, list]:
    """One round: everyone's results to rank 0, rank 0's decision back to everyone."""
    payload = (packed, exhausted, failure)
    gathered = [None] * world_size() if merger is not None else None
    dist.gather_object(payload, gathered, dst=0)
    ready: list = []
    decision: tuple = ("go",)
    if merger is not None:
        try:
            decision, ready = merger.add(gathered)
        except Exception as exc:  # e.g. a result that does not unpickle: stop everyone
            decision, ready = ("error", 0, *_describe(exc)), []
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return box[0], ready


def _abort_round(dist: Any) -> None:
    """Rank 0 stops early: join the round the others are heading into, and tell them to stop."""
    gathered = [None] * world_size()
    dist.gather_object((b"", True, None), gathered, dst=0)
    dist.broadcast_object_list([("abort",)], src=0)


class _Merger:
    """Rank 0's side: a heap of results not yet safe to yield, and each rank's progress."""

    def __init__(self, world: int) -> None:
        self.heap: list = []
        self.last: list[Any] = [None] * world  # the largest key each rank has reported
        self.finished = [False] * world
        self.counter = itertools.count()  # ties (same key, same rank) keep arrival order

    def add(self, gathered: list) -> tuple[tuple, list]:
        for r, (packed, exhausted, failure) in enumerate(gathered):
            if failure is not None:
                return ("error", r, *failure), []
            for key, obj in pickle.loads(packed) if packed else ():
                if self.last[r] is not None and key < self.last[r]:
                    message = f"keys out of order ({key!r} after {self.last[r]!r})"
                    return ("error", r, "RuntimeError", message, None, 1), []
                self.last[r] = key
                heapq.heappush(self.heap, (key, r, next(self.counter), obj))
            self.finished[r] = exhausted
        if all(self.finished):
            return ("done",), self._pop_while(lambda key: True)
        pending = [self.last[r] for r in range(len(self.last)) if not self.finished[r]]
        if any(key is None for key in pending):  # a rank yet to report could hold the smallest
            return ("go",), []
        frontier = min(pending)
        return ("go",), self._pop_while(lambda key: key <= frontier)

    def _pop_while(self, safe: Any) -> list:
        ready = []
        while self.heap and safe(self.heap[0][0]):
            key, _, _, obj = heapq.heappop(self.heap)
            ready.append((key, obj))
        return ready
