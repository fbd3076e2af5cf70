"""Models: a ``--model`` value -> a loaded model, in the form its weights run.

Owns the model specs (Hub id, directory, ``.gguf``, builtin) and the fallback of the default,
loading (``loading``: which way a model is read; ``readers``: transformers' ``from_pretrained``,
or the direct read of a Llama's tensors), the GGUF conversion cache (``gguf``), the weight
formats (``quantized``: int4/int8 layers, a GGUF model's own blocks, the int4 cache;
``lean_weights``: the lean forwards' weights), devices and dtypes (``devices``), LoRA adapters
(``adapters``) and the catalog of local models (``catalog``).

May import: errors, inputs, batching, jsonl. Nothing above (score, engine, jobs, finetune, cli).
"""
