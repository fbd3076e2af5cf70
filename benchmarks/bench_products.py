"""What a decoding step's weight products cost on this CPU, apart from any model.

One token's step multiplies one row by every weight: the products read the weights and do
little else. This script measures, in one process, on GPT-2-small's shapes in bfloat16 (12
layers x the four products of a block, each layer its own weights, as in a model: 170 MB, more
than any cache; and the 50257 x 768 LM head, 77 MB):

  - how fast this machine reads memory at all (``sum`` over a 170 MB bfloat16 tensor);
  - the 48 products as transformers runs them (``addmm`` on Conv1D's (in, out) weights) and as
    ``linear`` on (out, in) weights;
  - the same products with the weights in oneDNN's blocked layout (``torch.ops.mkldnn.
    _reorder_linear_weight`` once, ``_linear_pointwise`` each time: nlgen.engine.packed);
  - the LM head, plain and packed;

at 1 row (a decoding step) and 20 rows (a short prompt). Medians of --repeats rounds.

    python benchmarks/bench_products.py [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # a GPT-2-small block, (in, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load at start: {os.getloadavg()[0]:.2f}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)

    def timed(f, repeats=args.repeats) -> float:
        for _ in range(3):
            f()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000  # ms

    g = torch.Generator().manual_seed(0)
    big = torch.randn(85_000_000, generator=g).to(torch.bfloat16)  # 170 MB
    ms = timed(big.sum)
    rows = [("sum over 170 MB of bfloat16", f"{ms:.2f} ms", f"{170 / ms:.1f} GB/s")]
    del big
    conv = [[(torch.randn(i, o, generator=g) * 0.02).to(torch.bfloat16) for i, o in SHAPES]
            for _ in range(12)]
    bias = [[(torch.randn(o, generator=g) * 0.02).to(torch.bfloat16) for _, o in SHAPES]
            for _ in range(12)]
    linear = [[w.T.contiguous() for w in layer] for layer in conv]
    packed = [[torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in layer] for layer in linear]
    mb = sum(i * o for i, o in SHAPES) * 12 * 2 / 1e6
    head = (torch.randn(50257, 768, generator=g) * 0.02).to(torch.bfloat16)
    head_packed = torch.ops.mkldnn._reorder_linear_weight(head, 1)
    for m in (1, 20):
        xs = [torch.randn(m, i, generator=g).to(torch.bfloat16) for i, _ in SHAPES]

        def each(product, weights, xs=xs):
            def run():
                for layer, biases in zip(weights, bias):
                    for x, w, b in zip(xs, layer, biases):
                        product(x, w, b)
            return run

        kinds = {
            "addmm, Conv1D's (in, out) weights (transformers)":
                each(lambda x, w, b: torch.addmm(b, x, w), conv),
            "linear, (out, in) weights": each(torch.nn.functional.linear, linear),
            "oneDNN's packed layout (nlgen)": each(
                lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
                packed),
        }
        for name, products in kinds.items():
            ms = timed(products)
            rows.append((f"48 products, {m} row(s): {name}", f"{ms:.2f} ms", f"{mb / ms:.1f} GB/s"))
        x = xs[0]
        heads = (("plain linear", lambda x=x: torch.nn.functional.linear(x, head)),
                 ("oneDNN's packed layout", lambda x=x: torch.ops.mkldnn._linear_pointwise(
                     x, head_packed, None, "none", [], "")))
        for name, product in heads:
            ms = timed(product)
            rows.append((f"LM head 50257 x 768, {m} row(s): {name}", f"{ms:.2f} ms",
                         f"{77.2 / ms:.1f} GB/s"))
    print("| measure | median | weights read |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nload at end: {os.getloadavg()[0]:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
