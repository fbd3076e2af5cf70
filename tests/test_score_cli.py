"""`nlgen score`, `perplexity --reference` and `generate --logprobs` through the CLI.

The cores (nlgen.score.likelihood, nlgen.score.compare) are tested against brute force in
test_likelihood.py; here the CLI's numbers must equal the cores' (the CLI computes nothing of
its own), and the generated tokens' log-probs must equal a brute-force forward pass.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import CORPUS, build_tiny_gpt2, run_nlgen

from nlgen.errors import EXIT_FAILURE, EXIT_USAGE
from nlgen.inputs import Text
from nlgen.models.loading import load_model
from nlgen.score import compare
from nlgen.score.likelihood import Request, score_continuations
from nlgen.score.scoring import ScoreOptions

TEXT = CORPUS.read_text(encoding="utf-8")
PAIRS = [
    {"prompt": "The fox ran into the", "completion": " forest"},
    {"prompt": "The cat ", "completion": "sat on the mat.", "id": 7},  # extra fields kept
    {"prompt": "", "completion": "The heron laughed."},
    {"prompt": "caf\u00e9 au lait", "completion": " na\u00efve \u65e5\u672c"},
    {"prompt": TEXT[:200], "completion": " and then"},
]
CHOICES = [
    {"prompt": "The fox ran into the", "choices": [" forest", " sea", " house"], "label": 1},
    {"prompt": "Once upon a", "choices": [" time", " mat"], "label": 0},
    {"prompt": "The heron", "choices": [" laughed", " ran", " sat on the mat"], "label": 2},
    {"prompt": "A", "choices": [" b", " c"]},  # no label: predicted, not counted
]


def jsonl(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """A second tiny GPT-2: other weights, the same tokenizer."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-seed1"), seed=1)


@pytest.fixture(scope="module")
def other_lm(other_model):
    return load_model(str(other_model), device="cpu", dtype="float32")


# ----------------------------------------------------------------------------- score


