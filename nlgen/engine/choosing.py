"""The next token of one sequence: generate()'s processors and warpers, and a seeded draw.

Each sequence the engine decodes (nlgen.engine.decode, nlgen.engine.continuous) owns a
:class:`Chooser`. Given the model's float32 logits for its next token, it applies what
``generate()`` applies, in its order:

1. the processors that do not warp (repetition penalty, no-repeat n-grams, bad words, min new
   tokens): transformers' own classes (min length and min new tokens: :class:`NoEosBefore`,
   the same scores for less), on this sequence's own tokens (no padding);
2. greedy: the argmax. Sampling: the warpers (temperature, top-k, top-p, then min-p,
   typical, epsilon, eta). Temperature, top-k and top-p, the common case, are computed on the
   top-k candidates instead of the whole vocabulary (:func:`warp`: the same kept set and
   probabilities as TopK/TopPLogitsWarper, tests/test_sampling_equivalence.py); any other
   warper runs as transformers' own class over the vocabulary;
3. the draw: Gumbel-max with this sequence's own generator, one float64 uniform vector over the
   vocabulary per step, exactly as nlgen.engine.sampling's GumbelMaxSampler draws for
   ``generate()``. So a seeded sequence gets the same tokens from either loop (in float32),
   alone or in any batch; an unseeded one gets a seed from torch's global generator.

torch and transformers are imported inside the functions that use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Warpers computed on the top-k candidates (warp); the others run over the vocabulary.
CANDIDATE_WARPERS = ("temperature", "top_k", "top_p")
FULL_WARPERS = ("top_h", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]


def processors(config: Any, prompt_length: int) -> Any:
    """generate()'s processors that come before its warpers, for one unpadded sequence whose
    prompt has ``prompt_length`` tokens (transformers' own classes, or nlgen's equal ones:
    :class:`NoRepeatNGram`, :class:`NoEosBefore`); None when there are none."""
    from transformers import generation as g

    found = g.LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        found.append(g.RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        found.append(NoRepeatNGram(config.no_repeat_ngram_size))
    eos = as_list(config.eos_token_id)
    if getattr(config, "bad_words_ids", None):
        found.append(g.NoBadWordsLogitsProcessor(config.bad_words_ids, eos))
    if config.min_length and eos:
        found.append(NoEosBefore(eos, config.min_length, 0))
    if config.min_new_tokens and eos:
        found.append(NoEosBefore(eos, config.min_new_tokens, prompt_length))
    return found or None


class NoRepeatNGram:
    """What transformers' NoRepeatNGramLogitsProcessor gives (every token that would repeat an
    n-gram of the sequence at -inf), kept up to date as one sequence grows instead of built
    again from all its tokens at every step. Each row's n-grams are indexed once (prefix of
    n - 1 tokens -> the tokens that followed it); a row that is not the last call's row plus
    new tokens is indexed again from its start."""

    def __init__(self, ngram_size: int) -> None:
        self.n = ngram_size
        self.rows: list[tuple[Any, dict[tuple[int, ...], set[int]]]] = []  # (ids seen, index)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        n, length = self.n, input_ids.shape[-1]
        if length + 1 < n:  # no complete n-gram can end at the next token
            return scores
        if len(self.rows) != input_ids.shape[0]:
            self.rows = [(input_ids[r, :0], {}) for r in range(input_ids.shape[0])]
        scores = scores.clone()
        for r, row in enumerate(input_ids):
            seen, index = self.rows[r]
            done = seen.shape[0]
            if done > length or not torch.equal(row[:done], seen):
                done, index = 0, {}
            offset = max(done - n + 1, 0)
            tokens = row[offset:].tolist()  # what the new n-grams and the last prefix need
            for end in range(max(done, n - 1) - offset, length - offset):  # n-grams' last
                index.setdefault(tuple(tokens[end - n + 1:end]), set()).add(tokens[end])
            self.rows[r] = (row.clone(), index)
            banned = index.get(tuple(tokens[len(tokens) - n + 1:]), ())
            if banned:
                scores[r, list(banned)] = -float("inf")
        return scores


class NoEosBefore:
    """What transformers' MinLengthLogitsProcessor (``skip`` 0) and
    MinNewTokensLengthLogitsProcessor (``skip``: the prompt's length) give: EOS at -inf while a
    sequence has fewer than ``minimum`` tokens after the first ``skip``, the scores unchanged
    after. Theirs build a mask over the whole vocabulary at every step (an arange, an isin and
    a where: half a millisecond a token over a 49k vocabulary); this sets the EOS entries."""

    def __init__(self, eos: list[int], minimum: int, skip: int) -> None:
        self.eos, self.minimum, self.skip = eos, minimum, skip

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if input_ids.shape[-1] - self.skip >= self.minimum:
            return scores
        vocab = scores.shape[-1]
        ids = [e for e in self.eos if 0 <= e < vocab]  # isin over the vocabulary ignores others
        scores = scores.clone()
        scores[:, ids] = -float("inf")
        return scores


def full_warpers(config: Any) -> bool:
    """Whether ``config`` asks for a warper that :func:`warp` does not compute."""
    from nlgen.engine.sampling import build_warpers

    names = {type(w).__name__ for w in build_warpers(config)}
    return bool(names - {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"})


def warp_logits(scores: Any, config: Any) -> tuple[Any, Any]:
    """Temperature, top-k and top-p for one row (1, V) as generate()'s warpers apply them:
    (warped logits, token ids), both (n,), over the candidates (top-k's, every token tied
    with the k-th included, as TopKLogitsWarper keeps them), -inf where top-p drops one."""
    import torch

    scores = scores[0]  # (V,): one row
    if config.temperature is not None and config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k:
        k = min(config.top_k, scores.shape[-1])
        values, indices = torch.topk(scores, k)  # (k,), descending
        tied = int((scores >= values[-1]).sum())
        if tied > k:
            values, indices = torch.topk(scores, tied)
    else:
        values, indices = torch.sort(scores, descending=True)  # (V,)
    if config.top_p is not None and config.top_p < 1.0:
        # TopPLogitsWarper: in ascending order, drop the tokens whose cumulative probability
        # stays within 1 - top_p; always keep the most likely one.
        ascending = values.flip(-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - config.top_p)
        drop[-1] = False
        values = ascending.masked_fill(drop, -float("inf")).flip(-1)
    return values, indices


def warp(scores: Any, config: Any) -> tuple[Any, Any]:
    """generate()'s warped distribution for one row: (probabilities, token ids), both (n,)."""
    values, indices = warp_logits(scores, config)
    return values.softmax(dim=-1), indices


class Chooser:
    """The next token of one sequence (see the module docstring).

    ``config``: a resolved generation config (nlgen.engine.sampling.resolve_config);
    ``prompt_length``: the sequence's prompt tokens; ``seed``: its generator's seed
    (nlgen.engine.sampling.row_seed), or None to take one from torch's global generator.
    """

    def __init__(self, config: Any, prompt_length: int, seed: int | None = None) -> None:
        import torch

        self.config = config
        self.processors = processors(config, prompt_length)
        self.sample = bool(config.do_sample)
        self.warpers = None
        self.generator = None
        if self.sample:
            if full_warpers(config):
                from nlgen.engine.sampling import build_warpers

                self.warpers = build_warpers(config)
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)))
            self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, tokens: Sequence[int], scores: Any) -> int:
        """The next token after ``tokens`` (prompt and generated so far) given its logits
        ``scores`` (1, V) float32."""
        import torch

        if not self.sample:
            return int(torch.argmax(self.processed(tokens, scores)[0]))
        values, indices = self.candidates(tokens, scores)
        return self.draw(values, indices, scores.shape[-1])

    def processed(self, tokens: Sequence[int], scores: Any) -> Any:
        """``scores`` (1, V) after the processors that do not warp."""
        import torch

        if self.processors is None:
            return scores
        return self.processors(torch.tensor([list(tokens)]), scores)

    def candidates(self, tokens: Sequence[int], scores: Any) -> tuple[Any, Any]:
        """(warped logits, token ids), both (n,): the tokens a draw may pick (-inf: dropped)."""
        import torch

        scores = self.processed(tokens, scores)
        if self.warpers is None:
            return warp_logits(scores, self.config)
        warped = self.warpers(torch.tensor([list(tokens)]), scores)[0]  # (V,)
        indices = torch.isfinite(warped).nonzero()[:, 0]  # (n,)
        return warped[indices], indices

    def distribution(self, tokens: Sequence[int], scores: Any) -> Any:
        """The probabilities (V,) float32 the next token is drawn from (greedy: one-hot at the
        argmax): what softmax gives after generate()'s processors and warpers."""
        import torch

        vocab = scores.shape[-1]
        probs = torch.zeros(vocab, dtype=torch.float32)
        if not self.sample:
            probs[self(tokens, scores)] = 1.0
            return probs
        values, indices = self.candidates(tokens, scores)
        probs[indices] = torch.softmax(values.float(), dim=-1)
        return probs

    def draw(self, values: Any, indices: Any, vocab: int) -> int:
        """Gumbel-max over the candidates, with GumbelMaxSampler's draws: the uniforms cover
        the whole vocabulary (one vector a step, so the stream does not depend on how many
        candidates were kept), and only the candidates' are used."""
        import torch

        uniform = torch.empty(vocab, dtype=torch.float64)
        uniform.uniform_(generator=self.generator)  # (V,) in [0, 1)
        logp = torch.log_softmax(values.float(), dim=-1)  # (n,)
        expo = (-torch.log(uniform[indices])).float()  # (n,) Exp(1)
        return int(indices[torch.argmax(logp - torch.log(expo))])
