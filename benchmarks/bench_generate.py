"""Side-by-side benchmark of `nlgen generate` against plain transformers, in one run.

Measures, on the same machine in the same run:
  1. `nlgen --help` wall time (whole process);
  2. a cold `nlgen generate "Once upon a time" -n 128` process against a plain transformers
     script doing the same (load the model from the GGUF file, generate 128 tokens);
  3. single-prompt tokens/s: nlgen (dtype auto, and float32) against a plain `generate()` call
     on the same weights in float32, same options;
  4. throughput for 32 prompts: nlgen batched against nlgen one by one.

Runs are interleaved (A B A B ...) and medians are reported, so that drift on a shared machine
affects both sides alike. Usage:

    python benchmarks/bench_generate.py [--repeats 3] [--out benchmarks/results/generate.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAIN_SCRIPT = r"""
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf = Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
inputs = tok("Once upon a time", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=128, min_new_tokens=128, do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
"""


def wall(cmd: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/generate.md")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from nlgen import gguf, loading
    from nlgen.generation import GenerationOptions, generate

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    nlgen = [sys.executable, "-m", "nlgen"]
    rows: list[tuple[str, str, str, str]] = []
    gguf_file = loading.builtin_gguf_path()
    directory = gguf.converted_dir(gguf_file)  # warm the cache once, outside the timings

    # 1. --help
    helps = [wall([*nlgen, "--help"], env) for _ in range(max(5, args.repeats))]
    rows.append(("`nlgen --help` (process wall time)", f"{median(helps):.3f} s", "-", "-"))
    print(rows[-1], file=sys.stderr, flush=True)

    # 2. cold process: nlgen vs the plain script (both greedy, exactly 128 new tokens)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(PLAIN_SCRIPT)
        plain_path = f.name
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(wall([*nlgen, "generate", "--model", "builtin", "--greedy", "-n", "128",
                          "--min-new-tokens", "128", "Once upon a time"], env))
        theirs.append(wall([sys.executable, plain_path, str(gguf_file)], env))
    rows.append(("cold `nlgen generate -n 128` vs plain script (process wall time)",
                 f"{median(ours):.1f} s", f"{median(theirs):.1f} s",
                 f"{median(theirs) / median(ours):.2f}x faster"))
    print(rows[-1], file=sys.stderr, flush=True)

    # 3. single prompt tokens/s, in process
    n = args.new_tokens
    tok_lm = loading.load_model("builtin", device="cpu", dtype="auto")
    f32_lm = loading.load_model("builtin", device="cpu", dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = f32_lm.tokenizer
    opts = GenerationOptions(greedy=True, max_new_tokens=n, min_new_tokens=n)

    def nlgen_tps(lm) -> float:
        started = time.perf_counter()
        [result] = generate(lm, ["Once upon a time"], opts)
        return result.completion_tokens / (time.perf_counter() - started)

    def plain_tps() -> float:
        inputs = tokenizer("Once upon a time", return_tensors="pt")
        started = time.perf_counter()
        with torch.inference_mode():
            out = plain.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return (out.shape[1] - inputs["input_ids"].shape[1]) / (time.perf_counter() - started)

    nlgen_tps(tok_lm), plain_tps()  # warm-up: first-call allocations
    auto, f32, base = [], [], []
    for _ in range(args.repeats):
        auto.append(nlgen_tps(tok_lm))
        f32.append(nlgen_tps(f32_lm))
        base.append(plain_tps())
    rows.append((f"single prompt, {n} tokens: nlgen dtype auto ({tok_lm.dtype}) vs plain "
                 "transformers float32", f"{median(auto):.1f} tok/s", f"{median(base):.1f} tok/s",
                 f"{median(auto) / median(base):.2f}x"))
    rows.append((f"single prompt, {n} tokens: nlgen float32 vs plain transformers float32",
                 f"{median(f32):.1f} tok/s", f"{median(base):.1f} tok/s",
                 f"{median(f32) / median(base):.2f}x"))
    print(rows[-2:], file=sys.stderr, flush=True)

    # 4. 32 prompts: batched vs one by one (nlgen, dtype auto, 32 new tokens each)
    prompts = [f"Story number {i}: once upon a time, in a land of {w}," for i, w in
               enumerate(["rivers", "mountains", "cities", "forests"] * 8)]
    batch_opts = GenerationOptions(greedy=True, max_new_tokens=32, min_new_tokens=32,
                                   batch_size=32)
    single_opts = GenerationOptions(greedy=True, max_new_tokens=32, min_new_tokens=32,
                                    batch_size=1)

    def throughput(o: GenerationOptions) -> float:
        started = time.perf_counter()
        tokens = sum(r.completion_tokens for r in generate(tok_lm, prompts, o))
        return tokens / (time.perf_counter() - started)

    batched, single = [], []
    for _ in range(max(1, args.repeats - 1)):
        batched.append(throughput(batch_opts))
        single.append(throughput(single_opts))
    rows.append(("32 prompts x 32 tokens: batch 32 vs one by one (nlgen, auto dtype)",
                 f"{median(batched):.1f} tok/s", f"{median(single):.1f} tok/s",
                 f"{median(batched) / median(single):.2f}x"))

    cpu = platform.processor() or platform.machine()
    lines = [
        f"Command: `python benchmarks/bench_generate.py --repeats {args.repeats}`",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}; model: builtin "
        f"(SmolLM2-135M-Instruct); medians of {args.repeats} interleaved runs.",
        "",
        "| measure | nlgen | baseline | ratio |",
        "| --- | --- | --- | --- |",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report, encoding="utf-8")
    os.unlink(plain_path)


if __name__ == "__main__":
    main()
