"""Training throughput and peak memory: ``nlgen finetune`` against the run_clm.py recipe.

Both sides train the same model on the same text with the same block size, batch size, steps,
learning rate and seed, each in a fresh process, in the same run of this script (so that they
share the machine's load). The run_clm side is the recipe of transformers'
examples/pytorch/language-modeling/run_clm.py reduced to its training path: load_dataset("text"),
tokenize, group_texts, Trainer. Throughput is what both report the same way: training tokens
(steps x batch x block) over the Trainer's train_runtime; peak memory is the child's max RSS.

    .venv/bin/python benchmarks/bench_finetune.py --max-steps 15 \
        --out benchmarks/results/finetune.md

A last section times one training step's parts in-process (forward, loss, backward, optimizer)
to say where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUN_CLM = r'''
import json, sys, time
from itertools import chain
import torch
from datasets import load_dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments,
                          default_data_collator, set_seed)
import transformers, datasets
transformers.logging.set_verbosity_error(); datasets.disable_progress_bars()
model_dir, data, out, block, batch, steps, lr, seed, bf16 = sys.argv[1:10]
block, batch, steps, seed = int(block), int(batch), int(steps), int(seed)
lr, bf16 = float(lr), bf16 == "1"
set_seed(seed)
raw = load_dataset("text", data_files={"train": data})
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
def tokenize_function(examples):
    return tokenizer(examples["text"])
tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])
def group_texts(examples):
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated[list(examples.keys())[0]])
    total_length = (total_length // block) * block
    result = {k: [t[i : i + block] for i in range(0, total_length, block)]
              for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result
lm = tokenized.map(group_texts, batched=True)
args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
                         learning_rate=lr, seed=seed, save_strategy="no", report_to="none",
                         logging_steps=10, disable_tqdm=True, use_cpu=True, bf16=bf16,
                         include_num_input_tokens_seen="all")
trainer = Trainer(model=model, args=args, train_dataset=lm["train"], processing_class=tokenizer,
                  data_collator=default_data_collator)
m = trainer.train().metrics
print(json.dumps({"train_runtime": m["train_runtime"], "blocks": len(lm["train"]),
                  "tokens": trainer.state.num_input_tokens_seen}))
'''


def measured(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float,
                                                           float]:
    """Run cmd in a wrapper process whose RUSAGE_CHILDREN holds only cmd: (result, wall, MiB)."""
    wrapper = ("import resource, subprocess, sys, json; "
               "p = subprocess.run(sys.argv[1:]); "
               "print(json.dumps({'rc': p.returncode, "
               "'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}), "
               "file=sys.stderr)")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    last = proc.stderr.strip().splitlines()[-1]
    info = json.loads(last)
    if info["rc"] != 0:
        sys.exit(f"failed: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc, wall, info["maxrss_kb"] / 1024


def run_nlgen(model_dir: str, data: str, a: argparse.Namespace, env: dict[str, str],
              tmp: Path, precision: str) -> dict:
    out = tmp / f"nlgen-{precision}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "nlgen", "finetune", data, "--model", model_dir, "-o", str(out),
           "--block-size", str(a.block_size), "--batch-size", str(a.batch_size),
           "--max-steps", str(a.max_steps), "--learning-rate", str(a.learning_rate),
           "--seed", str(a.seed), "--validation-split", "0", "--save-steps", "1000000",
           "--precision", precision]
    _, wall, rss = measured(cmd, env)
    rec = json.loads((out / "nlgen_run.json").read_text())
    return {"name": f"nlgen finetune ({precision})", "train_s": rec["train_runtime_s"],
            "tokens": rec["tokens_seen"], "tok_s": rec["tokens_seen"] / rec["train_runtime_s"],
            "wall_s": wall, "rss_mib": rss}


def run_clm(model_dir: str, data: str, a: argparse.Namespace, env: dict[str, str],
            tmp: Path, bf16: bool) -> dict:
    script = tmp / "run_clm_recipe.py"
    script.write_text(RUN_CLM)
    cmd = [sys.executable, str(script), model_dir, data, str(tmp / "clm-out"), str(a.block_size),
           str(a.batch_size), str(a.max_steps), str(a.learning_rate), str(a.seed),
           "1" if bf16 else "0"]
    proc, wall, rss = measured(cmd, env)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"name": f"run_clm.py recipe ({'bf16' if bf16 else 'fp32'})",
            "train_s": res["train_runtime"], "tokens": res["tokens"],
            "tok_s": res["tokens"] / res["train_runtime"], "wall_s": wall, "rss_mib": rss}


def profile_step(model_dir: str, a: argparse.Namespace, steps: int = 4) -> list[tuple[str, float]]:
    """Mean seconds per part of one training step, measured in-process (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.learning_rate, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (a.batch_size, a.block_size))
    parts: dict[str, list[float]] = {"forward: transformer body": [],
                                     "forward: lm_head + cross-entropy": [],
                                     "backward": [], "optimizer step": []}
    for i in range(steps + 1):
        t0 = time.perf_counter()
        hidden = model.base_model(input_ids=ids).last_hidden_state  # (B, T, d)
        t1 = time.perf_counter()
        logits = model.get_output_embeddings()(hidden)  # (B, T, vocab): 49k wide for SmolLM2
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1))
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if i:  # the first step warms up allocators and kernels
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[key].append(dt)
    return [(k, statistics.mean(v)) for k, v in parts.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin")
    p.add_argument("--data", default=str(ROOT / "examples" / "data" / "garden.txt"))
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=15)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each side")
    p.add_argument("--bf16", action="store_true", help="also run both sides in bf16 autocast")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", help="write the markdown report here too")
    a = p.parse_args()

    from nlgen.models.gguf import converted_dir
    from nlgen.models.spec import resolve_spec

    spec = resolve_spec(a.model)
    model_dir = str(converted_dir(Path(spec.path)) if spec.kind in ("builtin", "gguf")
                    else spec.path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "NO_COLOR": "1"}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmpdir:
        tmp = Path(tmpdir)
        # Enough text that no run wraps into a second epoch: an epoch's last batch is short,
        # and a short batch would make the two sides' steps unequal work.
        text = Path(a.data).read_text(encoding="utf-8")
        need = a.max_steps * a.batch_size * a.block_size * 6  # ~4 characters a token, and slack
        data = tmp / Path(a.data).name
        data.write_text("\n".join([text] * -(-need // len(text))), encoding="utf-8")
        a.data = str(data)
        data_bytes = data.stat().st_size
        env["HF_DATASETS_CACHE"] = str(tmp / "datasets")  # both sides tokenize from scratch
        for i in range(a.repeats):
            pair = [lambda: run_nlgen(model_dir, a.data, a, env, tmp, "fp32"),
                    lambda: run_clm(model_dir, a.data, a, env, tmp, bf16=False)]
            if a.bf16:
                pair += [lambda: run_nlgen(model_dir, a.data, a, env, tmp, "bf16"),
                         lambda: run_clm(model_dir, a.data, a, env, tmp, bf16=True)]
            # Alternate who goes first: a neighbour's load then hits both sides alike.
            for run in (pair if i % 2 == 0 else pair[::-1]):
                rows.append(run())
    profile = [] if a.no_profile else profile_step(model_dir, a)

    lines = [
        "# nlgen finetune vs the run_clm.py recipe",
        "",
        "```",
        "$ " + shlex.join([".venv/bin/python", "benchmarks/bench_finetune.py", *sys.argv[1:]]),
        "```",
        "",
        f"Model {a.model} ({model_dir}), data {Path(a.data).name}, block {a.block_size}, "
        f"batch {a.batch_size}, {a.max_steps} steps, lr {a.learning_rate}, seed {a.seed}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {_v('torch')}, transformers {_v('transformers')}. "
        f"The text is repeated to {data_bytes:,} bytes so that "
        "no run wraps into a second epoch (its short last batch would make steps unequal). "
        "Each row is a fresh process. tokens/s = tokens trained (the Trainer's "
        "num_input_tokens_seen) / Trainer train_runtime; "
        "wall = the whole process (imports, model load, tokenization, training, saving); "
        "peak RSS = the process's max resident memory.",
        "",
        "| run | tokens | train s | tokens/s | wall s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['tokens']} | {r['train_s']:.1f} | {r['tok_s']:.0f} | "
                     f"{r['wall_s']:.1f} | {r['rss_mib']:.0f} |")
    names = list(dict.fromkeys(r["name"] for r in rows))
    lines += ["", "Per side over the repeats (the machine is shared: the best run is the one "
              "least disturbed by neighbours):", "",
              "| run | runs | best tokens/s | median tokens/s | median peak RSS MiB |",
              "|---|---:|---:|---:|---:|"]
    for name in names:
        mine = [r for r in rows if r["name"] == name]
        lines.append(f"| {name} | {len(mine)} | {max(r['tok_s'] for r in mine):.0f} | "
                     f"{statistics.median(r['tok_s'] for r in mine):.0f} | "
                     f"{statistics.median(r['rss_mib'] for r in mine):.0f} |")
    if profile:
        total = sum(t for _, t in profile)
        lines += ["", f"Where one float32 training step's time goes (batch {a.batch_size}, "
                  f"block {a.block_size}, in-process, mean of 4 steps; {total:.2f} s a step):",
                  "", "| part | s | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {t:.3f} | {t / total:.0%} |" for k, t in profile]
    report = "\n".join(lines) + "\n"
    print(report)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(report, encoding="utf-8")


def _v(dist: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(dist)


if __name__ == "__main__":
    main()
