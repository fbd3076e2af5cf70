"""nlgen perplexity: the core against brute force and the HF guide, then the CLI, then builtin.

The reference in every equality test is computed here independently of nlgen.score.scoring: one
forward pass per predicted token, over exactly the context the method allows, log-softmax in
float64.
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
from conftest import CORPUS, run_nlgen

from nlgen import inputs
from nlgen.errors import UsageError
from nlgen.models.loading import LoadedModel
from nlgen.score import scoring, windows

TEXT = CORPUS.read_text(encoding="utf-8")
SHORT = TEXT[:160]  # ~70 tokens of the tiny tokenizer: brute force stays fast
PROSE = (
    "The old lighthouse keeper climbed the stairs every evening to light the lamp. For forty "
    "years he had watched the ships pass the rocks at the mouth of the harbour, and not one of "
    "them had been lost while he was on duty. When the town council decided to replace him with "
    "an automatic light, he did not complain. He simply packed his books, locked the door for "
    "the last time and walked down the hill to the village, where his sister had kept a room "
    "for him since the winter their father died."
)


def brute_nll(model, ids: list[int], context) -> tuple[float, int]:
    """Sum of -log p(token t | context(t)) over every t that context(t) gives one for."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for t in range(len(ids)):
            ctx = context(t)
            if not ctx:
                continue
            logits = model(torch.tensor([ids[ctx[0]:ctx[1]]])).logits[0, -1].double()
            total -= torch.log_softmax(logits, -1)[ids[t]].item()
            count += 1
    return total, count


def sliding(max_length: int):
    """Stride 1: each token sees the max_length - 1 tokens before it (or all there are)."""
    return lambda t: (max(0, t - max_length + 1), t) if t > 0 else None


