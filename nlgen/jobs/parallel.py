"""Jobs on one process or many: shard the input, work, gather in input order, write resumably.

What ``generate``, ``perplexity`` and ``score`` share under ``torchrun`` / ``accelerate
launch``, built on :mod:`nlgen.jobs.distributed` (with one process every step below is the
plain loop):

1. every rank reads the whole input (files; STDIN cannot be shared) and takes every N-th item;
2. rank 0 opens the output (:class:`JobOutput`); on ``--resume`` the keys already written are
   sent to every rank, which drop those items *before* sharding, so the rest stays balanced;
3. each rank loads its model *inside* the work it hands to :func:`distributed.gather_in_order`,
   so that a failure anywhere (a model that does not load on one node) reaches rank 0 and is
   reported there once, and no rank waits for a partner that is gone;
4. rank 0 receives every result in input order and writes it.

Generation shards prompts. Perplexity shards *windows*: every rank plans the windows of every
text, scores every N-th one, and rank 0 adds up each text's parts (float64, ``math.fsum``), so
one long text is spread over the ranks too (with ``--reference``, the comparison's sums as
well). Score shards *read-ahead groups* of records: every rank forms the groups one process
would, and scores every N-th one in the batches one process would, so that its records are the
same to the last bit.

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import closing
from itertools import islice
from typing import Any, TypeVar

from nlgen import batching
from nlgen.engine import generation
from nlgen.engine.generation import Generation, GenerationStats
from nlgen.engine.options import GenerationOptions
from nlgen.errors import UsageError
from nlgen.inputs import STDIN
from nlgen.jobs import distributed
from nlgen.jobs.batchjob import Request, Result
from nlgen.jobs.jobfile import JobIdentity, ResumableWriter
from nlgen.models.loading import LoadedModel
from nlgen.score.compare import ComparedScore
from nlgen.score.records import Item, RecordScore, RecordScorer
from nlgen.score.scoring import TextScore

T = TypeVar("T")


def check_shareable(sources: Iterable[str]) -> None:
    """Refuse STDIN under several processes: each rank must read the whole input."""
    if distributed.is_distributed() and STDIN in sources:
        raise UsageError(f"stdin cannot feed {distributed.world_size()} processes: each one "
                         "reads the whole input and keeps its share",
                         hint="save the input to a file and pass the file")


def on_every_rank(step: Callable[[], T]) -> T:
    """Run ``step`` on every rank; when it fails on any rank, it fails on all of them.

    The failing rank raises its own exception, the others a ``DistributedError`` with its
    message (rank 0 reports it). With one process: ``step()``.
    """
    if not distributed.is_distributed():
        return step()
    box: list[T] = []

    def attempt() -> Iterator[tuple[int, None]]:
        box.append(step())
        yield from ()

    for _ in distributed.gather_in_order(attempt()):
        pass
    return box[0]


END = math.inf  # the key of each rank's last item, its totals: after every real key


class Gathered:
    """Every rank's results, in key order, on rank 0 (nothing elsewhere: iterate anyway).

    ``totals`` (optional; with numeric keys) gives each rank's counts once its share is done;
    they travel as the rank's last item, so rank 0 has their exact sums (``math.fsum``) when
    the results end, with no collective after the loop that a rank stopped early would never
    join. Stopping early (a closed pipe) closes the gathering, which tells the other ranks to
    stop.
    """

    def __init__(self, local: Iterable[tuple[Any, T]],
                 totals: Callable[[], Sequence[float]] | None = None) -> None:
        self.local = local
        self.totals_of = totals
        self.parts: list[Sequence[float]] = []

    def _with_totals(self) -> Iterator[tuple[Any, Any]]:
        yield from self.local
        if self.totals_of is not None:
            yield END, _Totals(self.totals_of())  # after every (numeric) key

    def __iter__(self) -> Iterator[T]:
        with closing(distributed.gather_in_order(self._with_totals())) as results:
            for _, result in results:
                if isinstance(result, _Totals):
                    self.parts.append(result.values)
                else:
                    yield result

    @property
    def totals(self) -> list[float]:
        """Element-wise sums of every rank's totals (rank 0, once iterated)."""
        return [math.fsum(column) for column in zip(*self.parts)]


@dataclasses.dataclass(frozen=True)
class _Totals:
    values: Sequence[float]


