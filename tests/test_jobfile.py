"""nlgen.jobs.jobfile: JSONL output that survives a kill and resumes with every key exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from nlgen.errors import OutputError
from nlgen.jobs.jobfile import ResumableWriter


def records(n):
    return [{"index": i, "text": f"record {i} é"} for i in range(n)]


def keys_in(path):
    return [json.loads(line)["index"] for line in path.read_text(encoding="utf-8").splitlines()]


def run_job(path, items, resume):
    """What a command does: skip the done keys, write the rest."""
    with ResumableWriter(path, "index", resume=resume) as writer:
        for record in items:
            if not writer.done(record["index"]):
                writer.write(record)
        return writer


def test_torn_last_line_is_dropped_and_the_job_finishes(tmp_path, caplog):
    clean, crashed = tmp_path / "clean.jsonl", tmp_path / "crashed.jsonl"
    run_job(clean, records(10), resume=False)
    run_job(crashed, records(6), resume=False)
    with crashed.open("ab") as f:  # a kill in the middle of record 6
        f.write(json.dumps(records(7)[6]).encode()[:13])
    writer = run_job(crashed, records(10), resume=True)
    assert writer.resumed == 6 and writer.dropped_bytes == 13
    assert "unfinished last record" in caplog.text
    assert keys_in(crashed) == list(range(10))
    assert crashed.read_bytes() == clean.read_bytes()


def test_without_resume_an_existing_file_is_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    run_job(path, records(2), resume=False)
    with pytest.raises(OutputError) as info:
        ResumableWriter(path, "index", resume=False)
    assert "--resume" in info.value.hint
    assert keys_in(path) == [0, 1]  # untouched
    (tmp_path / "empty.jsonl").touch()  # an empty file holds no work: fine
    ResumableWriter(tmp_path / "empty.jsonl", "index", resume=False).close()


def test_resume_without_a_file_starts_fresh(tmp_path):
    writer = run_job(tmp_path / "new.jsonl", records(3), resume=True)
    assert writer.resumed == 0 and keys_in(tmp_path / "new.jsonl") == [0, 1, 2]


def test_tuple_keys_and_duplicates(tmp_path):
    path = tmp_path / "seqs.jsonl"
    with ResumableWriter(path, ("index", "sequence"), resume=False) as w:
        assert w.write({"index": 0, "sequence": 0, "text": "a"})
        assert not w.write({"index": 0, "sequence": 0, "text": "again"})  # key done: skipped
    with ResumableWriter(path, ("index", "sequence"), resume=True) as w:
        assert w.done((0, 0)) and not w.done((0, 1))
        assert w.write({"index": 0, "sequence": 1, "text": "b"})
        assert w.done_keys == {(0, 0), (0, 1)}
    assert len(path.read_text().splitlines()) == 2


def test_a_foreign_line_is_an_error_not_data_loss(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"index": 0}\nnot json\n{"index": 2}\n')
    with pytest.raises(OutputError, match="line 2"):
        ResumableWriter(path, "index", resume=True)
    assert path.read_text().count("\n") == 3


def test_records_survive_kill_9(tmp_path):
    path = tmp_path / "killed.jsonl"
    script = (
        "import sys, time\n"
        "from nlgen.jobs.jobfile import ResumableWriter\n"
        "w = ResumableWriter(sys.argv[1], 'index', resume=False, fsync_every=10**9,\n"
        "                    fsync_interval_s=10**9)\n"  # never fsynced: flush alone must do
        "for i in range(10**6):\n"
        "    w.write({'index': i, 'pad': 'x' * 5000})\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=ROOT)
    deadline = time.monotonic() + 30
    while (not path.exists() or path.stat().st_size < 200_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    writer = ResumableWriter(path, "index", resume=True)
    writer.close()
    done = writer.resumed
    assert done >= 40  # every record written before the kill is there, nothing fsynced
    run_job(path, [{"index": i, "pad": "x" * 5000} for i in range(done + 5)], resume=True)
    assert keys_in(path) == list(range(done + 5))
