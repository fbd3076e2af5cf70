"""Data parallelism on a small machine: one process with 2 threads against two with 1 each.

Two jobs on the built-in model, each run as a user runs it (whole processes, model loading
included, the same command line):

  1. ``nlgen generate``: 64 prompts x 32 new tokens, greedy, ``--output`` to a file;
  2. ``nlgen perplexity``: one text of 10,000 tokens (the test corpus, repeated and cut).

``one``: ``OMP_NUM_THREADS=2 nlgen ...``; ``two``: ``OMP_NUM_THREADS=1 torchrun
--nproc_per_node 2 -m nlgen ...``. Runs are interleaved (one, two, one, two, ...) and the
median wall time of each is reported, with ratio = one / two (above 1: two processes faster).
The share of prompts whose greedy text is identical in both runs, and the relative difference
of the two perplexities, are reported too. The load average is printed before and after: on a
shared machine, rerun when it is not near zero.

    python benchmarks/bench_parallel.py                 # the real run (a few minutes)
    python benchmarks/bench_parallel.py --smoke         # seconds: 4 prompts x 4 tokens, 600 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "corpus.txt"


def prompts(count: int) -> list[str]:
    """Openings of the corpus's sentences: unequal lengths, as in a real prompt file."""
    words = CORPUS.read_text(encoding="utf-8").split()
    return [" ".join(words[(i * 37) % (len(words) - 12):][: 4 + i % 9]) for i in range(count)]


def text_of(tokens: int, model: str) -> str:
    """The corpus, repeated, cut at `tokens` tokens of the model's tokenizer."""
    from nlgen.models import loading

    lm = loading.load_model(model, device="cpu", dtype="float32", purpose="score")
    corpus = CORPUS.read_text(encoding="utf-8")
    ids: list[int] = []
    while len(ids) < tokens:
        ids += lm.tokenizer(corpus, add_special_tokens=False)["input_ids"]
    return lm.tokenizer.decode(ids[:tokens])


def run(args: list[str], processes: int, env: dict) -> float:
    """Wall time of `nlgen ARGS` on `processes` processes (threads split between them)."""
    threads = str(max(1, 2 // processes))
    start = ([sys.executable, "-m", "nlgen"] if processes == 1 else
             [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
              str(processes), "-m", "nlgen"])
    started = time.perf_counter()
    proc = subprocess.run(start + args, env={**env, "OMP_NUM_THREADS": threads},
                          capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(start + args)}\n{proc.stderr[-2000:]}")
    return elapsed


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--dtype", default="auto", help="nlgen's --dtype for generate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    args = parser.parse_args()
    n_prompts, new_tokens, text_tokens = (4, 4, 600) if args.smoke else (64, 32, 10_000)
    repeats = 1 if args.smoke else args.repeats
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    print(f"load average before: {load()}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "prompts.txt").write_text("\n".join(prompts(n_prompts)) + "\n",
                                            encoding="utf-8")
        (folder / "text.txt").write_text(text_of(text_tokens, args.model), encoding="utf-8")
        jobs = {
            "generate": lambda out: ["generate", "--model", args.model, "--dtype", args.dtype,
                                     "--greedy", "-n", str(new_tokens), "-f",
                                     str(folder / "prompts.txt"), "--output", str(out)],
            "perplexity": lambda out: ["perplexity", "--model", args.model, "--format", "jsonl",
                                       str(folder / "text.txt"), "--output", str(out)],
        }
        times: dict[tuple[str, int], list[float]] = {}
        for repeat in range(repeats):
            for job, command in jobs.items():
                for processes in (1, 2):
                    out = folder / f"{job}-{processes}-{repeat}.jsonl"
                    elapsed = run(command(out), processes, env)
                    times.setdefault((job, processes), []).append(elapsed)
                    print(f"{job} x{processes}: {elapsed:.1f} s (load {load()})",
                          file=sys.stderr, flush=True)
        same = _same_text(folder / "generate-1-0.jsonl", folder / "generate-2-0.jsonl")
        drift = _ppl_drift(folder / "perplexity-1-0.jsonl", folder / "perplexity-2-0.jsonl")

    table = _table(times, n_prompts, new_tokens, text_tokens, same, drift, args, repeats)
    print(table)
    print(f"load average after: {load()}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _same_text(one: Path, two: Path) -> str:
    a, b = _rows(one), _rows(two)
    same = sum(x["completion"] == y["completion"] for x, y in zip(a, b))
    return f"{same} of {len(a)} ({100 * same / len(a):.0f}%)"


def _ppl_drift(one: Path, two: Path) -> str:
    (a,), (b,) = _rows(one), _rows(two)
    return f"{abs(a['perplexity'] - b['perplexity']) / a['perplexity']:.1e}"


def _table(times: dict, n_prompts: int, new_tokens: int, text_tokens: int, same: str,
           drift: str, args: argparse.Namespace, repeats: int) -> str:
    import torch
    import transformers

    lines = [
        f"Command: `python benchmarks/bench_parallel.py{' --smoke' if args.smoke else ''}`",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}; model: {args.model}, generate --dtype "
        f"{args.dtype}; medians of {repeats} interleaved runs, whole processes (model loading "
        "included).",
        "",
        "| job | 1 process, 2 threads | 2 processes, 1 thread each | ratio (1p / 2p) |",
        "| --- | --- | --- | --- |",
    ]
    labels = {"generate": f"generate {n_prompts} prompts x {new_tokens} tokens (greedy)",
              "perplexity": f"perplexity, one text of {text_tokens:,} tokens"}
    for job, label in labels.items():
        one = statistics.median(times[(job, 1)])
        two = statistics.median(times[(job, 2)])
        lines.append(f"| {label} | {one:.1f} s | {two:.1f} s | {one / two:.2f}x |")
    lines += ["", f"Greedy texts identical in both runs: {same}. Perplexity, relative "
                  f"difference between the runs: {drift}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
