"""Concurrent streaming clients against `nlgen serve` and llama.cpp's `llama-server`, in one run.

For each client count (--clients, default 1,8,32), one server at a time is started for that
count (`nlgen serve --model builtin --slots C`, then `llama-server -m GGUF -np C` on the same
model's GGUF file; with --slots S, one server per side with S slots serves every count),
waited for (GET /health: 200), warmed up with one request, and then C clients send --requests
streamed POST /v1/completions each, one after another, all clients at once. Every request is
greedy (temperature 0) for --max-tokens new tokens, its prompt an opening line of a novel (real
English prose, 32 of them, each request its own in turn).
Measured per server and client count:

  - total completion tokens/s: every completion token of the round over the round's wall time
    (from the first request sent to the last answer's end);
  - time to first token (TTFT): from sending a request to the first event carrying text,
    median and p95 over the round's requests;
  - request latency (sending to the end of the stream), median and p95;

and nlgen / llama-server for each. Completion tokens are what each server's usage says
(`stream_options.include_usage`; llama-server puts its usage in the last chunk), or the number
of text events where a stream carries none. llama-server is asked to ignore EOS, so it always
makes --max-tokens tokens; nlgen has no such field, so an answer that ends early at EOS counts
the tokens it made (the notes say how many). The line "warm server, 1 client" is the TTFT of
a few lone requests on a server that has answered once already (nlgen's target: under 0.2 s).

The servers never run together, and none is left running on exit or Ctrl-C. The load average
(`uptime`) is printed at the start and the end: on a machine with other work, compare the
rows of one run, not its absolute speeds. Clients are threads in this process: on a small
machine they take some CPU from the server under test (alike for both servers).

llama-server is built by `benchmarks/build_llama_cpp.sh`; it is looked for in
$NLGEN_LLAMA_CPP_BIN, then in ${NLGEN_BENCH_CACHE:-~/.cache/nlgen-bench}/bin, and its rows are
skipped with a note when missing.

    python benchmarks/bench_serve.py [--clients 1,8,32] [--max-tokens 64] [--requests 2]
    python benchmarks/bench_serve.py --quick     # smoke run: 1 and 2 clients, 8 tokens, 1 request,
                                                 # one server per side; no file without --out
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
WARM_PROMPT = "Once upon a time"
TTFT_PROBES = 5  # lone requests for the warm-server TTFT line (2 with --quick)
TTFT_TARGET = 0.2  # seconds: nlgen's target for a lone request on a warm server
START_TIMEOUT = 600.0  # seconds for a server to answer GET /health with 200

# Opening lines of novels (public domain): real prose of varied length and style.
PROMPTS = [
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was "
    "the age of foolishness.",
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money "
    "in my purse, and nothing particular to interest me on shore, I thought I would sail about "
    "a little and see the watery part of the world.",
    "Happy families are all alike; every unhappy family is unhappy in its own way.",
    "In my younger and more vulnerable years my father gave me some advice that I've been "
    "turning over in my mind ever since.",
    "There was no possibility of taking a walk that day.",
    "Whether I shall turn out to be the hero of my own life, or whether that station will be "
    "held by anybody else, these pages must show.",
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
    "nothing to do.",
    "You will rejoice to hear that no disaster has accompanied the commencement of an "
    "enterprise which you have regarded with such evil forebodings.",
    "Mr. Sherlock Holmes, who was usually very late in the mornings, save upon those not "
    "infrequent occasions when he was up all night, was seated at the breakfast table.",
    "Squire Trelawney, Dr. Livesey, and the rest of these gentlemen having asked me to write "
    "down the whole particulars about Treasure Island, from the beginning to the end, keeping "
    "nothing back but the bearings of the island, I take up my pen.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy "
    "disposition, seemed to unite some of the best blessings of existence.",
    "Marley was dead: to begin with. There is no doubt whatever about that.",
    "The studio was filled with the rich odour of roses, and when the light summer wind "
    "stirred amidst the trees of the garden, there came through the open door the heavy scent "
    "of the lilac.",
    "Once upon a time and a very good time it was there was a moocow coming down along the "
    "road.",
    "Mrs. Dalloway said she would buy the flowers herself.",
    "The family of Dashwood had long been settled in Sussex.",
    "Stately, plump Buck Mulligan came from the stairhead, bearing a bowl of lather on which a "
    "mirror and a razor lay crossed.",
    "All children, except one, grow up.",
    "Dorothy lived in the midst of the great Kansas prairies, with Uncle Henry, who was a "
    "farmer, and Aunt Em, who was the farmer's wife.",
    "You don't know about me without you have read a book by the name of The Adventures of "
    "Tom Sawyer; but that ain't no matter.",
    "Robert Cohn was once middleweight boxing champion of Princeton.",
    "Under certain circumstances there are few hours in life more agreeable than the hour "
    "dedicated to the ceremony known as afternoon tea.",
    "No one would have believed in the last years of the nineteenth century that this world "
    "was being watched keenly and closely by intelligences greater than man's.",
    "The Time Traveller (for so it will be convenient to speak of him) was expounding a "
    "recondite matter to us.",
    "Buck did not read the newspapers, or he would have known that trouble was brewing, not "
    "alone for himself, but for every tide-water dog, strong of muscle and with warm, long "
    "hair, from Puget Sound to San Diego.",
    "It was a dark and stormy night; the rain fell in torrents, except at occasional "
    "intervals, when it was checked by a violent gust of wind which swept up the streets.",
    "Christmas won't be Christmas without any presents, grumbled Jo, lying on the rug.",
    "In the late summer of that year we lived in a house in a village that looked across the "
    "river and the plain to the mountains.",
    "The cold passed reluctantly from the earth, and the retiring fogs revealed an army "
    "stretched out on the hills, resting.",
    "I first heard of Antonia on what seemed to me an interminable journey across the great "
    "midland plain of North America.",
    "Miss Brooke had that kind of beauty which seems to be thrown into relief by poor dress.",
]


@dataclass
class Row:
    measure: str
    nlgen: str
    baseline: str
    ratio: str


@dataclass
class Answer:
    """One streamed request, as its client saw it."""

    ttft: float  # seconds from sending to the first event with text
    latency: float  # seconds from sending to the end of the stream
    tokens: int  # completion tokens (the usage, or the text events)
    from_usage: bool
    finish: str | None


@dataclass
class Round:
    """C clients, each sending its requests in turn."""

    wall: float
    answers: list[Answer] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(a.tokens for a in self.answers)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall


def load_average() -> str:
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout
        return out.strip()
    except (OSError, subprocess.CalledProcessError):
        return "loadavg " + Path("/proc/loadavg").read_text().strip()


def find_llama_server() -> Path | None:
    """The llama-server binary, or None."""
    places = []
    if os.environ.get("NLGEN_LLAMA_CPP_BIN"):
        places.append(Path(os.environ["NLGEN_LLAMA_CPP_BIN"]))
    cache = os.environ.get("NLGEN_BENCH_CACHE") or Path.home() / ".cache" / "nlgen-bench"
    places.append(Path(cache) / "bin")
    for place in places:
        if os.access(place / "llama-server", os.X_OK):
            return place / "llama-server"
    return None


def llama_version(binary: Path) -> str:
    """`llama-server --version`'s first line ("version: N (commit)"), or "?"."""
    try:
        res = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for line in (res.stdout + res.stderr).splitlines():
        if line.startswith("version"):
            return line.strip()
    return "?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (q in 0..100)."""
    ordered = sorted(xs)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100), at least the first
    return ordered[int(rank) - 1]


