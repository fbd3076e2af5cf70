"""nlgen perplexity against the plain loop of the Hugging Face guide, same text, model, window.

The guide is "Perplexity of fixed-length models" (https://huggingface.co/docs/transformers/
perplexity). Its loop runs here as written (batch of one, ``model(input_ids, labels=...)``), and
its value is reported twice:

- ``guide``: as the guide computes it, ``loss * (num_valid_tokens - batch_size)`` per window;
- ``guide, exact count``: the same losses weighted by the number of labels each loss really
  averaged. The guide subtracts one label per window for the shift; that is right for the first
  window only: an overlapping window's first label is already -100, so its loss covers
  ``trg_len`` tokens, not ``trg_len - 1``. nlgen counts the tokens it scores and must agree with
  this value (each token predicted once, with the most context, as the guide intends).

Runs are interleaved (guide, nlgen, guide, nlgen, ...) and the best time of each is kept: the
machines are shared and noisy. Throughput is tokens scored per second, the same count for both.

    python benchmarks/bench_perplexity.py                      # builtin model, float32 + bfloat16
    python benchmarks/bench_perplexity.py --model gpt2 --tokens 8192 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def license_text(dist: str = "transformers") -> Path:
    """Real prose every install has: an installed package's license (transformers: Apache-2.0).

    Not the test corpus, which repeats itself and flatters any method that caches nothing.
    """
    import importlib.metadata

    found = [f for f in importlib.metadata.distribution(dist).files or ()
             if f.name.startswith("LICENSE")]
    if not found:
        raise SystemExit(f"no license file in the {dist} distribution; pass --text")
    return Path(str(found[0].locate()))


DEFAULT_TEXT = license_text()


def guide_loop(model, input_ids_all, max_length: int, stride: int) -> tuple[float, float, int]:
    """The guide's loop, verbatim but for the bookkeeping of the exact count.

    Returns (guide's perplexity, perplexity with the exact count, tokens the loss covered).
    """
    import torch

    seq_len = input_ids_all.size(1)
    nll_sum = 0.0
    n_tokens = 0
    exact_sum = 0.0
    exact_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = input_ids_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100

        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss

        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size  # the guide: "internal label shift"
        nll_sum += neg_log_likelihood.item() * num_loss_tokens
        n_tokens += num_loss_tokens

        covered = (target_ids[:, 1:] != -100).sum().item()  # labels the loss really averaged
        exact_sum += neg_log_likelihood.item() * covered
        exact_tokens += covered

        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), math.exp(exact_sum / exact_tokens), exact_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT,
                        help="UTF-8 text to score (default: the test corpus)")
    parser.add_argument("--tokens", type=int, default=4096,
                        help="score the first N tokens of the text (0: all)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8],
                        help="nlgen's windows per forward pass (one row each)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from nlgen import inputs
    from nlgen.models.loading import load_model
    from nlgen.score import scoring

    rows = []
    reference = None  # float32 guide value with the exact count
    for dtype in args.dtypes:
        lm = load_model(args.model, device="cpu", dtype=dtype, purpose="score")
        ids = lm.tokenizer(args.text.read_text(encoding="utf-8"))["input_ids"]
        if args.tokens:
            ids = ids[: args.tokens]
        text = lm.tokenizer.decode(ids)
        # nlgen tokenizes the text itself: check it finds the same tokens, or the race is unfair.
        ids = lm.tokenizer(text)["input_ids"]
        input_ids = torch.tensor([ids])
        nlgen_runs = {f"nlgen, batch {b}": scoring.ScoreOptions(
            max_length=args.max_length, stride=args.stride, batch_size=b) for b in args.batch_size}
        times: dict[str, list[float]] = {"guide": [], **{k: [] for k in nlgen_runs}}
        values: dict[str, float] = {}
        for _ in range(args.repeats):
            start = time.perf_counter()
            guide_ppl, exact_ppl, covered = guide_loop(lm.model, input_ids, args.max_length,
                                                       args.stride)
            times["guide"].append(time.perf_counter() - start)
            for name, opts in nlgen_runs.items():
                start = time.perf_counter()
                [result] = scoring.score_texts(lm, [inputs.Text("bench", text)], opts)
                times[name].append(time.perf_counter() - start)
                values[name] = result.metrics.perplexity
        tokens = result.metrics.tokens
        assert tokens == covered, (tokens, covered)
        if reference is None:
            reference = exact_ppl
        best = {k: min(v) for k, v in times.items()}
        for name, ppl in (("guide (as written)", guide_ppl), ("guide, exact count", exact_ppl),
                          *values.items()):
            method = name if name in values else "guide"
            rows.append({
                "dtype": dtype, "method": name, "tokens": tokens,
                "seconds": best[method], "tps": tokens / best[method], "ppl": ppl,
                "rel": (ppl - reference) / reference,
                "speed": best["guide"] / best[method],
            })
        del lm

    shown = args.text.relative_to(ROOT) if args.text.is_relative_to(ROOT) else args.text
    print(f"model {args.model}, text {shown} "
          f"({tokens + 1} tokens), window {args.max_length}, stride {args.stride}, "
          f"best of {args.repeats} interleaved runs; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print()
    print("| dtype | method | tokens scored | best time (s) | tokens/s | perplexity "
          "| rel. diff vs float32 guide (exact count) | speed vs guide, same dtype |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['method']} | {r['tokens']} | {r['seconds']:.2f} | "
              f"{r['tps']:.0f} | {r['ppl']:.6f} | {r['rel']:+.2e} | {r['speed']:.2f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
