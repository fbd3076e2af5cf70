"""``nlgen finetune`` against a plain Trainer script (the run_clm.py recipe), in one run.

One command gives the whole table:

    .venv/bin/python benchmarks/bench_finetune.py --out benchmarks/results/finetune.md

(about 20 minutes on a quiet 2-core machine). Its sections:

1. Throughput. The Trainer script trains in float32, as a user writes it (the recipe of
   transformers' examples/pytorch/language-modeling/run_clm.py reduced to its training path:
   load_dataset("text"), tokenize, group_texts, Trainer); ``nlgen finetune`` trains with its
   default precision (``--precision auto``) and, to tell the means apart, in float32 too. Same
   model, text, block size, batch size, steps, learning rate and seed, each run a fresh
   process, alternating, in the same run of this script (so that they share the machine's
   load), no validation. tokens/s = training tokens (steps x batch x block) / the Trainer's
   train_runtime; the ratio is nlgen's default over the script's float32.
2. Validation loss. Two short nlgen runs, float32 and the default precision, same seed,
   validated on held-out text (tests/data/corpus.txt); with --split-too also on 5% of the
   repeated training text's blocks (trained on too: a test of memorizing). The final
   validation loss of each (nlgen measures it in float32 in both) and their difference; and
   where such a run's wall time goes.
3. Padding. Conversations are not packed: each example is padded to its batch's longest. On a
   synthetic conversation set, the padding share and the trained tokens/s of batches drawn at
   random against batches of like length (what nlgen does), in-process, in the default
   precision.
4. Where one training step's time goes, float32 and bf16 autocast, in-process.

The uptime load average is written beside the numbers: on a shared machine, compare only
rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
              tmp: Path, precision: str, steps: int, split: float = 0.0,
              validation: str | None = None) -> dict:
    out = tmp / f"nlgen-{precision}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "nlgen", "finetune", data, "--model", model_dir, "-o", str(out),
           "--block-size", str(a.block_size), "--batch-size", str(a.batch_size),
           "--max-steps", str(steps), "--learning-rate", str(a.learning_rate),
           "--seed", str(a.seed), "--save-steps", "1000000", "--precision", precision,
           *(["--validation-file", validation] if validation
             else ["--validation-split", str(split)])]
    _, wall, rss = measured(cmd, env)
    rec = json.loads((out / "nlgen_run.json").read_text())
    chosen = rec["hyperparameters"]["precision"]
    shown = f"{precision}: {chosen}" if precision == "auto" else precision
    return {"name": f"nlgen finetune ({shown})", "train_s": rec["train_runtime_s"],
            "tokens": rec["tokens_seen"], "tok_s": rec["tokens_seen"] / rec["train_runtime_s"],
            "wall_s": wall, "rss_mib": rss, "precision": chosen,
            "loss": rec["validation_loss"], "kl": rec.get("validation_kl"),
            "inside_s": rec["wall_time_s"], "held_out": validation or f"{split:.0%} of the blocks"}


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


def profile_step(model_dir: str, a: argparse.Namespace, bf16: bool,
                 steps: int = 3) -> list[tuple[str, float]]:
    """Mean seconds per part of one training step, measured in-process."""
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = model.base_model(input_ids=ids).last_hidden_state  # (B, T, d)
            t1 = time.perf_counter()
            logits = model.get_output_embeddings()(hidden)  # (B, T, vocab): 49k for SmolLM2
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


def synthetic_chats(texts: list[str], n: int, seed: int) -> list[dict[str, Any]]:
    """n conversations of varied length: a question on a sentence, a reply of 1 to 8."""
    sentences = [x.strip() + "." for t in texts for x in t.replace("\n", " ").split(". ")
                 if len(x.split()) > 3]
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        first = rng.randrange(len(sentences))
        reply = " ".join(sentences[(first + k) % len(sentences)]
                         for k in range(rng.randint(1, 8)))
        topic = " ".join(sentences[first].split()[:4])
        chats.append({"messages": [{"role": "user", "content": f"Go on from: {topic}"},
                                   {"role": "assistant", "content": reply}]})
    return chats


def padding_run(model_dir: str, chats: list[dict[str, Any]], a: argparse.Namespace,
                precision: str, tmp: Path) -> list[dict[str, Any]]:
    """Padding share and trained tokens/s of random vs length-grouped batches, one epoch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from nlgen.finetune.chat import end_of_turn_ids
    from nlgen.finetune.examples import prepare_examples, read_records
    from nlgen.finetune.options import FinetuneOptions
    from nlgen.inputs import check_sources

    path = tmp / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opts = FinetuneOptions(data=(str(path),), validation_split=0.0)
    records = read_records(check_sources([str(path)], None), [], ["messages"], [], False)
    data = prepare_examples(records, opts, tokenizer, 1024, end_of_turn_ids(model), "messages")
    lengths = [len(x) for x in data.train["input_ids"]]
    gen = torch.Generator().manual_seed(a.seed)
    orders = {"random batches": torch.randperm(len(lengths), generator=gen).tolist(),
              "like-length batches (nlgen)": list(LengthGroupedSampler(
                  a.batch_size, lengths=lengths, generator=gen))}
    opt = torch.optim.AdamW(model.parameters(), lr=a.learning_rate, fused=True)
    model.train()

    def step(b: list[int]) -> int:
        batch = data.collator([data.train[j] for j in b])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int((batch["labels"] != -100).sum())

    step(orders["random batches"][:a.batch_size])  # warm-up: allocators, optimizer states
    rows = []
    for name, order in orders.items():
        batches = [order[i:i + a.batch_size] for i in range(0, len(order), a.batch_size)]
        real = sum(lengths)
        padded = sum(max(lengths[j] for j in b) * len(b) for b in batches)
        started = time.perf_counter()
        trained = sum(step(b) for b in batches)
        took = time.perf_counter() - started
        rows.append({"name": name, "examples": len(lengths), "tokens": real, "padded": padded,
                     "pad_share": 1 - real / padded, "s": took, "tok_s": real / took,
                     "trained_tok_s": trained / took})
    return rows


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin")
    p.add_argument("--data", default=str(ROOT / "examples" / "data" / "garden.txt"))
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=30, help="steps of the throughput runs "
                   "(both sides run as many: a short run's ratio is mostly start-up noise)")
    p.add_argument("--loss-steps", type=int, default=30, help="steps of the validation-loss "
                   "runs (0: skip them)")
    p.add_argument("--split-too", action="store_true", help="also validate on 5%% of the "
                   "training text's blocks (the text is repeated: those blocks are trained "
                   "on, a test of memorizing; about 3 minutes more)")
    p.add_argument("--chats", type=int, default=48, help="synthetic conversations of the "
                   "padding section (0: skip it)")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each side")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", help="write the markdown report here too")
    a = p.parse_args()

    from nlgen.models.devices import cpu_has_fast_bf16
    from nlgen.models.gguf import converted_dir
    from nlgen.models.spec import resolve_spec

    spec = resolve_spec(a.model)
    model_dir = str(converted_dir(Path(spec.path)) if spec.kind in ("builtin", "gguf")
                    else spec.path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "NO_COLOR": "1"}
    loads = {"start": load()}
    rows: list[dict] = []
    losses: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmpdir:
        tmp = Path(tmpdir)
        # Enough text that no run wraps into a second epoch: an epoch's last batch is short,
        # and a short batch would make the two sides' steps unequal work.
        text = Path(a.data).read_text(encoding="utf-8")
        steps = max(a.max_steps, a.loss_steps)
        need = steps * a.batch_size * a.block_size * 6  # ~4 characters a token, and slack
        data = tmp / Path(a.data).name
        data.write_text("\n".join([text] * -(-need // len(text))), encoding="utf-8")
        data_bytes = data.stat().st_size
        env["HF_DATASETS_CACHE"] = str(tmp / "datasets")  # both sides tokenize from scratch
        # Untimed: the first process of a run pays for cold file caches (weights, bytecode).
        run_nlgen(model_dir, str(data), a, env, tmp, "fp32", 1)
        for i in range(a.repeats):
            trio = [lambda: run_nlgen(model_dir, str(data), a, env, tmp, "auto", a.max_steps),
                    lambda: run_clm(model_dir, str(data), a, env, tmp, bf16=False),
                    lambda: run_nlgen(model_dir, str(data), a, env, tmp, "fp32", a.max_steps)]
            # Alternate who goes first: a neighbour's load then hits both sides alike.
            for run in (trio if i % 2 == 0 else trio[::-1]):
                rows.append(run())
        loads["throughput"] = load()
        if a.loss_steps:
            held_out = str(ROOT / "tests" / "data" / "corpus.txt")  # text not trained on
            for precision in ("fp32", "auto"):
                losses.append(run_nlgen(model_dir, str(data), a, env, tmp, precision,
                                        a.loss_steps, validation=held_out))
            for precision in ("fp32", "auto") if a.split_too else ():
                losses.append(run_nlgen(model_dir, str(data), a, env, tmp, precision,
                                        a.loss_steps, split=0.05))
            loads["loss"] = load()
        padding = []
        if a.chats:
            texts = [text, (ROOT / "tests" / "data" / "corpus.txt").read_text(encoding="utf-8")]
            padding = padding_run(model_dir, synthetic_chats(texts, a.chats, a.seed), a,
                                  "bf16" if cpu_has_fast_bf16() else "fp32", tmp)
            loads["padding"] = load()
    profiles = [] if a.no_profile else [(bf16, profile_step(model_dir, a, bf16))
                                         for bf16 in (False, True)]
    loads["end"] = load()
    report = render(a, model_dir, data_bytes, rows, losses, padding, profiles, loads,
                    cpu_has_fast_bf16())
    print(report)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(report, encoding="utf-8")


def render(a: argparse.Namespace, model_dir: str, data_bytes: int, rows: list[dict],
           losses: list[dict], padding: list[dict], profiles: list, loads: dict[str, str],
           fast_bf16: bool) -> str:
    lines = [
        "# nlgen finetune vs a plain Trainer script (the run_clm.py recipe)",
        "",
        "```",
        "$ " + shlex.join([".venv/bin/python", "benchmarks/bench_finetune.py", *sys.argv[1:]]),
        "```",
        "",
        f"Model {a.model} ({Path(model_dir).name}), data {Path(a.data).name} repeated to "
        f"{data_bytes:,} bytes (no run wraps into a second epoch), block {a.block_size}, batch "
        f"{a.batch_size}, lr {a.learning_rate}, seed {a.seed}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, native "
        f"bfloat16 {'yes' if fast_bf16 else 'no'} (AVX512-BF16 or AMX), "
        f"torch {_v('torch')}, transformers {_v('transformers')}.",
        "",
        "Machine load (uptime) while it ran:",
        "",
        *[f"- {k}: `{v}`" for k, v in loads.items()],
        "",
        f"## 1. Throughput: {a.max_steps} steps, no validation, fresh processes, alternating",
        "",
        "tokens/s = tokens trained (the Trainer's num_input_tokens_seen) / Trainer "
        "train_runtime; wall = the whole process (imports, model load, tokenization, "
        "training, saving); peak RSS = the process's max resident memory.",
        "",
        "| run | tokens | train s | tokens/s | wall s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['tokens']} | {r['train_s']:.1f} | {r['tok_s']:.0f} | "
                     f"{r['wall_s']:.1f} | {r['rss_mib']:.0f} |")
    names = list(dict.fromkeys(r["name"] for r in rows))
    med = {n: statistics.median(r["tok_s"] for r in rows if r["name"] == n) for n in names}
    best = {n: max(r["tok_s"] for r in rows if r["name"] == n) for n in names}
    script = next(n for n in names if n.startswith("run_clm"))
    lines += ["", "| run | runs | median tokens/s | best tokens/s | median ratio to the "
              "script | median peak RSS MiB |", "|---|---:|---:|---:|---:|---:|"]
    for n in names:
        mine = [r for r in rows if r["name"] == n]
        lines.append(f"| {n} | {len(mine)} | {med[n]:.0f} | {best[n]:.0f} | "
                     f"{med[n] / med[script]:.2f}x | "
                     f"{statistics.median(r['rss_mib'] for r in mine):.0f} |")
    default = names[0]
    lines += ["", f"**Ratio, nlgen finetune's default over the Trainer script (float32): "
              f"{med[default] / med[script]:.2f}x median, {best[default] / best[script]:.2f}x "
              "best.**"]
    if losses:
        lines += ["", f"## 2. Final validation loss: {a.loss_steps} steps", "",
                  "Both losses measured in float32 by nlgen (with the KL against the base, "
                  "after training). wall = the whole process; in nlgen = from the start of "
                  "the run to the saved model; train = the Trainer's train_runtime.", "",
                  "| run | validation | loss before | loss after | KL from the base | tokens/s "
                  "| train s | in nlgen s | wall s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in losses:
            lines.append(f"| {r['name']} | {Path(r['held_out']).name} | "
                         f"{r['loss']['before']:.4f} | "
                         f"{r['loss']['after']:.4f} | {r['kl']:.4f} | {r['tok_s']:.0f} | "
                         f"{r['train_s']:.1f} | {r['inside_s']:.1f} | {r['wall_s']:.1f} |")
        for f32_run, dflt_run in zip(losses[::2], losses[1::2], strict=True):
            f32, dflt = f32_run["loss"]["after"], dflt_run["loss"]["after"]
            lines += ["", f"**Final validation loss on {Path(f32_run['held_out']).name}, "
                      f"default ({dflt_run['precision']}) vs float32: {dflt:.4f} vs {f32:.4f}, "
                      f"{(dflt - f32) / f32:+.2%}.**"]
    if padding:
        lines += ["", f"## 3. Padding: {padding[0]['examples']} synthetic conversations, "
                  f"batch {a.batch_size}, one epoch in-process", "",
                  "| batches | tokens | tokens with padding | padding share | s | "
                  "tokens/s (no padding) | trained tokens/s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in padding:
            lines.append(f"| {r['name']} | {r['tokens']} | {r['padded']} | "
                         f"{r['pad_share']:.0%} | {r['s']:.1f} | {r['tok_s']:.0f} | "
                         f"{r['trained_tok_s']:.0f} |")
        lines += ["", f"Like-length batches: {padding[1]['tok_s'] / padding[0]['tok_s']:.2f}x "
                  "the tokens/s of random ones."]
    for bf16, profile in profiles:
        total = sum(t for _, t in profile)
        lines += ["", f"## {'4' if not bf16 else '4b'}. One training step, "
                  f"{'bf16 autocast' if bf16 else 'float32'} (batch {a.batch_size}, block "
                  f"{a.block_size}, in-process, mean of 3 steps): {total:.2f} s a step", "",
                  "| part | s | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {t:.3f} | {t / total:.0%} |" for k, t in profile]
    return "\n".join(lines) + "\n"


def _v(dist: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(dist)


if __name__ == "__main__":
    main()
