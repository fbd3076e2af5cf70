"""Quick, in-process timings behind notes/score-readme.md (not a benchmark suite).

Best of two interleaved repeats, because the 2-core machines are shared:

    HF_HUB_OFFLINE=1 PYTHONPATH=. python notes/measure_score.py /tmp/mc32.jsonl LICENSE-like.txt

1. nlgen.records on multiple-choice records: records/s and requests/s.
2. perplexity of a text alone (scoring.Scorer) and with the model as its own reference
   (compare.ReferenceScorer): tokens/s, i.e. what --reference costs beyond perplexity.
3. generate 32 greedy tokens with and without --logprobs 5.
"""

from __future__ import annotations

import json
import sys
import time

from nlgen import compare, generation, records
from nlgen.inputs import Record, Text
from nlgen.likelihood import LikelihoodOptions
from nlgen.loading import load_model
from nlgen.scoring import ScoreOptions, Scorer


def best(fn, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(mc_path: str, text_path: str) -> None:
    lm = load_model("builtin", device="cpu", dtype="float32", purpose="score")
    rows = [json.loads(line) for line in open(mc_path, encoding="utf-8")]
    items = [records.from_record(Record(mc_path, i + 1, r), records.Fields())
             for i, r in enumerate(rows)]
    n_requests = sum(len(i.requests) for i in items)
    scorer = records.RecordScorer(lm, LikelihoodOptions(batch_size=8))
    t = best(lambda: list(scorer.score(items)))
    print(f"score: {len(items)} records ({n_requests} requests) in {t:.2f} s: "
          f"{len(items) / t:.1f} records/s, {n_requests / t:.1f} requests/s")

    text = [Text(text_path, open(text_path, encoding="utf-8").read())]
    opts = ScoreOptions(max_length=512, stride=256)
    plain = Scorer(lm, opts)
    ref = compare.ReferenceScorer(compare.Comparer(lm, opts, reference=lm))
    tokens = list(plain.score(text))[0].metrics.tokens
    t_plain = best(lambda: list(plain.score(text)))
    t_ref = best(lambda: list(ref.score(text)))
    print(f"perplexity: {tokens} tokens, alone {t_plain:.2f} s ({tokens / t_plain:.0f} tok/s), "
          f"with --reference {t_ref:.2f} s ({tokens / t_ref:.0f} tok/s)")

    lm_gen = load_model("builtin", device="cpu", dtype="float32")
    for k in (None, 5):
        opts_g = generation.GenerationOptions(max_new_tokens=32, greedy=True, logprobs=k)
        t_g = best(lambda o=opts_g: list(generation.generate(lm_gen, ["Once upon a time"], o)))
        print(f"generate 32 tokens, logprobs={k}: {t_g:.2f} s ({32 / t_g:.1f} tok/s)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
