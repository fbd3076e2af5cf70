"""The generation engine: prompts + options -> completions.

Owns what a user asks (``options``, ``extra_options`` for ``-o``), the choice between nlgen's
own loop and transformers' ``generate()`` (``decode.runner``, ``--engine``), the lean forwards
(``lean_llama``: the Llama family; ``lean_gpt2``) and their weights (``lean_weights``: from a
loaded model, or read straight from a saved directory and the int4 cache, handed to
models.loading as its ``lean_reader``), the sequences of a batch in slots of one cache
(``slots``), the next token of a sequence (``choosing``: generate()'s processors and warpers,
the seeded draw), the decode loop (``decode``), batched generation (``generation``: the one
entry point every command uses), continuous batching for the server (``continuous``),
sampling with per-prompt seeded streams (``sampling``), stop strings and streamed text
(``streaming``) and token log-probs (``token_logprobs``).

May import: models, score (the log-prob records), and errors, inputs, batching, jsonl.
"""