class JobOutput:
    """``--output FILE``: rank 0's :class:`ResumableWriter`, and the keys done, on every rank.

    ``identity``: what defines the job, kept beside FILE; ``--resume`` refuses another job
    (:class:`ResumableWriter`). ``job_id``, the same on every rank: the file's own (kept by a
    resumed job), or a fresh one without ``--output``.
    """

    def __init__(self, path: str | None, key_fields: Sequence[str], resume: bool,
                 identity: JobIdentity | None = None) -> None:
        if resume and path is None:
            raise UsageError("--resume continues a job written with --output FILE",
                             hint="pass the --output of the job to resume")
        self.path = path

        def open_writer() -> ResumableWriter | None:
            if path is None or not distributed.is_main_process():
                return None
            described = identity.describe() if identity is not None else None
            return ResumableWriter(path, key_fields, resume=resume, identity=described)

        self.writer = on_every_rank(open_writer)
        keys = self.writer.done_keys if self.writer is not None else frozenset()
        job_id = self.writer.job_id if self.writer is not None else secrets.token_hex(6)
        shared = (keys, job_id) if distributed.is_main_process() else None
        keys, self.job_id = distributed.broadcast_object(shared)
        self.done: frozenset[Hashable] = keys if path is not None else frozenset()

    @property
    def resumed(self) -> int:
        return len(self.done)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> JobOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shared_seed(opts: GenerationOptions) -> GenerationOptions:
    """Several ranks without --seed: one seed, drawn on rank 0, for all.

    Then every prompt that samples (records may sample under --greedy) draws from its own
    stream (nlgen.engine.sampling), as with --seed, instead of from its rank's global generator.
    """
    if opts.seed is not None or not distributed.is_distributed():
        return opts
    seed = distributed.broadcast_object(secrets.randbelow(2**32)
                                        if distributed.is_main_process() else None)
    return dataclasses.replace(opts, seed=seed)


def stats_totals(stats: GenerationStats) -> Callable[[], list[float]]:
    """GenerationStats as :class:`Gathered` totals (read when the rank's share is done)."""
    return lambda: [stats.prompts, stats.sequences, stats.new_tokens, stats.seconds]


def stats_from(totals: Sequence[float]) -> GenerationStats:
    prompts, sequences, tokens, seconds = totals
    return GenerationStats(int(prompts), int(sequences), int(tokens), seconds)


# ----------------------------------------------------------------------------- generation


def generate_requests(load: Callable[[], LoadedModel], requests: Iterable[Request],
                      opts: GenerationOptions, *, uniform: bool, stats: GenerationStats,
                      on_text: Callable[[str], None] | None = None, skip_bad: bool = False,
                      ) -> Iterator[tuple[int, Result]]:
    """This rank's share of ``requests``, answered: ``(index, Result)`` in input order.

    ``uniform``: every request has the job's options ``opts`` (plain prompts), so the whole
    share streams through one generate() call, which answers a slow producer prompt by prompt.
    Otherwise (records with options of their own) requests are read a window at a time and
    the window's requests with equal options are batched together; a record asking for more
    new tokens than the model's context holds is refused (exit 2, naming it), or with
    ``skip_bad`` answered with its error, as the records refused before the model loaded.
    """
    lm = load()
    mine = distributed.shard(requests)
    if uniform:
        yield from _uniform(lm, mine, opts, stats, on_text)
        return
    while window := list(islice(mine, opts.batch_size * batching.WINDOW_BATCHES)):
        yield from _window(lm, [_fits(r, lm.context_length, skip_bad) for r in window], stats)


def _fits(request: Request, context: int, skip_bad: bool) -> Request:
    """``request``, or (its own max_tokens leaving no room in the context) its error."""
    asked = request.options.max_new_tokens if request.options is not None else None
    if not request.ok or request.length_field is None or asked is None or asked < context:
        return request
    who = f"line {request.line}" + (f" (custom_id {request.custom_id!r})"
                                    if request.custom_id else "")
    error = (f"{who}: {request.length_field} {asked} leaves no room for a prompt in the "
             f"model's {context}-token context")
    if not skip_bad:
        raise UsageError(f"{request.source} {error}".strip(),
                         hint=f"lower {request.length_field}, or pass --skip-bad to answer the "
                              "record with an error record and go on")
    return dataclasses.replace(request, error=error)


def _uniform(lm: LoadedModel, requests: Iterator[Request], opts: GenerationOptions,
             stats: GenerationStats, on_text: Callable[[str], None] | None,
             ) -> Iterator[tuple[int, Result]]:
    in_flight: dict[int, Request] = {}  # filled by generate's reader thread

    def pairs() -> Iterator[tuple[int, Any]]:
        for request in requests:
            in_flight[request.index] = request
            yield request.index, request.prompt

    results = generation.generate_indexed(lm, pairs(), opts, stats=stats, on_text=on_text)
    for index, gens in _per_prompt(results, opts.num_return_sequences):
        yield index, Result(in_flight.pop(index), gens)


