"""nlgen.score.likelihood and nlgen.score.compare against brute force on the tiny random GPT-2.

Every reference value is computed here without the code under test: one forward pass per
predicted token (or per window), log-softmax in float64, gathered position by position.
"""

from __future__ import annotations

import copy
import math

import pytest
from conftest import CORPUS, build_tiny_gpt2

from nlgen.errors import ModelError, UsageError
from nlgen.inputs import Text
from nlgen.models.loading import LoadedModel, load_model
from nlgen.score import compare, likelihood
from nlgen.score.likelihood import Request, encode_pair, score_continuations
from nlgen.score.scoring import ScoreOptions
from nlgen.score.windows import plan_windows

TEXT = CORPUS.read_text(encoding="utf-8")
WORDS = TEXT.split()
PAIRS = [
    Request("The fox ran into the", " forest"),
    Request("The cat ", "sat on the mat."),  # trailing space moves to the continuation
    Request("Once upon a time", " there was a little fox who lived at the edge of a wood"),
    Request("A", " b"),
    Request("", "The heron laughed."),  # empty context: the prefix token stands for it
    Request("caf\u00e9 au lait", " na\u00efve \u65e5\u672c"),  # multi-byte characters
    Request(TEXT[:200], " and then"),  # about 90 tokens: the longest, not truncated
]


def lm_eval_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """(context + continuation ids, continuation length) by lm-eval's rule, written out again."""
    if context == "":
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return [tokenizer.bos_token_id, *cont], len(cont)
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer(stripped + continuation)["input_ids"]
    ctx = tokenizer(stripped)["input_ids"]
    return ctx + whole[len(ctx):], len(whole) - len(ctx)


_BRUTE: dict[tuple, tuple[list[float], list[int]]] = {}  # the batch sizes share the slow part


def brute_logprobs(model, ids: list[int], n_cont: int) -> tuple[list[float], list[int]]:
    """log p(token t | all tokens before it) and the argmax there, for the last n_cont tokens."""
    key = (id(model), tuple(ids), n_cont)
    if key not in _BRUTE:
        _BRUTE[key] = _brute_logprobs(model, ids, n_cont)
    return _BRUTE[key]


def _brute_logprobs(model, ids: list[int], n_cont: int) -> tuple[list[float], list[int]]:
    import torch

    logprobs, argmax = [], []
    with torch.no_grad():
        for t in range(len(ids) - n_cont, len(ids)):
            logits = model(torch.tensor([ids[:t]])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1)
            logprobs.append(lp[ids[t]].item())
            argmax.append(int(lp.argmax()))
    return logprobs, argmax


# ----------------------------------------------------------------------------- tokenization


def test_trailing_space_moves_to_the_continuation(tiny_lm):
    tok = tiny_lm.tokenizer
    a = encode_pair(tok, "The cat", " sat")
    b = encode_pair(tok, "The cat ", "sat")
    assert a == b
    assert a[0] == tok("The cat")["input_ids"]
    assert a[0] + a[1] == tok("The cat sat")["input_ids"]


def test_empty_context_uses_the_prefix_token(tiny_lm):
    tok = tiny_lm.tokenizer
    prefix = likelihood.prefix_token_id(tok)
    assert prefix == tok.bos_token_id
    assert encode_pair(tok, "", "The fox") == ([prefix], tok("The fox")["input_ids"])
    # A continuation that starts with the prefix token gives it up as its context (lm-eval).
    assert encode_pair(tok, "", tok.bos_token + "The fox") == ([prefix],
                                                                tok("The fox")["input_ids"])


# ----------------------------------------------------------------------------- log-likelihoods


@pytest.mark.parametrize("batch_size", [1, 8])
def test_logprob_sums_match_brute_force(tiny_lm, batch_size):
    results = list(score_continuations(tiny_lm, PAIRS, batch_size=batch_size, want_tokens=True))
    assert [r.request for r in results] == PAIRS  # input order, whatever the batching
    for request, result in zip(PAIRS, results, strict=True):
        assert result.ok, result.error
        ids, n_cont = lm_eval_ids(tiny_lm.tokenizer, request.context, request.continuation)
        logprobs, argmax = brute_logprobs(tiny_lm.model, ids, n_cont)
        assert result.num_tokens == n_cont == len(result.tokens)
        assert result.logprob == pytest.approx(math.fsum(logprobs), abs=1e-4)
        assert [t.logprob for t in result.tokens] == pytest.approx(logprobs, abs=1e-4)
        assert [t.token_id for t in result.tokens] == ids[-n_cont:]
        assert result.is_greedy == (argmax == ids[-n_cont:])
        assert not result.truncated
        assert result.num_bytes == len(request.continuation.encode())
        # Byte-level tokens: their bytes join to the continuation (with the moved whitespace).
        moved = request.context[len(request.context.rstrip()):] + request.continuation
        assert b"".join(bytes(t.bytes) for t in result.tokens) == moved.encode()