def test_score_records_equal_the_likelihood_core(cli, tiny_lm, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    result = cli("score", "--model", str(tiny_model), path, "-b", "2")
    assert result.exit_code == 0, result.stderr
    got = jsonl(result.stdout)
    core = list(score_continuations(tiny_lm, [Request(r["prompt"], r["completion"])
                                              for r in PAIRS], batch_size=2))
    assert len(got) == len(PAIRS)
    for row, record, want in zip(PAIRS, got, core, strict=True):
        assert {k: record[k] for k in row} == row  # the input's fields come back as they were
        assert record["logprob"] == pytest.approx(want.logprob, rel=1e-6)
        assert (record["num_tokens"], record["num_bytes"], record["is_greedy"],
                record["truncated"]) == (want.num_tokens, want.num_bytes, want.is_greedy,
                                         want.truncated)


def test_plain_text_lines_are_completions_of_an_empty_prompt(cli, tiny_lm, tiny_model, tmp_path):
    (tmp_path / "lines.txt").write_text("The fox ran.\n\nThe heron laughed.\n", encoding="utf-8")
    result = cli("score", "--model", str(tiny_model), str(tmp_path / "lines.txt"))
    assert result.exit_code == 0, result.stderr
    got = jsonl(result.stdout)
    assert [r["text"] for r in got] == ["The fox ran.", "The heron laughed."]
    want = list(score_continuations(tiny_lm, [Request("", r["text"]) for r in got]))
    assert [r["logprob"] for r in got] == pytest.approx([w.logprob for w in want], rel=1e-6)
    piped = cli("score", "--model", str(tiny_model), "--text", input="The fox ran.\n")
    assert jsonl(piped.stdout)[0]["logprob"] == pytest.approx(want[0].logprob, rel=1e-6)


def test_multiple_choice_pred_and_accuracy(cli, tiny_lm, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", CHOICES)
    result = cli("score", "--model", str(tiny_model), path)
    assert result.exit_code == 0, result.stderr
    got = jsonl(result.stdout)
    right = right_norm = 0
    for row, record in zip(CHOICES, got, strict=True):
        want = list(score_continuations(tiny_lm, [Request(row["prompt"], c)
                                                  for c in row["choices"]]))
        lps = [w.logprob for w in want]
        assert record["logprobs"] == pytest.approx(lps, rel=1e-6)
        assert record["num_bytes"] == [len(c.encode()) for c in row["choices"]]
        assert record["pred"] == lps.index(max(lps))
        per_byte = [lp / len(c.encode()) for lp, c in zip(lps, row["choices"], strict=True)]
        assert record["pred_norm"] == per_byte.index(max(per_byte))
        if "label" in row:
            assert record["acc"] == int(record["pred"] == row["label"])
            right += record["acc"]
            right_norm += record["acc_norm"]
        else:
            assert "acc" not in record
    assert f"acc {right / 3:.4f}" in result.stderr
    doc = json.loads(cli("score", "--model", str(tiny_model), path, "--format", "json").stdout)
    summary = doc["summary"]
    assert (summary["records"], summary["failed"], summary["labelled"]) == (4, 0, 3)
    assert summary["acc"] == pytest.approx(right / 3)
    assert summary["acc_norm"] == pytest.approx(right_norm / 3)
    assert [r["pred"] for r in doc["records"]] == [r["pred"] for r in got]


def test_tokens_and_top_alternatives(cli, tiny_lm, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", PAIRS[:1] + CHOICES[1:2])
    result = cli("score", "--model", str(tiny_model), path, "--top", "3")
    assert result.exit_code == 0, result.stderr
    pair, choice = jsonl(result.stdout)
    tokens = pair["tokens"]
    assert len(tokens) == pair["num_tokens"]
    assert math.fsum(t["logprob"] for t in tokens) == pytest.approx(pair["logprob"], rel=1e-6)
    assert bytes(b for t in tokens for b in t["bytes"]) == b" forest"
    for t in tokens:
        top = [a["logprob"] for a in t["top_logprobs"]]
        assert len(top) == 3 and top == sorted(top, reverse=True) and top[0] >= t["logprob"]
    assert [len(x) for x in choice["tokens"]] == choice["num_tokens"]
    plain = cli("score", "--model", str(tiny_model), path, "--tokens")
    assert all(t["top_logprobs"] == [] for t in jsonl(plain.stdout)[0]["tokens"])


def test_bad_records_are_one_line_each_and_the_rest_is_scored(cli, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        PAIRS[0],
        "not json",
        {"prompt": "A"},
        {"prompt": "A", "completion": ""},
        {"prompt": "A", "choices": " b"},
        {"prompt": "A", "choices": [" b", " c"], "label": 2},
        "[1, 2]",
        CHOICES[0],
    ])
    result = cli("score", "--model", str(tiny_model), path)
    assert result.exit_code == EXIT_FAILURE
    assert [r["prompt"] for r in jsonl(result.stdout)] == [PAIRS[0]["prompt"],
                                                           CHOICES[0]["prompt"]]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors[:-1] == [
        f"Error: {path}:2: not JSON (Expecting value, column 1)",
        f"Error: {path}:3: no 'completion' or 'choices' field (it has: prompt)",
        f"Error: {path}:4: 'completion' is empty: nothing to score",
        f"Error: {path}:5: 'choices' must be a non-empty list of strings (got a string)",
        f"Error: {path}:6: 'label' must be the index of a choice, 0 to 1 (got 2)",
        f"Error: {path}:7: a JSON array, not an object",
    ]
    assert errors[-1] == "Error: 6 of 8 records could not be scored (see above)"
    assert "Traceback" not in result.stderr


def test_field_names_are_configurable(cli, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"q": "Once upon a", "opts": [" time", " x"],
                                               "gold": 0}])
    result = cli("score", "--model", str(tiny_model), path, "--prompt-field", "q",
                 "--choices-field", "opts", "--label-field", "gold")
    assert result.exit_code == 0, result.stderr
    assert "acc" in jsonl(result.stdout)[0]


@pytest.mark.parametrize(("args", "message"), [
    (["--top", "-1"], "Invalid value for '--top'"),
    (["--reference", "base"], "--reference base needs --model to be a LoRA adapter"),
    (["-b", "0"], "--batch-size must be at least 1"),
])
def test_usage_errors_exit_2(cli, tiny_model, tmp_path, args, message):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS[:1])
    result = cli("score", "--model", str(tiny_model), path, *args)
    assert result.exit_code == EXIT_USAGE
    assert message in result.stderr


def test_empty_input_and_missing_file(cli, tiny_model, tmp_path):
    empty = cli("score", "--model", str(tiny_model), input="\n\n")
    assert empty.exit_code == EXIT_FAILURE and "no records to score" in empty.stderr
    missing = cli("score", "--model", str(tiny_model), str(tmp_path / "nope.jsonl"))
    assert missing.exit_code == EXIT_FAILURE and "file not found" in missing.stderr


