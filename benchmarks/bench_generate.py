"""Side-by-side benchmark of `nlgen generate` against plain transformers and llama.cpp, in one run.

Measures, on the same machine in the same run:
  1. `nlgen --help` wall time (whole process);
  2. a new `nlgen generate "Once upon a time" -n 128` process against plain transformers scripts
     doing the same from the SAME converted safetensors copy nlgen loads (float32, and
     bfloat16), and against a `llama-completion` process on the GGUF file;
  3. time to the first streamed token of `nlgen generate --stream` (and of llama-completion):
     from process start to the first byte after the echoed prompt;
  4. single-prompt tokens/s: nlgen (dtype auto, and float32) against a plain `generate()` call
     on the same weights, same options, and against `llama-bench` tg128 at the same threads;
  5. throughput for 32 prose prompts x 32 tokens: `generate -f` batched against one by one,
     from each process's own `-v` summary (generation time, loading excluded);
  6. quality: the perplexity of a held-out prose text scored token by token through the
     forward that decoding runs (dtype auto: int4 weights, bfloat16), against float32.

With --before DIR (a checkout of an earlier nlgen, e.g. from `git worktree add`), rows 2, 3 and
5 also run that tree's `nlgen generate` processes, and its own `-v` summary gives its tokens/s.

All decoding is greedy with exactly --new-tokens new tokens (EOS ignored), so every side does
the same amount of work. Runs are interleaved (A B C A B C ...) after one untimed warm-up round
(file cache and the converted-model cache warm), and medians are reported, so that drift on a
shared machine affects all sides alike. The load average (`uptime`) is printed at the start
and the end: compare rows of a loaded run, not its absolute speeds.

The llama.cpp rows need llama-bench and llama-completion, built by
`benchmarks/build_llama_cpp.sh`; they are looked for in $NLGEN_LLAMA_CPP_BIN, then in
${NLGEN_BENCH_CACHE:-~/.cache/nlgen-bench}/bin, and skipped with a note when missing.

    python benchmarks/bench_generate.py [--repeats 3] [--out benchmarks/results/generate.md]
    python benchmarks/bench_generate.py --quick     # smoke run: 1 repeat, 8 tokens, no file
    python benchmarks/bench_generate.py --before ../nlgen-before   # with an earlier tree's rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time"
PROSE = ROOT / "examples" / "data" / "garden.txt"
DRIFT_TOKENS = 4096  # at most this many tokens of held-out prose for the quality rows

# The plain transformers way, as a user would write it: load the float32 safetensors copy that
# nlgen converted from the GGUF file once (argv[1]), in argv[2]'s dtype, generate, print.
PLAIN_SCRIPT = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
source, dtype, n, prompt = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(source)
model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
inputs = tok(prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
"""


@dataclass
class Row:
    measure: str
    nlgen: str
    baseline: str
    ratio: str