def test_is_greedy_on_a_greedy_continuation(tiny_lm):
    import torch

    tok, model = tiny_lm.tokenizer, tiny_lm.model
    for start in range(0, 400, 7):  # the first context whose 4 greedy tokens survive decoding
        context = " ".join(WORDS[start:start + 6])
        ids, out = tok(context)["input_ids"], []
        with torch.no_grad():
            for _ in range(4):
                out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
        continuation = tok.decode(out)
        if tok(context + continuation)["input_ids"] == ids + out:
            break
    else:
        pytest.fail("no greedy continuation survives a decode/encode round trip")
    others = [Request(context, continuation + " fox"), Request(context, " the fox")]
    greedy, *rest = score_continuations(tiny_lm, [Request(context, continuation), *others])
    assert greedy.num_tokens == 4 and greedy.is_greedy
    for result in rest:
        ids, n = lm_eval_ids(tok, result.request.context, result.request.continuation)
        assert result.is_greedy is (brute_logprobs(model, ids, n)[1] == ids[-n:]) is False


def test_top_k_alternatives(tiny_lm):
    request = PAIRS[2]
    [result] = score_continuations(tiny_lm, [request], top_k=5)
    ids, n_cont = lm_eval_ids(tiny_lm.tokenizer, request.context, request.continuation)
    _, argmax = brute_logprobs(tiny_lm.model, ids, n_cont)
    assert len(result.tokens) == n_cont  # top_k implies per-token results
    for token, best in zip(result.tokens, argmax, strict=True):
        values = [alt.logprob for alt in token.top]
        assert len(values) == 5 and values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values)
        assert token.top[0].token_id == best
        assert token.logprob <= values[0] + 1e-6
        for alt in token.top:
            if alt.token_id == token.token_id:
                assert alt.logprob == pytest.approx(token.logprob, abs=1e-6)


def test_long_context_is_truncated_on_the_left(tiny_lm):
    request = Request(TEXT[:2000], " and then the fox")
    [result] = score_continuations(tiny_lm, [request])
    ids, n_cont = lm_eval_ids(tiny_lm.tokenizer, request.context, request.continuation)
    limit = tiny_lm.context_length  # 128
    assert len(ids) > limit + 1 and result.truncated
    kept = ids[-(limit + 1):]  # the model reads all but the last: `limit` tokens
    assert result.context_tokens == len(kept) - n_cont
    logprobs, _ = brute_logprobs(tiny_lm.model, kept, n_cont)
    assert result.logprob == pytest.approx(math.fsum(logprobs), abs=1e-4)


def test_bad_requests_are_reported_in_place(tiny_lm):
    requests = [PAIRS[0], Request("context", ""), Request("x", " word" * 200), PAIRS[3]]
    results = list(score_continuations(tiny_lm, requests, batch_size=2))
    assert [r.ok for r in results] == [True, False, False, True]
    assert "empty continuation" in results[1].error
    assert "longer than the model's context (128 tokens)" in results[2].error
    with pytest.raises(UsageError, match="--top-k"):
        list(score_continuations(tiny_lm, PAIRS, top_k=-1))
    with pytest.raises(UsageError, match="longer than the model's context"):
        list(score_continuations(tiny_lm, PAIRS, max_length=4096))


# ----------------------------------------------------------------------------- comparing models


@pytest.fixture(scope="module")
def other_lm(tmp_path_factory):
    """A second tiny GPT-2: other random weights, the same (deterministically trained) tokenizer."""
    path = build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2-seed1"), seed=1)
    return load_model(str(path), device="cpu", dtype="float32")


def brute_compare(model, reference, ids: list[int], max_length: int, stride: int) -> list[float]:
    """[reference nll, model nll, KL(reference || model), top-1 agreements, tokens], float64."""
    import torch

    sums = [0.0] * 5
    with torch.no_grad():
        for begin, end, first in plan_windows(len(ids), max_length, stride):
            window = torch.tensor([ids[begin:end]])
            lp = torch.log_softmax(model(window).logits[0].double(), -1)  # (T, V)
            ref = torch.log_softmax(reference(window).logits[0].double(), -1)
            for t in range(first, end):
                j = t - 1 - begin  # the position that predicts token t
                sums[0] -= ref[j, ids[t]].item()
                sums[1] -= lp[j, ids[t]].item()
                sums[2] += (ref[j].exp() * (ref[j] - lp[j])).sum().item()
                sums[3] += int(lp[j].argmax() == ref[j].argmax())
                sums[4] += 1
    return sums


def test_kl_and_perplexities_match_brute_force(tiny_lm, other_lm):
    assert tiny_lm.tokenizer.get_vocab() == other_lm.tokenizer.get_vocab()
    compare.check_same_tokenizer(tiny_lm.tokenizer, other_lm.tokenizer)
    texts = [TEXT[:400], TEXT[400:520]]
    opts = ScoreOptions(max_length=32, stride=12, batch_size=3)
    results = list(compare.compare_texts(other_lm, [Text("t", t) for t in texts], opts,
                                         reference=tiny_lm))
    for text, result in zip(texts, results, strict=True):
        ids = tiny_lm.tokenizer(text)["input_ids"]
        ref_nll, nll, kl, agree, tokens = brute_compare(other_lm.model, tiny_lm.model, ids, 32, 12)
        m = result.metrics
        assert (m.tokens, m.agree) == (tokens, agree)
        assert m.reference_nll_sum == pytest.approx(ref_nll, rel=1e-5)
        assert m.nll_sum == pytest.approx(nll, rel=1e-5)
        assert m.kl_sum == pytest.approx(kl, rel=1e-4) and m.kl > 0
        assert m.ratio == pytest.approx(m.perplexity / m.reference_perplexity)
    whole = compare.total(results)
    assert whole.tokens == sum(r.metrics.tokens for r in results)
    assert whole.kl == pytest.approx(sum(r.metrics.kl_sum for r in results) / whole.tokens)


