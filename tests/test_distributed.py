"""nlgen.jobs.distributed: two real processes under torchrun (gloo, CPU), and one-process no-ops."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

from nlgen.jobs import distributed

# Runs on each rank; writes what it saw to rank<N>.json in the folder given as argv[1].
WORKER = textwrap.dedent("""
    import json, sys, time
    from contextlib import closing
    from pathlib import Path
    from nlgen.jobs import distributed as d
    from nlgen.errors import InputError

    out = Path(sys.argv[1])
    seen = {}
    finished = []  # when this rank finished each item of its own

    def work(pairs, slow=0.0, fail_at=None, fail=ValueError("bad item")):
        for i, x in pairs:
            if i == fail_at:
                raise fail
            time.sleep(slow * (i % 3))  # unequal work: rank 1 is the slow one below
            yield i, {"item": x, "by": d.rank()}
            finished.append(time.monotonic())

    def attempt(name, source, **kw):
        try:
            seen[name] = list(d.gather_in_order(source, **kw))
        except d.DistributedError as exc:
            seen[name] = ["DistributedError", exc.message, exc.origin_rank, exc.exit_code]
        except Exception as exc:
            seen[name] = [type(exc).__name__, str(exc)]

    with d.session("cpu", timeout_s=60):
        me = d.rank()
        seen["who"] = [me, d.world_size(), d.local_rank(), d.is_main_process()]
        # 10 items, round-robin; rank 1's items take longer.
        items = d.shard(enumerate(f"item{i}" for i in range(10)))
        seen["ten"], yielded = [], []
        for pair in d.gather_in_order(work(items, slow=0.03 if me == 1 else 0.0), round_size=2):
            seen["ten"].append(pair)
            yielded.append(time.monotonic())
        seen["ten_yielded"], seen["ten_finished"] = yielded, finished[:]
        # Unequal shares: 3 items (2 and 1), then 1 item (rank 1 has none), gaps in the keys.
        attempt("three", work(d.shard([(0, "a"), (4, "b"), (9, "c")])), round_size=1)
        attempt("one", work(d.shard([(5, "only")])), round_size=3)
        # Several results per key, as with --num-return-sequences: (index, sequence) keys.
        seqs = (((i, s), s) for i in d.shard(range(5)) for s in range(2))
        attempt("seqs", seqs, round_size=3)
        # A failure on rank 1 (its second item) stops both ranks, rank 0 included.
        attempt("fail", work(d.shard(enumerate("abcdefgh")), fail_at=3), round_size=1)
        attempt("fail_nlgen", work(d.shard(enumerate("abcdefgh")), fail_at=4,
                                   fail=InputError("prompt 5 is empty")), round_size=1)
        # Rank 0 stops reading after 3 results: rank 1 is told to stop, nobody hangs.
        if me == 0:
            with closing(d.gather_in_order(work(d.shard(enumerate(range(40)))))) as it:
                seen["early"] = [next(it)[0] for _ in range(3)]
        else:
            attempt("early", work(d.shard(enumerate(range(40)))))
        # Exact sums, the same on both ranks; and the collectives still line up after all that.
        values = [[0.1, 1e16, 2.0**-60, 3.0], [0.2, 1.0, 1.0, -3.0]][me]
        seen["sums"] = d.reduce_sums(values)
        seen["broadcast"] = d.broadcast_object({"done": [1, 2]} if me == 0 else None)
    (out / f"rank{me}.json").write_text(json.dumps(seen))
""")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run WORKER on two ranks with torchrun; what each rank saw."""
    folder = tmp_path_factory.mktemp("dist")
    script = folder / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(folder)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def test_ranks_know_who_they_are(ranks):
    assert ranks[0]["who"] == [0, 2, 0, True]
    assert ranks[1]["who"] == [1, 2, 1, False]


def test_rank0_gets_every_result_in_input_order(ranks):
    ten = ranks[0]["ten"]
    assert [key for key, _ in ten] == list(range(10))
    assert [r["item"] for _, r in ten] == [f"item{i}" for i in range(10)]
    assert [r["by"] for _, r in ten] == [0, 1] * 5  # round-robin
    assert ranks[1]["ten"] == []  # the other ranks send theirs and yield nothing
    # Streamed: rank 0 had its first results while rank 1 was still at work.
    assert ranks[0]["ten_yielded"][0] < ranks[1]["ten_finished"][-1]


def test_unequal_shares_and_gaps(ranks):
    assert [k for k, _ in ranks[0]["three"]] == [0, 4, 9]
    assert [k for k, _ in ranks[0]["one"]] == [5]
    assert ranks[1]["three"] == ranks[1]["one"] == []


def test_several_results_per_key(ranks):
    assert [k for k, _ in ranks[0]["seqs"]] == [[i, s] for i in range(5) for s in range(2)]


def test_a_failure_stops_every_rank(ranks):
    assert ranks[1]["fail"] == ["ValueError", "bad item"]  # its own exception
    assert ranks[0]["fail"] == ["DistributedError", "rank 1 failed: ValueError: bad item", 1, 1]
    # A user error (NlgenError) keeps its message and exit code on the other ranks.
    assert ranks[0]["fail_nlgen"] == ["InputError", "prompt 5 is empty"]
    assert ranks[1]["fail_nlgen"] == ["DistributedError", "prompt 5 is empty", 0, 1]


def test_rank0_stopping_early_stops_the_others(ranks):
    assert ranks[0]["early"] == [0, 1, 2]
    assert ranks[1]["early"] == []


def test_reduce_sums_is_exact_and_the_same_everywhere(ranks):
    expected = [math.fsum(c) for c in zip([0.1, 1e16, 2.0**-60, 3.0], [0.2, 1.0, 1.0, -3.0])]
    assert ranks[0]["sums"] == ranks[1]["sums"] == expected
    assert ranks[1]["broadcast"] == {"done": [1, 2]}


def test_one_process_is_a_no_op(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (
        0, 1, True)
    assert distributed.device_for_rank("auto") == "auto"
    with distributed.session("cpu"):
        pairs = [(0, "a"), (2, "b")]
        assert list(distributed.gather_in_order(iter(pairs))) == pairs
        assert distributed.reduce_sums([1, 2.5]) == [1.0, 2.5]
        assert list(distributed.shard("abc")) == ["a", "b", "c"]
    assert list(distributed.shard(range(10), this_rank=1, ranks=3)) == [1, 4, 7]


def test_bad_environment_is_a_usage_error(monkeypatch):
    from nlgen.errors import UsageError

    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UsageError, match="WORLD_SIZE"):
        distributed.world_size()


def test_importing_does_not_import_torch():
    code = ("import sys, nlgen.jobs.distributed, nlgen.engine.sampling, nlgen.jobs.jobfile\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
