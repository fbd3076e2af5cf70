"""Models: a ``--model`` value -> a loaded model, in the form its weights run.

Owns the model specs (``spec``: Hub id, directory, ``.gguf``, builtin; the fallback of the
default), loading (``loading``: which way a model is read, with a hook for the engine's own
reader of the weights it runs; ``readers``: transformers' ``from_pretrained`` and the
tokenizer), the GGUF conversion cache (``gguf``), the weight formats (``quantized``: int4/int8
layers, a GGUF model's own blocks, the int4 cache), devices and dtypes (``devices``), LoRA
adapters (``adapters``) and the catalog of local models (``catalog``).

May import: errors, inputs, batching, jsonl. Nothing above (score, engine, jobs, finetune, cli).
"""