class Server:
    """A server process: started, waited for, and always stopped (a context manager)."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict) -> None:
        self.name, self.cmd, self.port, self.env = name, cmd, port, env
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()
        self.started = 0.0

    def __enter__(self) -> Server:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.perf_counter() + START_TIMEOUT
        while time.perf_counter() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before it "
                                   f"answered:\n{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
                conn.request("GET", "/health")
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer /health with 200 in {START_TIMEOUT:.0f} "
                           f"s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        self.log.seek(0)
        return "\n".join(self.log.read().decode("utf-8", "replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (nlgen drains what is in flight: nothing, here), then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.log.close()


def stream_request(port: int, body: dict, timeout: float = 600.0) -> Answer:
    """POST /v1/completions with stream: true; timed from sending to the stream's end."""
    payload = json.dumps(body).encode("utf-8")
    started = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=payload,
                     headers={"Content-Type": "application/json",
                              "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        ttft = None
        events = 0
        usage = None
        finish = None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[len(b"data:"):].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error in the stream: {chunk['error']}")
            for choice in chunk.get("choices") or ():
                if choice.get("text"):
                    events += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
            if isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"]
        latency = time.perf_counter() - started
    finally:
        conn.close()
    if ttft is None:
        raise RuntimeError(f"no text in the stream (finish_reason {finish})")
    if usage is not None and "completion_tokens" in usage:
        return Answer(ttft, latency, int(usage["completion_tokens"]), True, finish)
    return Answer(ttft, latency, events, False, finish)


def request_body(prompt: str, max_tokens: int, llama: bool) -> dict:
    body = {"model": "builtin", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if llama:
        # Exactly max_tokens tokens; every prompt read in full, as nlgen (no prompt cache) does.
        body.update(ignore_eos=True, cache_prompt=False)
    return body


def run_round(port: int, clients: int, requests: int, max_tokens: int, llama: bool) -> Round:
    """`clients` threads, each sending `requests` streamed requests in turn, all at once."""
    answers: list[Answer] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        try:
            barrier.wait()
            for r in range(requests):
                prompt = PROMPTS[(r * clients + i) % len(PROMPTS)]
                answer = stream_request(port, request_body(prompt, max_tokens, llama))
                with lock:
                    answers.append(answer)
        except BaseException as exc:  # reported by the main thread
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed; the first: {errors[0]}")
    return Round(wall, answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,32",
                        help="client counts, comma-separated (default 1,8,32)")
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="max_tokens of every request (default 64)")
    parser.add_argument("--requests", type=int, default=2,
                        help="requests each client sends in turn (default 2)")
    parser.add_argument("--slots", type=int, default=None,
                        help="nlgen --slots and llama-server -np: one server per side for every "
                        "client count (default: a server per client count, with as many slots)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for llama-server (default: torch's, which nlgen uses)")
    parser.add_argument("--no-llama", action="store_true", help="run nlgen serve only")
    parser.add_argument("--out", default=None,
                        help="default benchmarks/results/serve.md (none with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 and 2 clients, 8 tokens, 1 request each, one server per "
                        "side (--slots 2); writes no file unless --out is given")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.max_tokens, args.requests, args.slots = "1,2", 8, 1, 2
    out = args.out or (None if args.quick else "benchmarks/results/serve.md")
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.requests < 1 or args.max_tokens < 1 or (
            args.slots is not None and args.slots < 1):
        parser.error("--clients, --requests, --max-tokens and --slots must be positive")
    n, reps = args.max_tokens, args.requests
    probes = 2 if args.quick else TTFT_PROBES

    # Ctrl-C and SIGTERM both end the run through the finally clauses: no server is left.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    load_start = load_average()
    print(f"load at start: {load_start}", file=sys.stderr, flush=True)

    import torch
    import transformers

    from nlgen.models import spec

    threads = args.threads or torch.get_num_threads()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    gguf = spec.builtin_gguf_path()
    notes: list[str] = []
    llama = None if args.no_llama else find_llama_server()
    if llama is None and not args.no_llama:
        notes.append("llama-server rows skipped: no llama-server in $NLGEN_LLAMA_CPP_BIN or "
                     "the bench cache (run benchmarks/build_llama_cpp.sh)")
        print(notes[-1], file=sys.stderr, flush=True)

    def nlgen_cmd(port: int, slots: int) -> list[str]:
        return [sys.executable, "-m", "nlgen", "serve", "--model", "builtin", "--host", HOST,
                "--port", str(port), "--slots", str(slots),
                "--max-queue", str(max(64, *counts))]  # no 503 while clients wait for slots

    def llama_cmd(port: int, slots: int) -> list[str]:
        per_slot = max(512, n + 256)  # a prompt and max_tokens fit each slot
        assert llama is not None
        return [str(llama), "-m", str(gguf), "--host", HOST, "--port", str(port),
                "-np", str(slots), "-c", str(slots * per_slot), "-t", str(threads)]

    sides = {"nlgen": nlgen_cmd} | ({"llama-server": llama_cmd} if llama else {})
    rounds: dict[tuple[str, int], Round] = {}
    lone: dict[str, list[float]] = {}
    startup: dict[str, list[float]] = {name: [] for name in sides}
    # A server per client count with as many slots, or (--slots) one per side for them all.
    groups = [(args.slots, counts)] if args.slots else [(c, [c]) for c in counts]
    for slots, group in groups:
        for name, make in sides.items():  # one server at a time, the next once it is gone
            port = free_port()
            is_llama = name == "llama-server"
            with Server(name, make(port, slots), port, env) as server:
                startup[name].append(time.perf_counter() - server.started)
                stream_request(port, request_body(WARM_PROMPT, n, is_llama))  # warm-up
                if name not in lone:  # the warm-server TTFT line: lone requests, in turn
                    lone[name] = [stream_request(port, request_body(PROMPTS[i], 8, is_llama)).ttft
                                  for i in range(probes)]
                for clients in group:
                    result = run_round(port, clients, reps, n, is_llama)
                    rounds[(name, clients)] = result
                    ttfts = [a.ttft for a in result.answers]
                    print(f"{name}, {clients} client(s): {result.tokens} tokens in "
                          f"{result.wall:.2f} s = {result.tps:.1f} tok/s; TTFT p50 "
                          f"{statistics.median(ttfts):.3f} s", file=sys.stderr, flush=True)

    rows: list[Row] = []

    def add(measure: str, ours: float, theirs: float | None, unit: str, fmt: str,
            better: str) -> None:
        base = "-" if theirs is None else f"{theirs:{fmt}} {unit}"
        ratio = "-" if not theirs else f"{ours / theirs:.2f} ({better}, nlgen / llama-server)"
        rows.append(Row(measure, f"{ours:{fmt}} {unit}", base, ratio))

    a = lone["nlgen"]
    b = lone.get("llama-server")
    add(f"warm server, 1 client: TTFT, median of {probes} lone requests (target < "
        f"{TTFT_TARGET} s: {'met' if statistics.median(a) < TTFT_TARGET else 'NOT met'})",
        statistics.median(a), statistics.median(b) if b else None, "s", ".3f", "time")
    for clients in counts:
        ours = rounds[("nlgen", clients)]
        theirs = rounds.get(("llama-server", clients))
        what = f"{clients} client(s) x {reps} request(s), max_tokens {n}"
        ttft_a = [x.ttft for x in ours.answers]
        lat_a = [x.latency for x in ours.answers]
        ttft_b = [x.ttft for x in theirs.answers] if theirs else None
        lat_b = [x.latency for x in theirs.answers] if theirs else None
        add(f"{what}: total completion tokens/s", ours.tps, theirs.tps if theirs else None,
            "tok/s", ".1f", "speed")
        add(f"{what}: TTFT p50", statistics.median(ttft_a),
            statistics.median(ttft_b) if ttft_b else None, "s", ".3f", "time")
        add(f"{what}: TTFT p95", percentile(ttft_a, 95),
            percentile(ttft_b, 95) if ttft_b else None, "s", ".3f", "time")
        add(f"{what}: request latency p50", statistics.median(lat_a),
            statistics.median(lat_b) if lat_b else None, "s", ".2f", "time")
        add(f"{what}: request latency p95", percentile(lat_a, 95),
            percentile(lat_b, 95) if lat_b else None, "s", ".2f", "time")
        rows.append(Row(f"{what}: completion tokens (round wall time)",
                        f"{ours.tokens} ({ours.wall:.2f} s)",
                        f"{theirs.tokens} ({theirs.wall:.2f} s)" if theirs else "-", "-"))
    for (name, clients), result in rounds.items():
        short = [x for x in result.answers if x.tokens < n]
        if short:
            notes.append(f"{name}, {clients} client(s): {len(short)} of {len(result.answers)} "
                         f"answers ended before max_tokens (EOS or a stop), "
                         f"{min(x.tokens for x in short)} tokens the shortest; tokens/s counts "
                         "the tokens made.")
        if not all(x.from_usage for x in result.answers):
            notes.append(f"{name}, {clients} client(s): no usage in some streams; their tokens "
                         "are counted as text events.")

    load_end = load_average()
    print(f"load at end: {load_end}", file=sys.stderr, flush=True)
    cpu = platform.processor() or platform.machine()
    started = ", ".join(f"{name} {statistics.median(ts):.1f} s" for name, ts in startup.items())
    notes.append(f"server start to GET /health 200 (median): {started}.")
    if llama:
        notes.append(f"llama-server {llama_version(llama)} from {llama.parent}: `-np S -c "
                     f"S*{max(512, n + 256)} -t {threads}` for S slots, the GGUF's quantized "
                     "weights as they are; requests add `ignore_eos: true` (exactly max_tokens "
                     "tokens) and `cache_prompt: false` (every prompt read in full, as nlgen "
                     "reads it).")
    notes.append(f"prompts: the opening lines of {len(PROMPTS)} novels (public domain), request "
                 "k of a round taking line k; one warm-up request per server first; clients "
                 "are threads of the benchmark process (plain http.client), a new connection "
                 "per request.")
    servers = (f"`nlgen serve --slots {args.slots}` against `llama-server -np {args.slots}` "
               "for every client count" if args.slots else
               "`nlgen serve --slots C` against `llama-server -np C` for C clients")
    command = "python benchmarks/bench_serve.py" + (
        " " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
        f"model: builtin (SmolLM2-135M-Instruct, {gguf.name}); {servers}, one server at a "
        f"time; streamed /v1/completions, greedy (temperature 0), max_tokens {n}, {reps} "
        "request(s) per client in turn.",
        "",
        f"Load at start: `{load_start}`",
        "",
        "| measure | nlgen | llama-server | ratio |",
        "| --- | --- | --- | --- |",
        *[f"| {r.measure} | {r.nlgen} | {r.baseline} | {r.ratio} |" for r in rows],
        "",
        f"Load at end: `{load_end}`",
        "",
        *[f"- {note}" for note in notes],
    ]
    report = "\n".join(lines).rstrip() + "\n"
    print(report)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(report, encoding="utf-8")
        os.replace(tmp, path)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the servers were stopped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
