"""Jobs: many records, many processes, crash-safe output.

Owns ranks and the ordered gathering of results under ``torchrun`` / ``accelerate launch``
(``distributed``), the job file with its identity and resume (``jobfile``), request files in
nlgen's and OpenAI's batch formats (``batchjob``, ``record_options``) and the sharded runs of
generate, perplexity and score (``parallel``).

May import: engine, score, models, and errors, inputs, batching, jsonl. Not finetune or cli.
"""
