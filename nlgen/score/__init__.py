"""Scoring: how likely a model finds text, and how two models differ on it.

Owns one scoring kernel (``kernel``: packed rows, the LM head a chunk at a time, float32
log-softmax, float64 sums), perplexity over sliding windows and its metrics (``windows``,
``scoring``), log-likelihoods of continuations and multiple choice (``likelihood``, ``records``),
comparison with a reference model (``compare``: KL, agreement) and the bytes behind tokens
(``token_bytes``).

May import: models, and errors, inputs, batching, jsonl. Nothing above (engine, jobs, ...).
"""