def disjoint(max_length: int):
    """stride == max_length: each token sees its own window's earlier tokens only."""
    return lambda t: ((t // max_length) * max_length, t) if t % max_length else None


def score_one(lm, text: str, **opts) -> scoring.TextScore:
    items = [inputs.Text("t", text)]
    [result] = scoring.score_texts(lm, items, scoring.ScoreOptions(**opts))
    assert result.ok, result.error
    return result


# ----------------------------------------------------------------------------- windows, options


@pytest.mark.parametrize("n,length,stride", [(50, 8, 1), (50, 8, 3), (50, 8, 8), (7, 8, 4),
                                             (17, 8, 8), (64, 16, 15)])
def test_windows_predict_each_token_once(n, length, stride):
    scored = [t for b, e, f in windows.plan_windows(n, length, stride) for t in range(f, e)]
    assert len(scored) == len(set(scored))
    if stride < length:
        assert scored == list(range(1, n))  # every token but the first
    else:  # disjoint windows: a window's first token has no context in it
        assert scored == [t for t in range(n) if t % length]
    for b, e, f in windows.plan_windows(n, length, stride):
        assert e - b <= length and b < f < e


@pytest.mark.parametrize("kwargs,message", [
    ({"stride": 0}, "--stride must be positive"),
    ({"stride": -3}, "--stride must be positive"),
    ({"max_length": 8, "stride": 9}, "larger than --max-length"),
    ({"max_length": 1}, "--max-length must be at least 2"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
])
def test_options_are_validated(kwargs, message):
    with pytest.raises(UsageError, match=message):
        scoring.ScoreOptions(**kwargs)


def test_options_resolve_against_the_model():
    assert scoring.ScoreOptions().resolve(128) == (128, 64)
    assert scoring.ScoreOptions().resolve(8192) == (1024, 512)  # capped as the issue asks
    assert scoring.ScoreOptions(max_length=9).resolve(128) == (9, 4)
    with pytest.raises(UsageError, match="longer than the model's context"):
        scoring.ScoreOptions(max_length=256).resolve(128)
    with pytest.raises(UsageError, match="larger than the window"):
        scoring.ScoreOptions(stride=200).resolve(128)


# ----------------------------------------------------------------------------- core values


@pytest.mark.parametrize("stride", [1, 8])
def test_equals_brute_force(tiny_lm, stride):
    ids = tiny_lm.tokenizer(SHORT)["input_ids"]
    reference = sliding(8) if stride == 1 else disjoint(8)
    nll, count = brute_nll(tiny_lm.model, ids, reference)
    result = score_one(tiny_lm, SHORT, max_length=8, stride=stride, batch_size=5)
    assert result.metrics.tokens == count
    assert result.metrics.nll_sum == pytest.approx(nll, rel=1e-6)
    assert result.metrics.perplexity == pytest.approx(math.exp(nll / count), rel=1e-6)


def hf_guide_loop(model, ids: list[int], max_length: int, stride: int, corrected: bool):
    """The loop of the HF guide "Perplexity of fixed-length models", batch of one.

    `corrected`: count the labels the loss really averaged over. The guide subtracts one label
    per window for the shift, which is right only when a window's labels are all valid (the
    first window, disjoint windows); overlapping windows score trg_len tokens, not trg_len - 1.
    """
    import torch

    input_ids_all = torch.tensor([ids])
    seq_len = input_ids_all.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = input_ids_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        if corrected:
            num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        else:
            num_loss_tokens = int((target_ids != -100).sum()) - target_ids.size(0)
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


def test_matches_hf_guide_loop(tiny_lm):
    ids = tiny_lm.tokenizer(TEXT[:1500])["input_ids"]
    assert len(ids) > 3 * 128  # several windows of the model's whole context
    result = score_one(tiny_lm, TEXT[:1500])  # defaults: window 128 (context), stride 64
    nll, count = hf_guide_loop(tiny_lm.model, ids, 128, 64, corrected=True)
    assert result.metrics.tokens == count == len(ids) - 1
    assert result.metrics.nll == pytest.approx(nll / count, rel=1e-5)
    # As written, the guide's loop counts one token fewer per overlapping window.
    _, guide_count = hf_guide_loop(tiny_lm.model, ids, 128, 64, corrected=False)
    assert guide_count == count - (result.windows - 1)


def test_batch_size_does_not_change_the_result(tiny_lm):
    text = TEXT[:1200]
    results = [score_one(tiny_lm, text, max_length=40, stride=13, batch_size=b) for b in (1, 3, 64)]
    assert len({r.metrics.tokens for r in results}) == 1
    assert results[0].windows > 10
    for r in results[1:]:
        assert r.metrics.nll_sum == pytest.approx(results[0].metrics.nll_sum, rel=1e-6)


@pytest.fixture()
def bos_lm(tiny_lm):
    """The tiny model with a tokenizer that prepends BOS, as Llama-style tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(tiny_lm.tokenizer)
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)])
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    return LoadedModel(tiny_lm.model, tokenizer, "tiny+bos", tiny_lm.source, "cpu", "float32")


def test_bos_follows_the_tokenizer(tiny_lm, bos_lm):
    plain = score_one(tiny_lm, SHORT, max_length=16, stride=1)
    with_bos = score_one(bos_lm, SHORT, max_length=16, stride=1)
    text_ids = tiny_lm.tokenizer(SHORT)["input_ids"]
    assert scoring.Scorer(tiny_lm, scoring.ScoreOptions()).method.bos is False
    assert scoring.Scorer(bos_lm, scoring.ScoreOptions()).method.bos is True
    # With BOS the first text token is predicted too: every text token is scored.
    assert plain.metrics.tokens == len(text_ids) - 1
    assert with_bos.metrics.tokens == len(text_ids)
    ids = [bos_lm.tokenizer.bos_token_id, *text_ids]
    nll, count = brute_nll(bos_lm.model, ids, sliding(16))
    assert count == with_bos.metrics.tokens
    assert with_bos.metrics.nll_sum == pytest.approx(nll, rel=1e-6)


def test_full_forward_fallback_gives_the_same_value(tiny_lm, monkeypatch):
    """A head the self-check cannot reproduce (here: a softcap the model does not apply)."""
    fast = score_one(tiny_lm, SHORT, max_length=16, stride=5)
    monkeypatch.setattr(tiny_lm.model.config, "final_logit_softcapping", 3.0, raising=False)
    scorer = scoring.Scorer(tiny_lm, scoring.ScoreOptions(max_length=16, stride=5))
    assert scorer._head.__name__ == "identity"  # fell back to the model's own forward
    [slow] = scorer.score([inputs.Text("t", SHORT)])
    assert slow.metrics.nll_sum == pytest.approx(fast.metrics.nll_sum, rel=1e-6)


def test_metrics_and_total():
    m = scoring.Metrics(nll_sum=20.0, tokens=10, bytes=40, words=5)
    assert m.nll == 2.0
    assert m.perplexity == pytest.approx(math.exp(2.0))
    assert m.bits_per_byte == pytest.approx(20.0 / (40 * math.log(2)))
    assert m.word_perplexity == pytest.approx(math.exp(4.0))
    assert scoring.Metrics(nll_sum=1e6, tokens=1, bytes=1, words=1).perplexity == math.inf
    a = scoring.TextScore(inputs.Text("a"), m)
    b = scoring.TextScore(inputs.Text("b"), scoring.Metrics(10.0, 10, 10, 10))
    bad = scoring.TextScore(inputs.Text("c"), None, error="nope")
    assert scoring.total([a, b, bad]) == scoring.Metrics(30.0, 20, 50, 15)


def test_many_texts_batched_together_keep_order_and_values(tiny_lm):
    lines = [line for line in TEXT.splitlines() if line.strip()][:12]
    lines = [s[: 20 + 9 * i] for i, s in enumerate(lines)]  # varied lengths: padding at work
    items = [inputs.Text("f", s, line=i) for i, s in enumerate(lines, 1)]
    together = list(scoring.score_texts(tiny_lm, items, scoring.ScoreOptions(batch_size=5)))
    assert [r.input.line for r in together] == list(range(1, 13))
    for line, r in zip(lines, together, strict=True):
        alone = score_one(tiny_lm, line, batch_size=1)
        assert r.metrics.nll_sum == pytest.approx(alone.metrics.nll_sum, rel=1e-5)


def test_bad_texts_are_reported_in_place(tiny_lm):
    items = [inputs.Text("a", SHORT), inputs.Text("b", "  \n"),
             inputs.Text("c", "x"), inputs.Text("d", error="file not found: d"),
             inputs.Text("e", SHORT)]
    results = list(scoring.score_texts(tiny_lm, items, scoring.ScoreOptions()))
    assert [r.input.name for r in results] == list("abcde")
    assert [r.ok for r in results] == [True, False, False, False, True]
    assert "empty" in results[1].error
    assert "too short" in results[2].error
    assert results[3].error == "file not found: d"
    assert results[0].metrics == results[4].metrics


def test_progress_reports_tokens_scored(tiny_lm):
    calls = []
    result = list(scoring.score_texts(tiny_lm, [inputs.Text("t", TEXT[:1000])],
                                      scoring.ScoreOptions(max_length=32, batch_size=4),
                                      progress=lambda done, planned: calls.append((done, planned))))
    assert len(calls) > 2
    assert calls[-1] == (result[0].metrics.tokens, result[0].metrics.tokens)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, str]:
    paths = {
        "long": TEXT[:1500], "short": SHORT, "empty": "", "one": "x",
        "lines": "The fox ran into the forest.\n\nThe heron laughed at the sea.\nx\n",
    }
    out = {}
    for name, text in paths.items():
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
        out[name] = str(tmp_path / f"{name}.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait, s'il vous pla\xeet".encode("latin-1"))
    out["latin1"] = str(tmp_path / "latin1.txt")
    out["missing"] = str(tmp_path / "missing.txt")
    return out


def jsonl(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_cli_json_document(cli, tiny_model, files):
    result = cli("perplexity", "--model", str(tiny_model), files["long"], files["short"],
                 "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {"model", "inputs", "failed", "total"}
    assert doc["failed"] == []
    first = doc["inputs"][0]
    for key in ("input", "perplexity", "nll", "bits_per_byte", "word_perplexity", "tokens",
                "bytes", "words", "nll_sum", "model", "method"):
        assert key in first
    assert first["input"] == files["long"]
    assert first["bytes"] == len(TEXT[:1500].encode())
    assert first["words"] == len(TEXT[:1500].split())
    method = first["method"]
    assert (method["max_length"], method["stride"], method["bos"]) == (128, 64, False)
    assert method["tokens_scored"] == first["tokens"] == method["input_tokens"] - 1
    assert method["windows"] > 1 and "normalisation" in method
    total = doc["total"]
    assert total["tokens"] == sum(r["tokens"] for r in doc["inputs"])
    assert total["nll_sum"] == pytest.approx(sum(r["nll_sum"] for r in doc["inputs"]))
    assert total["perplexity"] == pytest.approx(math.exp(total["nll_sum"] / total["tokens"]))
    assert (total["inputs"], total["failed"]) == (2, 0)


def test_cli_jsonl_files_and_stdin_in_order(cli, tiny_model, files):
    result = cli("perplexity", "--model", str(tiny_model), files["short"], "-",
                 "--format", "jsonl", input=SHORT)
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["input"] for r in records] == [files["short"], "<stdin>"]
    assert records[0]["nll_sum"] == records[1]["nll_sum"]


def test_cli_reads_piped_stdin_and_defaults_to_jsonl(cli, tiny_model):
    result = cli("perplexity", "--model", str(tiny_model), input=SHORT)
    assert result.exit_code == 0, result.stderr
    [record] = jsonl(result.stdout)
    assert record["input"] == "<stdin>" and record["tokens"] > 10


def test_cli_per_line(cli, tiny_lm, tiny_model, files):
    result = cli("perplexity", "--model", str(tiny_model), "--per-line", files["lines"],
                 "--format", "jsonl")
    assert result.exit_code == 1  # the one-token line "x" cannot be scored
    records = jsonl(result.stdout)  # scores only: line numbers tell where each came from
    assert [(r["line"], r["text"]) for r in records] == [
        (1, "The fox ran into the forest."), (3, "The heron laughed at the sea.")]
    alone = score_one(tiny_lm, "The heron laughed at the sea.")
    assert records[1]["nll_sum"] == pytest.approx(alone.metrics.nll_sum, rel=1e-5)
    assert "lines.txt:4: too short to score" in result.stderr
    assert "1 of 3 lines could not be scored" in result.stderr


def test_cli_batch_size_does_not_change_the_result(cli, tiny_model, files):
    values = []
    for batch in ("1", "32"):
        result = cli("perplexity", "--model", str(tiny_model), files["long"], "--batch-size",
                     batch, "--max-length", "32", "--format", "jsonl")
        assert result.exit_code == 0, result.stderr
        values.append(jsonl(result.stdout)[0])
    assert values[0]["tokens"] == values[1]["tokens"]
    assert values[0]["perplexity"] == pytest.approx(values[1]["perplexity"], rel=1e-6)


def test_cli_table(cli, tiny_model, files):
    result = cli("perplexity", "--model", str(tiny_model), files["long"], files["short"],
                 "--format", "table", "--stride", "32")
    assert result.exit_code == 0, result.stderr
    for piece in ("ppl", "bits/byte", "word ppl", "total", "window 128, stride 32, no BOS",
                  "exp(nll_sum / tokens_scored)"):
        assert piece in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--stride", "0"], "--stride must be positive"),
    (["--stride", "9", "--max-length", "8"], "larger than --max-length"),
    (["--max-length", "1"], "--max-length must be at least 2"),
    (["--format", "xml"], "Invalid value for '--format'"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--dtype", "float8"], "Invalid value for '--dtype'"),
])
def test_cli_usage_errors_exit_2_before_loading(cli, files, args, message):
    # The model does not exist: reaching the loader would be exit 1, not 2.
    result = cli("perplexity", "--model", "/nonexistent/model", files["short"], *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_cli_window_longer_than_the_context(cli, tiny_model, files):
    result = cli("perplexity", "--model", str(tiny_model), files["short"], "--max-length", "512")
    assert result.exit_code == 2
    assert "longer than the model's context (128 tokens)" in result.stderr


def test_cli_missing_file_fails_before_loading(cli, files):
    result = cli("perplexity", "--model", "/nonexistent/model", files["missing"])
    assert result.exit_code == 1
    assert "file not found" in result.stderr and "model" not in result.stderr


def test_cli_no_input_on_a_terminal(cli, monkeypatch):
    monkeypatch.setattr("nlgen.inputs.stdin_is_terminal", lambda: True)
    result = cli("perplexity")
    assert result.exit_code == 2
    assert "no input given" in result.stderr


def test_cli_bad_inputs_do_not_stop_the_good_ones(cli, tiny_model, files):
    names = ["short", "missing", "latin1", "empty", "one", "long"]
    result = cli("perplexity", "--model", str(tiny_model), *[files[n] for n in names],
                 "--format", "jsonl")
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert [r["input"] for r in records] == [files["short"], files["long"]]
    assert records[0]["tokens"] > 10 and records[1]["tokens"] > 100
    stderr = result.stderr
    assert "file not found" in stderr
    assert "not valid UTF-8 (byte 0xe9" in stderr
    assert "empty text" in stderr
    assert "too short to score (1 token" in stderr
    assert "4 of 6 inputs could not be scored" in stderr
    assert "Traceback" not in stderr


def test_cli_json_with_a_failure_still_totals_the_rest(cli, tiny_model, files):
    result = cli("perplexity", "--model", str(tiny_model), files["short"], files["missing"],
                 "--format", "json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert (doc["total"]["inputs"], doc["total"]["failed"]) == (1, 1)
    assert [r["input"] for r in doc["inputs"]] == [files["short"]]
    assert doc["failed"] == [{"input": files["missing"],
                              "error": f"file not found: {files['missing']}"}]
    assert doc["total"]["nll_sum"] == doc["inputs"][0]["nll_sum"]


def test_cli_in_a_real_pipeline(tiny_model):
    lines = "The fox ran into the forest.\nThe heron laughed at the sea.\n"
    proc = run_nlgen("perplexity", "--model", str(tiny_model), "--per-line", input=lines,
                     timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    records = jsonl(proc.stdout.decode())  # piped stdout: jsonl by default
    assert [r["line"] for r in records] == [1, 2]
    assert all(r["perplexity"] > 1 for r in records)
    assert b"Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- built-in model


@pytest.fixture(scope="module")
def builtin_lm():
    from nlgen.models.loading import load_model

    return load_model("builtin", device="cpu", purpose="score")


@pytest.mark.slow
def test_builtin_prose_beats_shuffled_words(builtin_lm):
    assert builtin_lm.dtype == "float32"  # a measurement: auto keeps float32 on the CPU
    words = PROSE.split()
    random.Random(0).shuffle(words)
    prose = score_one(builtin_lm, PROSE, batch_size=2)
    shuffled = score_one(builtin_lm, " ".join(words), batch_size=2)
    assert prose.metrics.words == shuffled.metrics.words
    assert prose.metrics.perplexity * 5 < shuffled.metrics.perplexity
    assert prose.metrics.perplexity < 40


@pytest.mark.slow
def test_builtin_is_deterministic_across_runs(cli, tmp_path, builtin_lm):
    path = tmp_path / "prose.txt"
    path.write_text(PROSE, encoding="utf-8")
    args = ("perplexity", "--model", "builtin", str(path), "--format", "jsonl", "--max-length",
            "64", "--stride", "16")
    first = cli(*args)
    second = run_nlgen(*args, timeout=300)
    assert first.exit_code == 0, first.stderr
    assert second.returncode == 0, second.stderr.decode()
    a, b = jsonl(first.stdout)[0], jsonl(second.stdout.decode())[0]
    assert a == b  # every digit, in another process
    in_process = score_one(builtin_lm, PROSE, max_length=64, stride=16, batch_size=8)
    assert in_process.metrics.nll_sum == a["nll_sum"]


def test_cli_reads_a_fifo_once(cli, tiny_model, tmp_path):
    """`nlgen perplexity <(producer)`: a FIFO is no regular file and must not be drained early."""
    import os
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def produce() -> None:
        with open(fifo, "w", encoding="utf-8") as f:
            f.write(SHORT)

    writer = threading.Thread(target=produce, daemon=True)
    writer.start()
    result = cli("perplexity", "--model", str(tiny_model), str(fifo))
    writer.join(timeout=10)
    assert result.exit_code == 0, result.stderr
    [record] = jsonl(result.stdout)
    assert record["bytes"] == len(SHORT.encode())