def test_score_reference_reports_the_reference_logprob(cli, other_lm, tiny_model, other_model,
                                                       tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS[:2] + CHOICES[:1])
    result = cli("score", "--model", str(tiny_model), "--reference", str(other_model), path)
    assert result.exit_code == 0, result.stderr
    first, second, choice = jsonl(result.stdout)
    want = list(score_continuations(other_lm, [Request(r["prompt"], r["completion"])
                                               for r in PAIRS[:2]]))
    assert [first["reference_logprob"], second["reference_logprob"]] == pytest.approx(
        [w.logprob for w in want], rel=1e-6)
    assert len(choice["reference_logprobs"]) == 3


def test_score_in_a_real_pipeline(tiny_model):
    lines = "".join(json.dumps(r) + "\n" for r in PAIRS[:2])
    proc = run_nlgen("score", "--model", str(tiny_model), input=lines)
    assert proc.returncode == 0, proc.stderr
    assert [r["completion"] for r in jsonl(proc.stdout.decode())] == [
        PAIRS[0]["completion"], PAIRS[1]["completion"]]


# ------------------------------------------------------------------------ perplexity --reference


@pytest.fixture()
def text_file(tmp_path) -> str:
    (tmp_path / "t.txt").write_text(TEXT[:700], encoding="utf-8")
    return str(tmp_path / "t.txt")


def test_perplexity_reference_itself(cli, tiny_model, text_file):
    result = cli("perplexity", "--model", str(tiny_model), "--reference", str(tiny_model),
                 text_file, "--max-length", "64")
    assert result.exit_code == 0, result.stderr
    [record] = jsonl(result.stdout)
    assert abs(record["kl"]) < 1e-6 and record["top1_agreement"] == 1.0
    assert record["perplexity_ratio"] == 1.0
    assert record["reference_perplexity"] == record["perplexity"]