def _window(lm: LoadedModel, window: list[Request],
            stats: GenerationStats) -> Iterator[tuple[int, Result]]:
    """One window of records: equal options batched together; results in input order."""
    groups: list[tuple[Any, list[Request]]] = []
    for request in window:
        if not request.ok:
            continue
        for options, members in groups:
            if options == request.options:
                members.append(request)
                break
        else:
            groups.append((request.options, [request]))
    by_index = {r.index: r for r in window}
    done: dict[int, Result] = {r.index: Result(r) for r in window if not r.ok}
    order = iter(window)
    waiting = next(order, None)
    for options, members in groups:
        pairs = ((r.index, r.prompt) for r in members)
        results = generation.generate_indexed(lm, pairs, options, stats=stats)
        for index, gens in _per_prompt(results, options.num_return_sequences):
            done[index] = Result(by_index[index], gens)
            while waiting is not None and waiting.index in done:
                yield waiting.index, done.pop(waiting.index)
                waiting = next(order, None)
    while waiting is not None:  # bad records after the last answered one
        yield waiting.index, done.pop(waiting.index)
        waiting = next(order, None)


def _per_prompt(results: Iterator[Generation], n: int,
                ) -> Iterator[tuple[int, tuple[Generation, ...]]]:
    """generate()'s sequences, n per prompt, grouped without reading ahead: a prompt's
    answer goes out as soon as its last sequence is in (groupby would wait for the next)."""
    for first in results:
        yield first.index, (first, *islice(results, n - 1))


# ----------------------------------------------------------------------------- perplexity


def score_parts(scorer_for: Callable[[tuple[int, int]], Any], texts: Iterable[Any],
                progress: Callable[[int, int], None] | None = None,
                ) -> Iterator[tuple[tuple[int, int], Any]]:
    """This rank's part of every text: ``((text index, rank), part)``, in input order.

    ``scorer_for(shard)`` loads this rank's model (and reference) and returns a scorer of the
    windows of ``shard=(rank, ranks)``: a :class:`Scorer`, or a ``compare.ReferenceScorer``
    (the same interface). Rank 0's part is the result (with its own windows' sums); the other
    ranks send only their sums (:func:`_sums`), which :func:`merge_parts` adds in.
    """
    me = distributed.rank()
    scorer = scorer_for((me, distributed.world_size()))
    for index, result in enumerate(scorer.score(texts, progress)):
        yield (index, me), (result if me == 0 else _sums(result))


def _sums(result: TextScore) -> tuple[float, ...] | None:
    """What a rank's windows add to a text: its NLL, and with a reference the comparison's sums
    (model NLL, reference NLL, KL, top-1 agreements)."""
    if result.metrics is None:
        return None
    d = result.divergence if isinstance(result, ComparedScore) else None
    if d is None:
        return (result.metrics.nll_sum,)
    return (d.nll_sum, d.reference_nll_sum, d.kl_sum, float(d.agree))


def merge_parts(parts: Iterable[Any]) -> Iterator[TextScore]:
    """Rank 0: each text's parts (one per rank, rank 0's first) as one result, the sums added
    exactly (``math.fsum``)."""
    ranks = distributed.world_size()
    parts = iter(parts)
    while group := list(islice(parts, ranks)):
        first = group[0]
        mine = _sums(first)
        if ranks == 1 or first.metrics is None or mine is None:
            yield first
            continue
        sums = [math.fsum(column) for column in zip(mine, *group[1:], strict=True)]
        metrics = dataclasses.replace(first.metrics, nll_sum=sums[0])
        if len(sums) == 1:
            yield dataclasses.replace(first, metrics=metrics)
            continue
        assert isinstance(first, ComparedScore) and first.divergence is not None
        divergence = dataclasses.replace(first.divergence, nll_sum=sums[0],
                                         reference_nll_sum=sums[1], kl_sum=sums[2],
                                         agree=round(sums[3]))
        yield dataclasses.replace(first, metrics=metrics, divergence=divergence)


# ----------------------------------------------------------------------------- score


def score_records(scorer_for: Callable[[tuple[int, int]], RecordScorer], items: Iterable[Item],
                  done: frozenset[Hashable] = frozenset(),
                  ) -> Iterator[tuple[int, RecordScore]]:
    """This rank's records, scored: ``(index, RecordScore)`` in input order.

    ``scorer_for(shard)`` loads this rank's model (and reference) and returns the
    :class:`RecordScorer` of ``shard=(rank, ranks)``: it scores every ranks-th read-ahead group
    of records, each in the batches one process would form (the same numbers, bit for bit).
    ``done``: the indices a resumed job has already written (:attr:`JobOutput.done`). They are
    passed on rather than dropped from ``items``: the groups, and so the batches, stay those of
    the job's first run, and a resumed file is the clean run's, byte for byte.
    """
    scorer = scorer_for((distributed.rank(), distributed.world_size()))
    for result in scorer.score(items, done=done):
        yield result.item.index, result