def wall(cmd: list[str], env: dict, cwd: str | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def first_token(cmd: list[str], env: dict, prompt: str, timeout: float = 300,
                cwd: str | None = None) -> float:
    """Seconds from process start to the first byte of generated text on its stdout.

    Both nlgen and llama-completion echo the prompt before generating, and that echo comes only
    after the model has loaded, so it is not a token: the clock stops at the first byte that
    arrives after the whole prompt has been seen. Decoding runs with a minimum length, so that
    byte is a token's text, not the final newline of an early EOS. Both flush each piece as it
    is decoded (a piece can hold back an incomplete UTF-8 character: what a reader sees is what
    counts). The process is stopped once it has been seen.
    """
    target = prompt.encode()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    fd, seen = proc.stdout.fileno(), b""
    try:
        while time.perf_counter() - started < timeout:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            now = time.perf_counter() - started
            if not chunk:
                break
            seen += chunk
            at = seen.find(target)
            if at >= 0 and len(seen) > at + len(target):
                return now
        raise RuntimeError(f"no generated text after the prompt from {cmd[0]}: {seen[-200:]!r}")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def tree_label(path: str) -> str:
    """``git describe`` of a checkout, for the row's name."""
    try:
        return subprocess.run(["git", "-C", path, "log", "-1", "--format=%h"], check=True,
                              capture_output=True, text=True).stdout.strip() or path
    except (OSError, subprocess.CalledProcessError):
        return path


def summary_tps(cmd: list[str], env: dict, cwd: str | None = None) -> float:
    """tokens/s from an nlgen process's own `-v` summary line on stderr."""
    res = subprocess.run(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, check=True)
    found = re.findall(r"([\d.]+) tokens/s", res.stderr)
    if not found:
        raise RuntimeError(f"no tokens/s in the summary of {cmd}: {res.stderr[-300:]!r}")
    return float(found[-1])


HELD_OUT_NAME = "LICENSE"


def held_out_prose() -> str:
    """Real prose the model was not tuned on: the installed transformers' license text."""
    import importlib.metadata

    dist = importlib.metadata.distribution("transformers")
    for f in dist.files or []:
        if f.name == HELD_OUT_NAME or f.name.startswith("LICENSE"):
            return Path(dist.locate_file(f)).read_text(encoding="utf-8")
    raise RuntimeError("the installed transformers ships no LICENSE file")


def stepwise_perplexity(lm, ids) -> float:
    """exp(mean NLL) of ids[1:], each token scored by the one-token step decoding runs."""
    import torch

    from nlgen.engine import decode

    step = decode.stepper(lm, ids.shape[1])
    nll = 0.0
    with torch.inference_mode():
        logits = step(ids[:, :1], 0)
        for i in range(1, ids.shape[1]):
            nll -= float(torch.log_softmax(logits, dim=-1)[0, ids[0, i]])
            logits = step(ids[:, i:i + 1], i)
    return float(torch.exp(torch.tensor(nll / (ids.shape[1] - 1))))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def load_average() -> str:
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout
        return out.strip()
    except (OSError, subprocess.CalledProcessError):
        return "loadavg " + Path("/proc/loadavg").read_text().strip()


def find_llama_cpp() -> Path | None:
    """The folder that holds llama-bench and llama-completion, or None."""
    places = []
    if os.environ.get("NLGEN_LLAMA_CPP_BIN"):
        places.append(Path(os.environ["NLGEN_LLAMA_CPP_BIN"]))
    cache = os.environ.get("NLGEN_BENCH_CACHE") or Path.home() / ".cache" / "nlgen-bench"
    places.append(Path(cache) / "bin")
    for place in places:
        if all(os.access(place / b, os.X_OK) for b in ("llama-bench", "llama-completion")):
            return place
    return None


def prose_prompts(count: int) -> list[str]:
    """`count` sentences of real prose (cycled if the file has fewer): varied lengths, as in use."""
    paragraphs = re.split(r"\n\s*\n", PROSE.read_text(encoding="utf-8"))
    sentences = [s.strip() for p in paragraphs if p.rstrip().endswith((".", "!", "?"))  # no title
                 for s in re.split(r"(?<=[.!?])\s+", " ".join(p.split()))]
    return [sentences[i % len(sentences)] for i in range(count)]


def ratio(a: float, b: float, what: str) -> str:
    return f"{a / b:.2f} ({what})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for llama.cpp (default: torch's, which nlgen uses)")
    parser.add_argument("--before", default=None,
                        help="a checkout of an earlier nlgen to time beside this one")
    parser.add_argument("--out", default=None,
                        help="default benchmarks/results/generate.md (none with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repeat, 8 new tokens, 8 prompts; writes no file "
                        "unless --out is given")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.new_tokens = 1, 8
    out = args.out or (None if args.quick else "benchmarks/results/generate.md")
    n, reps = args.new_tokens, args.repeats
    n_prompts, batch_tokens = (8, 8) if args.quick else (32, 32)

    load_start = load_average()
    print(f"load at start: {load_start}", file=sys.stderr, flush=True)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from nlgen.engine import lean_weights
    from nlgen.engine.generation import GenerationOptions, generate
    from nlgen.models import loading, spec

    threads = args.threads or torch.get_num_threads()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    nlgen = [sys.executable, "-m", "nlgen"]
    rows: list[Row] = []
    notes: list[str] = []

    def add(row: Row) -> None:
        rows.append(row)
        print(f"{row.measure}: {row.nlgen} | {row.baseline} | {row.ratio}", file=sys.stderr,
              flush=True)

    gguf = spec.builtin_gguf_path()
    auto_lm = loading.load_model("builtin", device="cpu", dtype="auto",  # converts once if needed
                                 lean_reader=lean_weights.read)
    source = auto_lm.source  # the safetensors copy nlgen loads: the plain scripts load it too
    # What dtype auto runs: bfloat16, with the GGUF's own int4 weights (--quantize auto).
    auto_label = auto_lm.dtype + ("" if auto_lm.quantization == "none"
                                  else f" + {auto_lm.quantization} weights")
    llama = find_llama_cpp()
    if llama is None:
        notes.append("llama.cpp rows skipped: no llama-bench/llama-completion in "
                     "$NLGEN_LLAMA_CPP_BIN or the bench cache (run benchmarks/build_llama_cpp.sh)")
        print(notes[-1], file=sys.stderr, flush=True)

    # 1. --help
    helps = [wall([*nlgen, "--help"], env) for _ in range(max(5, reps))]
    add(Row("`nlgen --help` (process wall time)", f"{median(helps):.3f} s", "-", "-"))

    # 2. a new process, greedy, exactly n new tokens; the ratio is nlgen's time over the other's
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(PLAIN_SCRIPT)
        plain_path = f.name
    procs = {
        "nlgen": [*nlgen, "generate", "--model", "builtin", "--greedy", "-n", str(n),
                  "--min-new-tokens", str(n), PROMPT],
        "nlgen --quantize none": [*nlgen, "generate", "--model", "builtin", "--greedy", "-n",
                                  str(n), "--min-new-tokens", str(n), "--quantize", "none",
                                  PROMPT],
        "plain float32": [sys.executable, plain_path, source, "float32", str(n), PROMPT],
        "plain bfloat16": [sys.executable, plain_path, source, "bfloat16", str(n), PROMPT],
    }

    def llama_completion(tokens: int) -> list[str]:
        # -no-cnv: the GGUF has a chat template, which would otherwise start a chat session.
        return [str(llama / "llama-completion"), "-m", str(gguf), "-p", PROMPT, "-n", str(tokens),
                "-t", str(threads), "--temp", "0", "--ignore-eos", "-no-cnv"]

    if llama:
        procs["llama-completion"] = llama_completion(n)
    # `python -m nlgen` imports the package from its working directory: the earlier tree's
    # processes run in that tree (PYTHONPATH too, for anything they start).
    cwds: dict[str, str | None] = {k: None for k in procs}
    envs = {k: env for k in procs}
    if args.before:
        before = f"nlgen before ({tree_label(args.before)})"
        procs[before] = procs["nlgen"]
        cwds[before] = str(Path(args.before).resolve())
        envs[before] = dict(env, PYTHONPATH=cwds[before])
    for name, cmd in procs.items():  # warm-up: file cache, first-run work
        wall(cmd, envs[name], cwds[name])
    times: dict[str, list[float]] = {k: [] for k in procs}
    for _ in range(reps):
        for name, cmd in procs.items():
            times[name].append(wall(cmd, envs[name], cwds[name]))
    ours = median(times["nlgen"])
    what = f"new process, `generate -n {n}` (wall time)"
    for name in procs:
        if name != "nlgen":
            theirs = median(times[name])
            add(Row(f"{what}: nlgen ({auto_label}) vs {name}", f"{ours:.2f} s",
                    f"{theirs:.2f} s", ratio(ours, theirs, "time, nlgen / baseline")))
    os.unlink(plain_path)

    # 3. time to the first streamed token, warm caches (the warm-up above loaded everything)
    ttft_cmds = {"nlgen": [*nlgen, "generate", "--model", "builtin", "--stream", "--greedy",
                           "-n", "16", "--min-new-tokens", "16", PROMPT]}
    if llama:
        ttft_cmds["llama-completion"] = llama_completion(16)
    if args.before:
        ttft_cmds[before] = ttft_cmds["nlgen"]
    first_token(ttft_cmds["nlgen"], env, PROMPT)  # warm-up
    ttft: dict[str, list[float]] = {k: [] for k in ttft_cmds}
    for _ in range(reps):
        for name, cmd in ttft_cmds.items():
            ttft[name].append(first_token(cmd, envs.get(name, env), PROMPT,
                                          cwd=cwds.get(name)))
    if args.before:
        a, b = median(ttft["nlgen"]), median(ttft[before])
        add(Row(f"first streamed token, from process start: nlgen vs {before}", f"{a:.2f} s",
                f"{b:.2f} s", ratio(a, b, "time, nlgen / baseline")))
    if llama:
        a, b = median(ttft["nlgen"]), median(ttft["llama-completion"])
        add(Row("first streamed token, from process start: `nlgen generate --stream` vs "
                "llama-completion", f"{a:.2f} s", f"{b:.2f} s",
                ratio(a, b, "time, nlgen / baseline")))
    else:
        add(Row("first streamed token, from process start: `nlgen generate --stream`",
                f"{median(ttft['nlgen']):.2f} s", "-", "-"))

    # 4. single prompt tokens/s, in process, the same weights
    same_dtype = getattr(torch, auto_lm.dtype)
    f32_lm = loading.load_model("builtin", device="cpu", dtype="float32")
    unquantized = {} if auto_lm.quantization == "none" else {
        "none": loading.load_model("builtin", device="cpu", dtype="auto", quantize="none")}
    plain = {"float32": AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()}
    if auto_lm.dtype != "float32":
        plain[auto_lm.dtype] = AutoModelForCausalLM.from_pretrained(source,
                                                                    dtype=same_dtype).eval()
    tokenizer = f32_lm.tokenizer
    opts = GenerationOptions(greedy=True, max_new_tokens=n, min_new_tokens=n)

    def nlgen_tps(lm) -> float:
        started = time.perf_counter()
        [result] = generate(lm, [PROMPT], opts)
        return result.completion_tokens / (time.perf_counter() - started)

    def plain_tps(model) -> float:
        inputs = tokenizer(PROMPT, return_tensors="pt")
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return (out.shape[1] - inputs["input_ids"].shape[1]) / (time.perf_counter() - started)

    def llama_tg() -> tuple[float, dict]:
        # tg{n}: n tokens decoded from an empty context; llama-bench warms up on its own.
        res = subprocess.run(
            [str(llama / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0",
             "-n", str(n), "-r", "1", "-o", "json"],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True)
        [record] = json.loads(res.stdout)
        return float(record["avg_ts"]), record

    nlgen_tps(auto_lm), [plain_tps(m) for m in plain.values()]  # warm-up: first-call allocations
    tps: dict[str, list[float]] = {"auto": [], "float32": [], "none": [],
                                   **{f"plain {k}": [] for k in plain}, "llama": []}
    llama_info: dict = {}
    for _ in range(reps):
        tps["auto"].append(nlgen_tps(auto_lm))
        tps["float32"].append(nlgen_tps(f32_lm))
        for lm in unquantized.values():
            tps["none"].append(nlgen_tps(lm))
        for k, model in plain.items():
            tps[f"plain {k}"].append(plain_tps(model))
        if llama:
            ts, llama_info = llama_tg()
            tps["llama"].append(ts)
    if args.before:  # the earlier tree's own summary line, in a process of its own each time
        for _ in range(reps):
            tps.setdefault("before", []).append(
                summary_tps(procs[before] + ["-v"], envs[before], cwds[before]))
    what = f"single prompt, {n} tokens"
    auto, f32 = median(tps["auto"]), median(tps["float32"])
    rows_tps = [(f"nlgen dtype auto ({auto_label}) vs plain transformers float32", auto,
                 "plain float32")]
    if unquantized:
        rows_tps.append((f"nlgen dtype auto vs nlgen --quantize none ({auto_lm.dtype})", auto,
                         "none"))
    if auto_lm.dtype != "float32":
        rows_tps.append((f"nlgen dtype auto vs plain transformers {auto_lm.dtype}", auto,
                         f"plain {auto_lm.dtype}"))
    rows_tps.append(("nlgen float32 vs plain transformers float32", f32, "plain float32"))
    if args.before:
        rows_tps.append((f"nlgen dtype auto vs {before} (its `-v` summary)", auto, "before"))
    for label, speed, key in rows_tps:
        base = median(tps[key])
        add(Row(f"{what}: {label}", f"{speed:.1f} tok/s", f"{base:.1f} tok/s",
                ratio(speed, base, "speed, nlgen / baseline")))
    if llama:
        tg = median(tps["llama"])
        add(Row(f"{what}: nlgen dtype auto ({auto_label}) vs llama.cpp `llama-bench` "
                f"tg{n}, {threads} threads ({llama_info.get('model_type', 'GGUF')})",
                f"{auto:.1f} tok/s", f"{tg:.1f} tok/s",
                ratio(auto, tg, "speed, nlgen / baseline")))
        notes.append(f"llama.cpp build {llama_info.get('build_commit', '?')} "
                     f"({llama_info.get('build_number', '?')}) from {llama}; llama.cpp runs the "
                     "GGUF's quantized weights as they are; nlgen's dtype auto runs its 4-bit "
                     "blocks too (torch's int4 kernel, bfloat16 arithmetic; the Q8_0 LM head "
                     "as its 8-bit blocks, two int4 products); the plain scripts run the float32 "
                     "copy "
                     "dequantized from them (or bfloat16). tg counts decode only, "
                     "from an empty context; the nlgen rows time the whole generate() call "
                     "(prompt included).")
    del plain, unquantized

    # 5. prose prompts: batched vs one by one, each a `generate -f` process whose own `-v`
    # summary gives its tokens/s (generation time only: loading is in rows 2 and 3)
    prompts = prose_prompts(n_prompts)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(prompts) + "\n")
        prompts_path = f.name
    trees = {"nlgen": "nlgen"} | ({before: before} if args.before else {})
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(max(1, reps - 1)):
        for tree in trees:
            for size in (n_prompts, 1):
                cmd = [*nlgen, "generate", "--model", "builtin", "-f", prompts_path, "--greedy",
                       "-n", str(batch_tokens), "--min-new-tokens", str(batch_tokens),
                       "--batch-size", str(size), "-v"]
                rates.setdefault((tree, size), []).append(
                    summary_tps(cmd, envs[tree], cwds[tree]))
    os.unlink(prompts_path)
    what = f"{n_prompts} prose prompts x {batch_tokens} tokens"
    for tree in trees:
        fast, slow = median(rates[(tree, n_prompts)]), median(rates[(tree, 1)])
        label = f"nlgen, {auto_label}" if tree == "nlgen" else tree
        add(Row(f"{what}: batch {n_prompts} vs one by one ({label})", f"{fast:.1f} tok/s",
                f"{slow:.1f} tok/s", ratio(fast, slow, "speed, batched / one by one")))
    if args.before:
        for size, how in ((n_prompts, f"batch {n_prompts}"), (1, "one by one")):
            a, b = median(rates[("nlgen", size)]), median(rates[(before, size)])
            add(Row(f"{what}, {how}: nlgen vs {before}", f"{a:.1f} tok/s", f"{b:.1f} tok/s",
                    ratio(a, b, "speed, nlgen / baseline")))

    # 6. quality of what decoding computes: held-out prose scored one token per step
    if auto_lm.quantization != "none" or auto_lm.dtype != "float32":
        text = held_out_prose()
        ids = f32_lm.tokenizer(text, return_tensors="pt")["input_ids"][:, :DRIFT_TOKENS]
        ref = stepwise_perplexity(f32_lm, ids)
        sides = [(f"dtype auto ({auto_label})", auto_lm)]
        if auto_lm.quantization != "none":
            sides.append((f"--quantize none ({auto_lm.dtype})",
                          loading.load_model("builtin", device="cpu", quantize="none")))
        for label, lm in sides:
            ppl = stepwise_perplexity(lm, ids)
            add(Row(f"perplexity of {ids.shape[1]} tokens of held-out prose, one decoding step "
                    f"per token: nlgen {label} vs nlgen float32", f"{ppl:.4f}", f"{ref:.4f}",
                    f"{100 * (ppl / ref - 1):+.2f}% (drift)"))
        notes.append(f"held-out prose for the drift rows: {HELD_OUT_NAME} of the installed "
                     f"transformers (Apache-2.0 text), {ids.shape[1]} tokens (the whole text "
                     f"up to {DRIFT_TOKENS}), each scored by one decoding step after the ones "
                     "before it.")

    load_end = load_average()
    print(f"load at end: {load_end}", file=sys.stderr, flush=True)
    cpu = platform.processor() or platform.machine()
    command = "python benchmarks/bench_generate.py " + (
        "--quick" if args.quick else f"--repeats {reps}") + (
        f" --before {args.before}" if args.before else "")
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
        f"model: builtin (SmolLM2-135M-Instruct, {gguf.name}); greedy, exactly {n} new tokens; "
        f"medians of {reps} interleaved runs after one warm-up.",
        "",
        f"Load at start: `{load_start}`",
        "",
        "| measure | nlgen | baseline | ratio |",
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
    main()
