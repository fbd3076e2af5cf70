"""nlgen.score.likelihood against lm-eval's own ``HFLM.loglikelihood``: values and speed.

Both score the same (context, continuation) requests with the same model object in memory:
lm-eval through ``HFLM(pretrained=model, tokenizer=tokenizer)``, nlgen through
``score_continuations``. Reported: the largest difference of the log-likelihoods, whether
``is_greedy`` agrees everywhere, and requests per second (best of interleaved repeats: the
machines are shared and noisy).

The requests are of two kinds, as lm-eval's tasks make them: a text cut into context and next
words (LAMBADA-like), and four one-word choices after one context (multiple choice, where
lm-eval's logits cache scores single-token choices of one context with a single forward pass).

lm-eval is not a dependency of nlgen: run this with an environment that has both, e.g. a venv
with lm_eval installed and nlgen's packages reachable (a .pth file to nlgen's site-packages):

    PYTHONPATH=. /work/lmeval-venv/bin/python benchmarks/bench_score.py --model tiny
    PYTHONPATH=. /work/lmeval-venv/bin/python benchmarks/bench_score.py --model builtin -n 64
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "corpus.txt"


def make_requests(n: int) -> list[tuple[str, str]]:
    """n requests from the test corpus: half next-words, half four-way multiple choice."""
    words = TEXT.read_text(encoding="utf-8").split()
    requests = []
    for i in range(n // 2):
        start = (i * 37) % max(1, len(words) - 80)
        length = 8 + (i * 13) % 60  # varied lengths: padding at work
        context = " ".join(words[start:start + length])
        requests.append((context, " " + " ".join(words[start + length:start + length + 3])))
    choices = [" fox", " river", " the", " and"]
    for i in range(n - len(requests)):
        start = (i * 53) % max(1, len(words) - 40)
        context = " ".join(words[start:start + 20]) + " "  # trailing space: lm-eval moves it
        requests.append((context, choices[i % 4].strip()))
    return requests


def load(name: str):
    from nlgen.models.loading import load_model

    if name == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_tiny_gpt2

        name = str(build_tiny_gpt2(Path(tempfile.mkdtemp(prefix="bench-score-"))))
    return load_model(name, device="cpu", dtype="float32", purpose="score")


def run_lm_eval(hflm, requests) -> tuple[list[tuple[float, bool]], float]:
    from lm_eval.api.instance import Instance

    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(requests)]
    start = time.perf_counter()
    out = hflm.loglikelihood(instances, disable_tqdm=True)
    return out, time.perf_counter() - start


def run_nlgen(lm, requests, batch_size: int) -> tuple[list[tuple[float, bool]], float]:
    from nlgen.score.likelihood import Request, score_continuations

    start = time.perf_counter()
    results = list(score_continuations(lm, [Request(c, x) for c, x in requests],
                                       batch_size=batch_size))
    elapsed = time.perf_counter() - start
    return [(r.logprob, r.is_greedy) for r in results], elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (built here), builtin, or a path")
    parser.add_argument("-n", "--requests", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its truncation notices
    torch.manual_seed(0)
    lm = load(args.model)
    hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=args.batch_size)
    requests = make_requests(args.requests)
    best = {"lm-eval": math.inf, "nlgen": math.inf}
    for _ in range(args.repeats):  # interleaved, best of each
        theirs, t = run_lm_eval(hflm, requests)
        best["lm-eval"] = min(best["lm-eval"], t)
        ours, t = run_nlgen(lm, requests, args.batch_size)
        best["nlgen"] = min(best["nlgen"], t)
    diffs = [abs(a[0] - b[0]) for a, b in zip(theirs, ours, strict=True)]
    greedy_same = sum(a[1] == b[1] for a, b in zip(theirs, ours, strict=True))
    print(f"model {lm.name} ({lm.dtype}, {lm.device}), {len(requests)} requests, "
          f"batch {args.batch_size}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}")
    print(f"max |logprob difference|: {max(diffs):.3g} nats "
          f"(mean {sum(diffs) / len(diffs):.3g}; logprobs from {min(o[0] for o in ours):.1f} "
          f"to {max(o[0] for o in ours):.1f})")
    print(f"is_greedy agrees: {greedy_same}/{len(requests)}")
    for name, seconds in best.items():
        print(f"{name:8s} {len(requests) / seconds:8.1f} requests/s  ({seconds:.2f} s best of "
              f"{args.repeats})")


if __name__ == "__main__":
    main()
