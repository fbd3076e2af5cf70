"""Each figure means what its name says: per byte and per word of what was scored, lm-eval's
acc / acc_norm / acc_bytes, a score record that is one thing or the other; and a long text is
tokenized in pieces, with the whole text's tokens, in bounded memory.

The denominators here are computed by hand from the tokenizer's own decoding of single tokens
(on ASCII text, where that is exact), not with nlgen.score.token_bytes.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import CORPUS, ROOT

from nlgen import inputs
from nlgen.score import scoring, windows
from nlgen.score.likelihood import Request, score_continuations
from nlgen.score.token_bytes import TokenSizes

TEXT = CORPUS.read_text(encoding="utf-8")
ASCII = "".join(c for c in TEXT[:3000] if c.isascii())


def jsonl(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def hand_counts(tokenizer, text: str, scored: list[int]) -> tuple[int, int]:
    """(UTF-8 bytes, words begun) of the tokens at indices `scored`, ASCII text only."""
    ids = tokenizer(text)["input_ids"]
    pieces = [tokenizer.decode([t]) for t in ids]
    assert "".join(pieces) == text  # ASCII, no special tokens: single tokens decode exactly
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + len(piece))
    word_starts = {m.start() for m in re.finditer(r"\S+", text)}
    n_bytes = sum(len(pieces[i].encode()) for i in scored)
    words = sum(1 for i in scored for c in range(starts[i], starts[i + 1]) if c in word_starts)
    return n_bytes, words


def brute_disjoint_nll(model, ids: list[int]) -> float:
    """--max-length 2 --stride 2: token 2k+1 predicted from token 2k alone."""
    import torch

    pairs = torch.tensor([ids[i:i + 2] for i in range(0, len(ids) - 1, 2)])  # (N, 2)
    with torch.no_grad():
        logits = model(pairs).logits[:, 0].double()  # (N, V)
    return -torch.log_softmax(logits, -1).gather(1, pairs[:, 1:]).sum().item()


@pytest.fixture()
def ascii_file(tmp_path: Path) -> str:
    path = tmp_path / "prose.txt"
    path.write_text(ASCII, encoding="utf-8")
    return str(path)


def test_bits_per_byte_divides_by_the_bytes_scored(cli, tiny_lm, tiny_model, ascii_file):
    """Disjoint windows of 2 score every other token: per byte must not halve with them."""
    got = {}
    for stride in ("1", "2"):
        result = cli("perplexity", "--model", str(tiny_model), ascii_file, "--max-length", "2",
                     "--stride", stride, "--format", "jsonl")
        assert result.exit_code == 0, result.stderr
        [got[stride]] = jsonl(result.stdout)
    one, two = got["1"], got["2"]
    assert two["tokens"] == pytest.approx(one["tokens"] / 2, abs=1)
    assert two["bits_per_byte"] == pytest.approx(one["bits_per_byte"], rel=0.05)
    assert two["bytes"] == one["bytes"] == len(ASCII.encode())  # the text's, as before

    ids = list(tiny_lm.tokenizer(ASCII)["input_ids"])
    for record, stride in ((one, 1), (two, 2)):
        scored = [t for _, e, f in windows.plan_windows(len(ids), 2, stride) for t in range(f, e)]
        n_bytes, words = hand_counts(tiny_lm.tokenizer, ASCII, scored)
        assert (record["bytes_scored"], record["words_scored"]) == (n_bytes, words)
        assert record["bits_per_byte"] == pytest.approx(
            record["nll_sum"] / (math.log(2) * n_bytes), rel=1e-12)
        assert record["word_perplexity"] == pytest.approx(
            math.exp(record["nll_sum"] / words), rel=1e-9)
    assert two["nll_sum"] == pytest.approx(brute_disjoint_nll(tiny_lm.model, ids), rel=1e-6)
    assert one["bytes_scored"] == len(ASCII.encode()) - len(tiny_lm.tokenizer.decode(ids[:1]))


def test_per_line_total_and_output_file_divide_by_bytes_scored(cli, tiny_model, tmp_path):
    lines = [line for line in ASCII.splitlines() if len(line.split()) > 3][:6]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["perplexity", "--model", str(tiny_model), str(path), "--per-line",
            "--max-length", "4", "--stride", "4"]
    result = cli(*args, "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    records, total = doc["inputs"], doc["total"]
    assert all(r["bytes_scored"] < r["bytes"] for r in records)
    scored = sum(r["bytes_scored"] for r in records)
    assert total["bytes_scored"] == scored
    assert total["bits_per_byte"] == pytest.approx(
        math.fsum(r["nll_sum"] for r in records) / (math.log(2) * scored), rel=1e-12)
    out = tmp_path / "ppl.jsonl"
    written = cli(*args, "--output", str(out))
    assert written.exit_code == 0, written.stderr
    assert f"{total['bits_per_byte']:.4f} bits/byte" in written.stderr


def test_reference_comparison_divides_by_the_same_bytes(cli, tiny_model, ascii_file):
    args = ["perplexity", "--model", str(tiny_model), ascii_file, "--max-length", "2",
            "--stride", "2", "--format", "jsonl"]
    [plain] = jsonl(cli(*args).stdout)
    result = cli(*args, "--reference", str(tiny_model))
    assert result.exit_code == 0, result.stderr
    [compared] = jsonl(result.stdout)
    for key in ("bytes_scored", "words_scored"):
        assert compared[key] == plain[key]
    assert compared["bits_per_byte"] == pytest.approx(plain["bits_per_byte"], rel=1e-6)


def test_token_sizes_add_up_to_the_text(tiny_lm):
    """Byte-level BPE: every token's bytes, end to end, are the text's, even split characters."""
    text = "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f600  end\n\tx"
    ids = list(tiny_lm.tokenizer(text)["input_ids"])
    sizes = TokenSizes(tiny_lm.tokenizer)
    assert sizes.share(text, ids, [(0, len(ids))]) == (len(text.encode()), len(text.split()))
    assert sum(sizes(t)[1] for t in ids) == len(text)
    assert sizes(tiny_lm.tokenizer.eos_token_id) == (0, 0)  # a special token holds no text


# ----------------------------------------------------------------------------- score


def test_acc_norm_is_per_character_and_acc_bytes_per_byte(cli, tiny_lm, tiny_model, tmp_path):
    prompt, choices = "The fox ran into the", [" caf\u00e9", " house"]
    lps = [s.logprob for s in score_continuations(tiny_lm, [Request(prompt, c)
                                                           for c in choices])]
    per_char = [lp / len(c) for lp, c in zip(lps, choices, strict=True)]
    per_byte = [lp / len(c.encode()) for lp, c in zip(lps, choices, strict=True)]
    want_norm, want_bytes = per_char.index(max(per_char)), per_byte.index(max(per_byte))
    assert want_norm != want_bytes, "the two normalisations should disagree on this record"
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "choices": choices, "label": want_bytes})
                    + "\n", encoding="utf-8")
    result = cli("score", "--model", str(tiny_model), str(path))
    assert result.exit_code == 0, result.stderr
    [record] = jsonl(result.stdout)
    assert record["num_chars"] == [len(c) for c in choices]
    assert record["num_bytes"] == [len(c.encode()) for c in choices]
    assert (record["pred_norm"], record["pred_bytes"]) == (want_norm, want_bytes)
    assert (record["acc_norm"], record["acc_bytes"]) == (0, 1)
    assert record["acc"] == int(lps.index(max(lps)) == want_bytes)
    assert "acc_norm 0.0000 (per character), acc_bytes 1.0000 (per byte)" in result.stderr
    doc = json.loads(cli("score", "--model", str(tiny_model), str(path), "--format",
                         "json").stdout)
    assert (doc["summary"]["acc_norm"], doc["summary"]["acc_bytes"]) == (0.0, 1.0)


def test_a_record_with_completion_and_choices_is_refused(cli, tiny_model, tmp_path):
    path = tmp_path / "both.jsonl"
    rows = [{"prompt": "A", "completion": " b"},
            {"prompt": "A", "completion": " b", "choices": [" b", " c"], "label": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = cli("score", "--model", str(tiny_model), str(path))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {path}:2: both 'completion' and 'choices' fields")
    assert [r["completion"] for r in jsonl(result.stdout)] == [" b"]  # the good one is scored


# ----------------------------------------------------------------------------- long texts


def test_a_long_text_in_pieces_has_the_whole_texts_tokens(tiny_lm, monkeypatch):
    text = (TEXT + "\n  indented\n\n\nx\n") * 3
    tokenize = windows.Tokenize(tiny_lm.tokenizer)
    assert tokenize.in_pieces
    monkeypatch.setattr(windows, "PIECE_CHARS", 500)
    assert len(list(windows.pieces(text, 500))) > 20
    assert list(tokenize(text)) == list(tiny_lm.tokenizer(text)["input_ids"])


def test_a_tokenizer_that_marks_each_pieces_start_reads_the_text_whole(tiny_model):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not windows.Tokenize(tokenizer).in_pieces


def test_a_multi_megabyte_text_is_tokenized_in_bounded_memory(tiny_model, tmp_path):
    """Whole, the tokenizer's working memory is ~200 bytes a character (~400 MB here)."""
    path = tmp_path / "big.txt"
    path.write_text((TEXT * (2_000_000 // len(TEXT) + 1))[:2_000_000], encoding="utf-8")
    script = textwrap.dedent(f"""
        import resource
        from nlgen import inputs
        from nlgen.models import loading
        from nlgen.score import scoring
        lm = loading.load_model({str(tiny_model)!r}, device="cpu", dtype="float32")
        scorer = scoring.Scorer(lm, scoring.ScoreOptions())
        text = inputs.read_text({str(path)!r})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pending = scorer.prepare(text)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(len(pending.ids), len(pending.windows), (after - before) // 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    n_ids, n_windows, grown_mb = map(int, done.stdout.split())
    assert n_ids > 800_000 and n_windows > 10_000
    assert grown_mb < 80, f"tokenizing 2 MB grew the peak memory by {grown_mb} MB"


def test_metrics_without_unscored_tokens_divide_by_the_whole_text():
    m = scoring.Metrics(nll_sum=20.0, tokens=10, bytes=40, words=5, unscored_bytes=8,
                        unscored_words=1)
    assert (m.bytes_scored, m.words_scored) == (32, 4)
    assert m.bits_per_byte == pytest.approx(20.0 / (32 * math.log(2)))
    assert m.word_perplexity == pytest.approx(math.exp(5.0))
    total = scoring.total([scoring.TextScore(inputs.Text("a"), m)] * 2)
    assert (total.bytes_scored, total.words_scored) == (64, 8)
