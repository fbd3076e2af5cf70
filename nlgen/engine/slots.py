"""Many sequences on one lean forward: each in its own slot of the key/value cache.

A slot holds one sequence's keys and values (nlgen.engine.lean_llama.KVCache). A sequence
enters with its prompt (:meth:`Slots.prefill`: the prompt alone, unpadded, in its slot), then
each :meth:`Slots.step` feeds one new token to every live slot at once, each at its own
position, with a mask that keeps each slot to its own keys. Nothing is padded, so a sequence
computes the same numbers whichever other sequences share the step (in float32; bfloat16
products may round differently with the number of rows), and a slot freed by a finished
sequence takes the next one at once: the batch of ``nlgen generate -f``, ``-N`` and the
continuous batching of ``nlgen serve`` (nlgen.engine.continuous) are this one loop.

torch is imported inside the functions that use it.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any


class Slots:
    """``slots`` sequences of at most ``max_len`` tokens each, on ``lm``'s lean forward (the
    caller has checked nlgen.engine.decode.lean_reason)."""

    def __init__(self, lm: Any, slots: int, max_len: int) -> None:
        from nlgen.engine import lean_gpt2, lean_llama, lean_weights

        weights = lm.lean if lm.lean is not None else weights_of(lm.model)
        kind = lean_gpt2.LeanGPT2 if isinstance(weights, lean_weights.GPT2Weights) \
            else lean_llama.LeanLlama
        self.forward = kind(weights, max_len, slots)
        self.max_len = max_len
        self.count = slots
        self.length = [0] * slots  # tokens in each slot's cache

    def prefill(self, slot: int, ids: list[int]) -> Any:
        """Put a sequence's prompt ``ids`` in ``slot``: the logits (1, V) float32 of its next
        token."""
        import torch

        if len(ids) > self.max_len:
            raise ValueError(f"{len(ids)} tokens exceed the cache ({self.max_len})")
        logits = self.forward.step(torch.tensor([ids]), 0, slot)
        self.length[slot] = len(ids)
        return logits

    def copy(self, source: int, target: int) -> None:
        """Slot ``target`` holds what ``source`` holds (a prompt sampled n times is read once)."""
        cache = self.forward.cache
        end = self.length[source]
        cache.keys[:, target, :, :end] = cache.keys[:, source, :, :end]
        cache.values[:, target, :, :end] = cache.values[:, source, :, :end]
        self.length[target] = end

    def step(self, feed: Mapping[int, int]) -> Any:
        """Feed token ``feed[slot]`` to each slot named: logits (S, V) float32, row s the next
        token's of slot s (S = the highest slot fed + 1; rows of slots not fed are
        meaningless)."""
        import torch

        rows = max(feed) + 1
        if rows == 1:  # one sequence: the plain path, no mask
            [(slot, token)] = feed.items()
            logits = self.forward.step(torch.tensor([[token]]), self.length[slot], slot)
        else:
            ids = torch.zeros(rows, 1, dtype=torch.long)  # (S, 1)
            positions = torch.zeros(rows, dtype=torch.long)  # (S,): idle slots write at 0
            for slot, token in feed.items():
                ids[slot, 0] = token
                positions[slot] = self.length[slot]
            logits = self.forward.step_rows(ids, positions)
        for slot in feed:
            self.length[slot] += 1
        return logits


# A loaded model -> its lean weights, made once (fused int4 weights are copies) and let go
# with the model. Kept here, not in LoadedModel.lean (the weights read from files, which
# stand in for a model not built yet).
_made: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def weights_of(model: Any) -> Any:
    from nlgen.engine import lean_weights

    if model not in _made:
        _made[model] = lean_weights.from_model(model)
    return _made[model]