def test_a_model_against_itself(tiny_lm):
    items = [Text("a", TEXT[:500]), Text("b", " "), Text("c", TEXT[500:700])]
    results = list(compare.compare_texts(tiny_lm, items, ScoreOptions(max_length=64),
                                         reference=tiny_lm))
    assert [r.ok for r in results] == [True, False, True]
    assert "empty text" in results[1].error
    m = compare.total(results)
    assert abs(m.kl) < 1e-6 and m.agreement == 1.0 and m.ratio == 1.0


def test_compare_ids_equals_compare_on_the_same_tokens(tiny_lm, other_lm):
    """finetune's validation KL reads token blocks; they give what the text they encode gives."""
    opts = ScoreOptions(max_length=32, stride=32, batch_size=2)
    ids = tiny_lm.tokenizer(TEXT[:300])["input_ids"]
    comparer = compare.Comparer(other_lm, opts, reference=tiny_lm)
    [from_ids] = comparer.compare_ids([ids])
    [from_text] = comparer.compare([Text("t", TEXT[:300])])
    assert from_ids.metrics == from_text.metrics
    ref_nll, nll, kl, agree, tokens = brute_compare(other_lm.model, tiny_lm.model, ids, 32, 32)
    assert from_ids.metrics.kl_sum == pytest.approx(kl, rel=1e-4)
    assert (from_ids.metrics.tokens, from_ids.metrics.agree) == (tokens, agree)


def test_different_tokenizers_are_refused(tiny_lm):
    tokenizer = copy.deepcopy(tiny_lm.tokenizer)
    tokenizer.add_tokens(["<extra-token>"])
    with pytest.raises(ModelError, match="tokenizers differ: vocabularies of 400 and 401"):
        compare.check_same_tokenizer(tiny_lm.tokenizer, tokenizer)
    other = LoadedModel(tiny_lm.model, tokenizer, "other", "", "cpu", "float32")
    with pytest.raises(ModelError, match="tokenizers differ"):
        compare.Comparer(tiny_lm, ScoreOptions(), reference=other)
    with pytest.raises(UsageError, match="nothing to compare"):
        compare.Comparer(tiny_lm, ScoreOptions())


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # peft's notices
def test_lora_adapter_switched_off_is_the_reference(tiny_model, tmp_path):
    """One model in memory serves as both: the reference runs inside disable_adapter()."""
    from peft import LoraConfig, get_peft_model

    base = load_model(str(tiny_model), device="cpu", dtype="float32")
    plain = load_model(str(tiny_model), device="cpu", dtype="float32")  # an untouched copy
    peft = get_peft_model(base.model, LoraConfig(r=4, target_modules=["c_attn"],
                                                 init_lora_weights=False))
    # The inner model (adapter layers injected) keeps the body/head split of nlgen.score.scoring.
    lora = LoadedModel(peft.base_model.model, base.tokenizer, "lora", "", "cpu", "float32")
    items = [Text("t", TEXT[:300])]
    opts = ScoreOptions(max_length=32)
    [one] = compare.compare_texts(lora, items, opts, reference_ctx=peft.disable_adapter)
    [two] = compare.compare_texts(lora, items, opts, reference=plain)
    assert one.metrics.kl > 1e-4  # the adapter changes the model
    assert one.metrics.kl_sum == pytest.approx(two.metrics.kl_sum, rel=1e-5)
    assert one.metrics.reference_nll_sum == pytest.approx(two.metrics.reference_nll_sum, rel=1e-6)


def test_token_bytes_of_a_byte_fallback_tokenizer():
    """Llama-2-style pieces: "\u2581" for a space, <0xNN> for a byte with no piece of its own."""
    from types import SimpleNamespace

    from tokenizers import decoders

    from nlgen.score.token_bytes import TokenText

    pieces = ["\u2581caf", "\u00e9", "<0xE6>", "<0x97>", "<0xA5>"]
    fake = SimpleNamespace(
        backend_tokenizer=SimpleNamespace(decoder=decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])),
        convert_ids_to_tokens=lambda i: pieces[i],
        decode=lambda ids: pieces[ids[0]].replace("\u2581", " "))  # good enough for the text
    text = TokenText(fake)
    assert text.kind == "byte_fallback"
    joined = b"".join(bytes(text(i)[1]) for i in range(len(pieces)))
    assert joined.decode("utf-8") == " caf\u00e9\u65e5"
