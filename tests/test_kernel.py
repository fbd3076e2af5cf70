"""The scoring kernel against full-vocabulary logits, the packing, the ordered batches.

The reference computation here is the plain one: the model's own forward over the whole batch,
(B, T, V) logits, one log-softmax in float32, every number read off it. The kernel must give the
same per-row values while it runs the LM head a few rows at a time.
"""

from __future__ import annotations

import copy

import pytest

from nlgen.batching import run_in_order, sorted_batches
from nlgen.score import kernel

SEQUENCES = [  # (tokens read, first predicting position, targets): ragged, so padding is used
    ([5, 17, 42, 8, 99, 3, 61, 7, 12], 2, [99, 3, 61, 7, 12, 4]),
    ([300, 2, 77, 10], 0, [2, 77, 10]),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 7, [9, 10, 11, 12, 13]),
    ([250, 251], 1, [252]),
]


@pytest.fixture(scope="module")
def reference_model(tiny_lm):
    """The tiny model with every weight moved a little: a reference that disagrees with it."""
    import torch

    model = copy.deepcopy(tiny_lm.model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def full_logprobs(model, batch):
    """log_softmax of the model's own (B, T, V) logits at the predicting positions: (N, V)."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits  # (B, T, V)
        return torch.log_softmax(logits.float(), dim=-1)[batch.where]  # (N, V)


def test_pack_rows_pads_right_and_gathers_the_predicting_positions():
    batch = kernel.pack_rows(SEQUENCES, pad_id=0, device="cpu")
    assert batch.ids.shape == (4, 12)
    assert batch.ids[1].tolist() == [300, 2, 77, 10] + [0] * 8
    assert batch.mask[3].tolist() == [1, 1] + [0] * 10
    assert batch.counts == [6, 3, 5, 1]
    rows, cols = batch.where
    assert rows.tolist() == [0] * 6 + [1] * 3 + [2] * 5 + [3]
    assert cols.tolist() == [2, 3, 4, 5, 6, 7, 0, 1, 2, 7, 8, 9, 10, 11, 1]
    assert batch.targets.tolist() == [t for _, _, targets in SEQUENCES for t in targets]
    same = kernel.pack_rows([SEQUENCES[0], SEQUENCES[0]], pad_id=0, device="cpu")
    assert same.mask is None  # nothing padded: no mask for the model to read


def test_kernel_rows_equal_full_logits_log_softmax(tiny_lm, reference_model):
    import torch

    model = tiny_lm.model
    vocab = kernel.head_vocab(model)
    batch = kernel.pack_rows(SEQUENCES, pad_id=0, device="cpu")
    body, head = kernel.split_model(model)
    ref_body, ref_head = kernel.split_model(reference_model)
    assert head.__name__ == "lm_head"  # the split, not the full-forward fallback
    with torch.inference_mode():
        hidden = kernel.hidden_rows(body, batch)  # (N, H)
        ref_hidden = kernel.hidden_rows(ref_body, batch)  # (N, H)
        rows = kernel.score_rows(head, hidden, batch.targets, vocab=vocab, greedy=True, top_k=5,
                                 ref_head=ref_head, ref_hidden=ref_hidden,
                                 chunk_elements=3 * vocab)  # 3 rows a chunk: 5 chunks for 15
    lp = full_logprobs(model, batch)  # (N, V)
    ref_lp = full_logprobs(reference_model, batch)  # (N, V)
    targets = batch.targets[:, None]  # (N, 1)
    n = len(batch.targets)
    assert n == 15

    def close(got, want):
        assert got.dtype == torch.float64
        # float32 to 1e-6: the full forward runs the head on other shapes (other roundings).
        torch.testing.assert_close(got, want.double(), atol=1e-6, rtol=1e-6)

    close(rows.logprob, lp.gather(1, targets)[:, 0])
    assert torch.equal(rows.greedy, lp.argmax(dim=-1) == batch.targets)
    top_lp, top_ids = lp.topk(5, dim=-1)
    close(rows.top_logprobs, top_lp)
    assert torch.equal(rows.top_ids, top_ids)
    close(rows.ref_logprob, ref_lp.gather(1, targets)[:, 0])
    kl = (ref_lp.double().exp() * (ref_lp.double() - lp.double())).sum(dim=-1)  # (N,)
    close(rows.kl, kl)
    assert torch.equal(rows.agree, lp.argmax(dim=-1) == ref_lp.argmax(dim=-1))
    assert not bool(rows.agree.all())  # the reference does disagree somewhere


def test_kernel_gives_only_what_is_asked_and_the_same_in_one_chunk(tiny_lm):
    import torch

    vocab = kernel.head_vocab(tiny_lm.model)
    batch = kernel.pack_rows(SEQUENCES, pad_id=0, device="cpu")
    body, head = kernel.split_model(tiny_lm.model)
    with torch.inference_mode():
        hidden = kernel.hidden_rows(body, batch)
        one = kernel.score_rows(head, hidden, batch.targets, vocab=vocab)
        many = kernel.score_rows(head, hidden, batch.targets, vocab=vocab, chunk_elements=1)
    assert (one.greedy, one.top_logprobs, one.top_ids, one.kl, one.agree, one.ref_logprob) \
        == (None,) * 6
    torch.testing.assert_close(one.logprob, many.logprob, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        kernel.score_rows(head, hidden, batch.targets, vocab=vocab, ref_head=head)


# ----------------------------------------------------------------------------- ordered batches


def test_sorted_batches_are_stable_and_sharded():
    items = ["bb", "a", "ccc", "dd", "e", "fff"]
    assert sorted_batches(items, 4, len) == [["a", "e", "bb", "dd"], ["ccc", "fff"]]
    assert sorted_batches(items, 2, len, reverse=True) == [["ccc", "fff"], ["bb", "dd"],
                                                           ["a", "e"]]
    longest_first = ["ccc", "fff", "bb", "dd", "a", "e"]
    assert sorted_batches(items, 2, len, reverse=True, shard=(1, 2)) == [
        longest_first[1::2][:2], longest_first[1::2][2:]]
    assert sorted_batches([], 3, len) == []


def test_run_in_order_yields_in_input_order_as_soon_as_ready():
    items = ["bbb", "a", "cc", "dddd"]
    ran: list[list[str]] = []

    def run(batch: list[str]) -> list[int]:
        ran.append(batch)
        return [len(s) for s in batch]

    results = run_in_order(items, 2, len, run, reverse=True)
    assert next(results) == ("bbb", 3)
    assert ran == [["dddd", "bbb"]]  # the first result came out before the second batch ran
    assert list(results) == [("a", 1), ("cc", 2), ("dddd", 4)]
    assert ran == [["dddd", "bbb"], ["cc", "a"]]
