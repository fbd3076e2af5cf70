"""The generation engine against its fair peers, in one run: decode speed, sampling's cost,
batches, a GPT-2, whole processes and their memory.

Measures, on the same machine in the same run:
  1. built-in model, one prompt, exactly --new-tokens new tokens, in process: nlgen greedy, with
     its default sampling (--seed 0) and with top-p 0.9 + no-repeat n-gram 2, against
     llama.cpp's `llama-bench` tg{n} on the same GGUF; sampling's cost per token over greedy;
  2. GPT-2-small shapes (12 layers x 768, vocabulary 50257, random weights saved as a local
     model directory, bfloat16): nlgen's loop (its products packed in oneDNN's layout on first
     use, nlgen.engine.packed) against transformers' generate() on a second load of the same
     files that nlgen's loop never touched (`--engine transformers`: plain generate()); and
     the same model with `--quantize int8` (int8 rows: other numbers, half the bytes) on
     nlgen's loop; and the built-in model in bfloat16 (`--quantize none`), nlgen's loop on
     the weights it reads from the files against generate() on transformers' own load;
  3. batches of 1, 8 and 32 prose prompts x 32 tokens on the built-in model, greedy and seeded
     sampling: nlgen's loop (`--engine nlgen`) against generate() (`--engine transformers`),
     the same loaded model and options;
  4. whole processes, built-in model, `nlgen generate "Once upon a time"` with exactly n new
     tokens (greedy, and sampling with --seed 0) against `llama-completion` on the GGUF: wall
     time and peak resident memory (the child's ru_maxrss).

Every side does the same work (--min-new-tokens / --ignore-eos). Runs are interleaved after a
warm-up and medians reported; the load average (`uptime`) is printed at the start and the end.
The llama.cpp rows need benchmarks/build_llama_cpp.sh's binaries and are skipped without them.

    python benchmarks/bench_engine.py [--repeats 3] [--out benchmarks/results/engine.md]
    python benchmarks/bench_engine.py --quick      # smoke run, no file
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import (  # noqa: E402  (the benchmarks share their helpers)
    PROMPT,
    Row,
    find_llama_cpp,
    load_average,
    median,
    prose_prompts,
    ratio,
)

# A small launcher between this process and the measured one: Linux folds the forked copy's
# resident set (this benchmark's, over a gigabyte) into the child's ru_maxrss at exec, so the
# child is started from a process that holds next to nothing.
_LAUNCHER = """
import os, resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode
elapsed = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"@@measured {elapsed} {peak}", file=sys.stderr)
sys.exit(code)
"""


def run_measured(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a child process, both taken by the launcher."""
    proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *cmd], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {proc.stderr[-500:]}")
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("@@measured ")][-1]
    _, elapsed, peak_kb = line.split()
    return float(elapsed), float(peak_kb) / 1024  # KB on Linux