def test_perplexity_reference_equals_the_compare_core(cli, tiny_lm, other_lm, tiny_model,
                                                      other_model, text_file):
    args = ["perplexity", "--model", str(other_model), text_file, "--max-length", "64"]
    result = cli(*args, "--reference", str(tiny_model), "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    [want] = compare.compare_texts(other_lm, [Text(text_file, TEXT[:700])],
                                   ScoreOptions(max_length=64), reference=tiny_lm)
    m = want.metrics
    record = doc["inputs"][0]
    assert record["kl"] == pytest.approx(m.kl, rel=1e-6) and m.kl > 0
    assert record["top1_agreement"] == pytest.approx(m.agreement)
    assert record["reference_perplexity"] == pytest.approx(m.reference_perplexity, rel=1e-6)
    assert record["perplexity_ratio"] == pytest.approx(m.ratio, rel=1e-6)
    assert record["reference_model"] == str(tiny_model)
    assert doc["total"]["kl"] == pytest.approx(m.kl, rel=1e-6)
    plain = jsonl(cli(*args, "--format", "jsonl").stdout)[0]  # the same perplexity without
    assert record["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)
    table = cli(*args, "--reference", str(tiny_model), "--format", "table")
    assert "KL" in table.stdout and "top-1 agree" in table.stdout


def test_perplexity_reference_with_another_vocabulary_is_refused(cli, tiny_model, tmp_path,
                                                                 text_file):
    from transformers import AutoTokenizer

    other = tmp_path / "other-vocab"
    shutil.copytree(tiny_model, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(other)
    result = cli("perplexity", "--model", str(tiny_model), "--reference", str(other), text_file)
    assert result.exit_code == EXIT_FAILURE
    assert result.stderr.startswith("Error: the two models' tokenizers differ: vocabularies of "
                                    "400 and 401 tokens")
    assert result.stdout == ""


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # peft's notices
def test_lora_adapter_against_its_base_loads_once(cli, tiny_model, tmp_path, text_file):
    """--reference base (the adapter switched off) gives what a second copy of the base gives."""
    from peft import LoraConfig, get_peft_model

    base = load_model(str(tiny_model), device="cpu", dtype="float32")
    peft = get_peft_model(base.model, LoraConfig(r=4, target_modules=["c_attn"],
                                                 init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    base.tokenizer.save_pretrained(adapter)
    copy = tmp_path / "base-copy"
    shutil.copytree(tiny_model, copy)
    runs = {ref: cli("perplexity", "--model", str(adapter), "--reference", ref, text_file,
                     "--max-length", "64") for ref in ("base", str(tiny_model), str(copy))}
    records = {ref: jsonl(r.stdout)[0] for ref, r in runs.items()}
    assert records["base"]["reference_model"] == f"{tiny_model} (adapter off)"
    assert records[str(tiny_model)]["reference_model"] == f"{tiny_model} (adapter off)"
    assert records[str(copy)]["reference_model"] == str(copy)  # loaded twice
    assert records["base"]["kl"] > 1e-4
    for key in ("kl", "reference_perplexity", "perplexity", "top1_agreement"):
        assert records["base"][key] == pytest.approx(records[str(copy)][key], rel=1e-5)


# --------------------------------------------------------------------------- generate --logprobs


def brute_step_logprobs(lm, prompt_ids: list[int], new_ids: list[int]) -> list:
    """log_softmax of the raw logits at each generated position, one full forward each."""
    import torch

    rows = []
    with torch.no_grad():
        for t in range(len(new_ids)):
            ids = torch.tensor([prompt_ids + new_ids[:t]])
            rows.append(torch.log_softmax(lm.model(ids).logits[0, -1].double(), -1))
    return rows


def test_generate_logprobs_greedy_equal_brute_force(cli, tiny_lm, tiny_model):
    result = cli("generate", "--model", str(tiny_model), "--greedy", "-n", "5", "--format",
                 "jsonl", "--logprobs", "3", "--dtype", "float32", "The fox", "Once upon a time")
    assert result.exit_code == 0, result.stderr
    for record in jsonl(result.stdout):
        content = record["logprobs"]["content"]
        assert len(content) == record["completion_tokens"]
        prompt_ids = tiny_lm.tokenizer(record["prompt"])["input_ids"]
        new_ids = _ids(tiny_lm, content)
        for entry, lp, token_id in zip(content, brute_step_logprobs(tiny_lm, prompt_ids, new_ids),
                                       new_ids, strict=True):
            assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
            assert entry["logprob"] == pytest.approx(lp[token_id].item(), abs=1e-4)
            top = entry["top_logprobs"]
            assert len(top) == 3
            assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
            assert top[0]["bytes"] == entry["bytes"]  # greedy: the chosen token is the first
            assert top[0]["logprob"] == pytest.approx(lp.max().item(), abs=1e-4)


def _ids(lm, content: list[dict]) -> list[int]:
    """The token ids of a logprobs.content list, from each token's bytes (exact for GPT-2 BPE)."""
    from nlgen.score.token_bytes import TokenText

    text = TokenText(lm.tokenizer)
    by_bytes = {text(i)[1]: i for i in range(len(lm.tokenizer))}
    return [by_bytes[tuple(entry["bytes"])] for entry in content]


def test_generate_logprobs_are_the_raw_distribution_when_sampling(cli, tiny_lm, tiny_model):
    """Temperature and top-k change what is sampled, not the log-probs reported."""
    result = cli("generate", "--model", str(tiny_model), "-n", "4", "--temperature", "3",
                 "--top-k", "5", "--seed", "1", "-N", "2", "--format", "jsonl", "--logprobs",
                 "0", "--dtype", "float32", "The heron")
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["sequence"] for r in records] == [0, 1]
    prompt_ids = tiny_lm.tokenizer("The heron")["input_ids"]
    for record in records:
        content = record["logprobs"]["content"]
        new_ids = _ids(tiny_lm, content)
        for entry, lp, token_id in zip(content, brute_step_logprobs(tiny_lm, prompt_ids, new_ids),
                                       new_ids, strict=True):
            assert entry["top_logprobs"] == []
            assert entry["logprob"] == pytest.approx(lp[token_id].item(), abs=1e-4)


@pytest.mark.parametrize(("args", "message"), [
    (["--logprobs", "2"], "--logprobs needs --format jsonl"),
    (["--logprobs", "2", "--format", "jsonl", "--num-beams", "2"], "does not work with beam"),
    (["--logprobs", "-1", "--format", "jsonl"], "Invalid value for '--logprobs'"),
])
def test_generate_logprobs_usage_errors(cli, tiny_model, args, message):
    result = cli("generate", "--model", str(tiny_model), "-n", "2", "A", *args)
    assert result.exit_code == EXIT_USAGE
    assert message in result.stderr


def test_generate_without_logprobs_has_no_logprobs_key(cli, tiny_model):
    result = cli("generate", "--model", str(tiny_model), "-n", "2", "--greedy", "--format",
                 "jsonl", "A")
    assert "logprobs" not in jsonl(result.stdout)[0]