def gpt2_small(directory: Path, tokenizer_source: str) -> Path:
    """GPT-2-small's shapes with random weights, saved with a borrowed tokenizer (the ids of
    the prompt fit the vocabulary)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())  # 12 x 768, vocabulary 50257, context 1024
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(directory)
    return directory


def main() -> None:  # noqa: C901  (one table, built in order)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default=None,
                        help="default benchmarks/results/engine.md (none with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 8 tokens")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.new_tokens = 1, 8
    out = args.out or (None if args.quick else "benchmarks/results/engine.md")
    n, reps = args.new_tokens, args.repeats
    batch_tokens = 8 if args.quick else 32

    load_start = load_average()
    print(f"load at start: {load_start}", file=sys.stderr, flush=True)

    import torch
    import transformers

    from nlgen.engine import lean_weights
    from nlgen.engine.generation import GenerationStats, generate
    from nlgen.engine.options import GenerationOptions
    from nlgen.models import loading, spec

    threads = torch.get_num_threads()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    rows: list[Row] = []
    notes: list[str] = []

    def add(row: Row) -> None:
        rows.append(row)
        print(f"{row.measure}: {row.nlgen} | {row.baseline} | {row.ratio}", file=sys.stderr,
              flush=True)

    gguf = spec.builtin_gguf_path()
    lm = loading.load_model("builtin", device="cpu", dtype="auto", lean_reader=lean_weights.read)
    label = lm.dtype + ("" if lm.quantization == "none" else f" + {lm.quantization} weights")
    llama = find_llama_cpp()
    if llama is None:
        notes.append("llama.cpp rows skipped: no binaries (run benchmarks/build_llama_cpp.sh)")

    def tps(model, prompts: list[str], opts: GenerationOptions) -> float:
        stats = GenerationStats()
        for _ in generate(model, prompts, opts, stats=stats):
            pass
        return stats.new_tokens / stats.seconds

    def interleaved(sides: dict[str, tuple], rounds: int) -> dict[str, list[float]]:
        """Each side (name -> (model, options)) warmed up once, then ``rounds`` rounds of one
        run of each in turn: tokens/s per side, per round."""
        for model, opts in sides.values():
            tps(model, [PROMPT], opts)
        speeds: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(rounds):
            for name, (model, opts) in sides.items():
                speeds[name].append(tps(model, [PROMPT], opts))
        return speeds

    # 1. one prompt: greedy, default sampling, top-p + no-repeat n-grams; llama-bench tg{n}
    modes = {
        "greedy": GenerationOptions(greedy=True, max_new_tokens=n, min_new_tokens=n),
        "default sampling, --seed 0": GenerationOptions(seed=0, max_new_tokens=n,
                                                        min_new_tokens=n),
        "--top-p 0.9 --no-repeat-ngram-size 2 --seed 0": GenerationOptions(
            seed=0, top_p=0.9, no_repeat_ngram_size=2, max_new_tokens=n, min_new_tokens=n),
    }
    for opts in modes.values():  # warm-up
        tps(lm, [PROMPT], opts)
    speeds: dict[str, list[float]] = {k: [] for k in modes} | {"llama": []}
    llama_info: dict = {}
    for _ in range(reps):
        for name, opts in modes.items():
            speeds[name].append(tps(lm, [PROMPT], opts))
        if llama:
            res = subprocess.run(
                [str(llama / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0",
                 "-n", str(n), "-r", "1", "-o", "json"],
                env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True)
            [llama_info] = json.loads(res.stdout)
            speeds["llama"].append(float(llama_info["avg_ts"]))
    greedy = median(speeds["greedy"])
    for name in modes:
        speed = median(speeds[name])
        if llama:
            tg = median(speeds["llama"])
            add(Row(f"built-in model ({label}), one prompt, {n} tokens, {name}: nlgen vs "
                    f"llama-bench tg{n} ({threads} threads)", f"{speed:.1f} tok/s",
                    f"{tg:.1f} tok/s", ratio(speed, tg, "speed")))
        else:
            add(Row(f"built-in model ({label}), one prompt, {n} tokens, {name}",
                    f"{speed:.1f} tok/s", "-", "-"))
        if name != "greedy":
            cost = 1000 / speed - 1000 / greedy
            add(Row(f"sampling's cost per token ({name}) over a greedy step",
                    f"{cost:.2f} ms", f"{1000 / greedy:.2f} ms",
                    f"{100 * cost / (1000 / greedy):+.1f}% of a greedy step"))

    # 2. GPT-2-small shapes: nlgen's loop vs generate() on the same loaded model
    with tempfile.TemporaryDirectory() as tmp:
        path = gpt2_small(Path(tmp) / "gpt2-small-random", str(lm.source))
        # Two loads of the same files: nlgen's loop packs its model's bfloat16 products in
        # oneDNN's layout on first use (nlgen.engine.packed), which generate() would then use
        # too; the baseline is transformers on a model nlgen's loop never touched.
        g2 = loading.load_model(str(path), device="cpu", dtype="bfloat16")
        g2_plain = loading.load_model(str(path), device="cpu", dtype="bfloat16")
        greedy_on = {e: GenerationOptions(greedy=True, max_new_tokens=n, min_new_tokens=n,
                                          engine=e) for e in ("nlgen", "transformers")}
        # This machine's speed drifts: more pairs, and each one's ratio in the notes.
        g2_speeds = interleaved({"nlgen": (g2, greedy_on["nlgen"]),
                                 "transformers": (g2_plain, greedy_on["transformers"])},
                                max(reps, 5))
        assert type(g2_plain.model.lm_head).__name__ == "Linear", "the baseline was packed"
        a, b = median(g2_speeds["nlgen"]), median(g2_speeds["transformers"])
        each = sorted(x / y for x, y in zip(g2_speeds["nlgen"], g2_speeds["transformers"]))
        notes.append("GPT-2-small bfloat16, each interleaved pair's ratio: "
                     + ", ".join(f"{r:.2f}x" for r in each))
        add(Row(f"GPT-2-small shapes (random weights, bfloat16), greedy, {n} tokens: nlgen's "
                "loop vs transformers generate()", f"{a:.1f} tok/s", f"{b:.1f} tok/s",
                ratio(a, b, "speed")))
        # --quantize int8 (int8 rows for the Conv1D layers and the head: other numbers, half
        # the bytes a token) on nlgen's loop, against the same bfloat16 generate() baseline,
        # interleaved with it.
        g2q = loading.load_model(str(path), device="cpu", quantize="int8")
        q_speeds = interleaved({"int8": (g2q, greedy_on["nlgen"]),
                                "transformers": (g2_plain, greedy_on["transformers"])}, reps)
        a, b = median(q_speeds["int8"]), median(q_speeds["transformers"])
        add(Row(f"GPT-2-small shapes, `--quantize int8` on nlgen's loop vs bfloat16 generate(), "
                f"greedy, {n} tokens", f"{a:.1f} tok/s", f"{b:.1f} tok/s", ratio(a, b, "speed")))
        del g2, g2q, g2_plain

    # 2b. the built-in model in bfloat16 (--quantize none): nlgen's loop on the weights it reads
    # from the files (q/k/v and gate/up packed) vs generate() on transformers' own load
    bf = loading.load_model("builtin", device="cpu", dtype="bfloat16", quantize="none",
                            lean_reader=lean_weights.read)
    bf_plain = loading.load_model("builtin", device="cpu", dtype="bfloat16", quantize="none")
    bf_speeds = interleaved({"nlgen": (bf, greedy_on["nlgen"]),
                             "transformers": (bf_plain, greedy_on["transformers"])}, reps)
    a, b = median(bf_speeds["nlgen"]), median(bf_speeds["transformers"])
    add(Row(f"built-in model in bfloat16 (`--quantize none`), greedy, {n} tokens: nlgen's loop "
            "vs transformers generate()", f"{a:.1f} tok/s", f"{b:.1f} tok/s",
            ratio(a, b, "speed")))
    del bf, bf_plain

    # 3. batches on the built-in model: nlgen's loop vs generate(), greedy and sampling
    prompts = prose_prompts(32)
    for how, extra in (("greedy", {"greedy": True}), ("sampling --seed 0", {"seed": 0})):
        for size in (1, 8, 32):
            sides = {e: GenerationOptions(max_new_tokens=batch_tokens,
                                          min_new_tokens=batch_tokens, batch_size=size,
                                          engine=e, **extra)
                     for e in ("nlgen", "transformers")}
            batch = prompts[:max(size, 8)] if size > 1 else prompts[:4]
            for opts in sides.values():
                tps(lm, batch[:size], opts)
            got: dict[str, list[float]] = {e: [] for e in sides}
            for _ in range(max(1, reps - 1)):
                for e, opts in sides.items():
                    got[e].append(tps(lm, batch, opts))
            a, b = median(got["nlgen"]), median(got["transformers"])
            add(Row(f"{len(batch)} prose prompts x {batch_tokens} tokens, batch {size}, {how}: "
                    "nlgen's loop vs generate()", f"{a:.1f} tok/s", f"{b:.1f} tok/s",
                    ratio(a, b, "speed")))

    # 4. whole processes: wall time and peak RSS
    nlgen = [sys.executable, "-m", "nlgen", "generate", "--model", "builtin", "-n", str(n),
             "--min-new-tokens", str(n)]
    procs = {"nlgen --greedy": [*nlgen, "--greedy", PROMPT],
             "nlgen --seed 0": [*nlgen, "--seed", "0", PROMPT]}
    if llama:
        procs["llama-completion"] = [str(llama / "llama-completion"), "-m", str(gguf), "-p",
                                     PROMPT, "-n", str(n), "-t", str(threads), "--temp", "0",
                                     "--ignore-eos", "-no-cnv"]
    for cmd in procs.values():  # warm-up
        run_measured(cmd, env)
    walls: dict[str, list[float]] = {k: [] for k in procs}
    rss: dict[str, list[float]] = {k: [] for k in procs}
    for _ in range(reps):
        for name, cmd in procs.items():
            w, r = run_measured(cmd, env)
            walls[name].append(w)
            rss[name].append(r)
    for name in ("nlgen --greedy", "nlgen --seed 0"):
        w, r = median(walls[name]), median(rss[name])
        if llama:
            lw, lr = median(walls["llama-completion"]), median(rss["llama-completion"])
            add(Row(f"whole process, {n} tokens, `{name}` vs llama-completion: wall time",
                    f"{w:.2f} s", f"{lw:.2f} s", ratio(w, lw, "time")))
            add(Row(f"whole process, {n} tokens, `{name}` vs llama-completion: peak RSS",
                    f"{r:.0f} MB", f"{lr:.0f} MB", ratio(r, lr, "memory")))
        else:
            add(Row(f"whole process, {n} tokens, `{name}`: wall time, peak RSS",
                    f"{w:.2f} s, {r:.0f} MB", "-", "-"))
    if llama:
        notes.append(f"llama.cpp build {llama_info.get('build_commit', '?')} from {llama}, "
                     f"{llama_info.get('model_type', 'GGUF')}, {threads} threads; tg counts "
                     "decode only, from an empty context; nlgen's rows time generate() (prompt "
                     "included).")
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    notes.append(f"this benchmark's own process peaked at {self_rss:.0f} MB (not a row).")

    load_end = load_average()
    print(f"load at end: {load_end}", file=sys.stderr, flush=True)
    cpu = platform.processor() or platform.machine()
    command = "python benchmarks/bench_engine.py " + ("--quick" if args.quick
                                                      else f"--repeats {reps}")
    lines = [
        f"Command: `{command}`", "",
        f"Machine: {os.cpu_count()} cores ({cpu}), torch {torch.__version__} ({threads} "
        f"threads), transformers {transformers.__version__}; model: builtin "
        f"(SmolLM2-135M-Instruct, {gguf.name}); medians of {reps} interleaved runs after a "
        "warm-up.", "",
        f"Load at start: `{load_start}`", "",
        "| measure | nlgen | baseline | ratio |", "| --- | --- | --- | --- |",
        *[f"| {r.measure} | {r.nlgen} | {r.baseline} | {r.ratio} |" for r in rows], "",
        f"Load at end: `{load_end}`", "",
        *[f"- {note}" for note in notes],
    ]
    report = "\n".join(lines).rstrip() + "\n"
    print(report)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
