"""`nlgen finetune` on conversations and prompt-completion records: masks, checks, the curve.

The masks are checked token by token on two chat templates given to the tiny GPT-2's tokenizer:
the built-in model's ChatML template (an end-of-turn token, then a newline the reply does not
own) and Llama-2's [INST] template (BOS before each user turn, the system prompt folded into the
first one, EOS after each reply, no generation prompt).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_nlgen

CHATML = (  # SmolLM2-135M-Instruct's template, as the built-in model carries it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
# What each template makes of a reply the loss covers: the reply and its end-of-turn token.
REPLY = {"chatml": "{}<|im_end|>", "llama2": " {} <|endoftext|>"}
FAST = ("--max-steps", "2", "--learning-rate", "1e-3", "--logging-steps", "1", "--seed", "0",
        "--batch-size", "2")

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where did the fox go?"},
    {"role": "assistant", "content": "To the river.", "weight": 0},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "It slept."},
]


def chat_model(tiny_model: Path, directory: Path, template: str) -> Path:
    """The tiny GPT-2 with a chat template; ChatML's tokens are added as special tokens and
    <|im_end|> is its EOS, as in the built-in model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = CHATML if template == "chatml" else LLAMA2
    if template == "chatml":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>",
                                                                    "<|im_end|>"]})
        tokenizer.eos_token = "<|im_end|>"
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        model.resize_token_embeddings(len(tokenizer))
        model.config.eos_token_id = model.generation_config.eos_token_id = \
            tokenizer.eos_token_id
        model.save_pretrained(directory)
    else:
        shutil.copytree(tiny_model, directory, dirs_exist_ok=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["chatml", "llama2"])
def template_model(request, tiny_model, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    return name, chat_model(tiny_model, tmp_path_factory.mktemp(name), name)


@pytest.fixture(scope="module")
def chatml_model(tiny_model, tmp_path_factory) -> Path:
    return chat_model(tiny_model, tmp_path_factory.mktemp("chatml-run"), "chatml")


def encoder(directory: Path, train_on: str = "completion"):
    from transformers import AutoTokenizer

    from nlgen.finetune.chat import Encoder

    tokenizer = AutoTokenizer.from_pretrained(directory)
    return tokenizer, Encoder(tokenizer, train_on, [])


def trained_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The trained stretches of a sequence, decoded; labels equal ids wherever trained."""
    runs: list[list[int]] = []
    previous = False
    for t, label in zip(ids, labels):
        trained = label != -100
        if trained:
            assert label == t
            if not previous:
                runs.append([])
            runs[-1].append(t)
        previous = trained
    return [tokenizer.decode(r) for r in runs]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def record(directory: Path) -> dict:
    return json.loads((directory / "nlgen_run.json").read_text(encoding="utf-8"))


def conversations(n: int) -> list[dict]:
    animals = ["fox", "hare", "owl", "deer", "crow", "mole", "wren", "frog", "bee", "seal"]
    return [{"messages": [{"role": "user", "content": f"Where did the {a} go?"},
                          {"role": "assistant", "content": f"The {a} went to the river."}]}
            for a in (animals * 2)[:n]]


# ----------------------------------------------------------------------------- masks


def test_conversation_mask_is_exact(template_model):
    from nlgen.finetune.chat import check_record

    name, directory = template_model
    tokenizer, encode = encoder(directory)
    example = check_record({"messages": CONVERSATION}, "messages")
    ids, labels = encode(example)
    # The whole conversation, as the template renders it, and nothing else.
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # Only the weight-1 reply, with its end-of-turn token; the weight-0 reply is context.
    assert trained_runs(tokenizer, ids, labels) == [REPLY[name].format("It slept.")]
    both = [dict(m, weight=1) if m["role"] == "assistant" else m for m in CONVERSATION]
    ids, labels = encode(check_record({"messages": both}, "messages"))
    assert trained_runs(tokenizer, ids, labels) == [REPLY[name].format("To the river."),
                                                    REPLY[name].format("It slept.")]
    # Everything else is -100: the trained tokens are exactly those of the two replies.
    replies = sum(len(tokenizer(REPLY[name].format(c), add_special_tokens=False)["input_ids"])
                  for c in ("To the river.", "It slept."))
    assert sum(label != -100 for label in labels) == replies
    _, everything = encoder(directory, "all")
    ids, labels = everything(example)
    assert labels == ids


def test_prompt_completion_masks(template_model):
    from nlgen.finetune.chat import check_record

    name, directory = template_model
    tokenizer, encode = encoder(directory)
    ids, labels = encode(check_record({"prompt": "The fox ", "completion": "ran away."},
                                      "prompt-completion"))
    head = tokenizer("The fox ")["input_ids"]
    assert ids[:len(head)] == head and labels[:len(head)] == [-100] * len(head)
    assert trained_runs(tokenizer, ids, labels) == ["ran away." + tokenizer.eos_token]
    # trl's conversational prompt-completion: the prompt's messages are context.
    ids, labels = encode(check_record(
        {"prompt": CONVERSATION[:4], "completion": [{"role": "assistant", "content": "Slept."}]},
        "prompt-completion"))
    assert trained_runs(tokenizer, ids, labels) == [REPLY[name].format("Slept.")]


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_model):
    from nlgen.finetune.chat import BadRecord, check_record

    tokenizer, encode = encoder(tiny_model)
    # The number of messages up front: no rendering of a part is a prefix of the whole.
    tokenizer.chat_template = ("{{ messages|length }}{% for m in messages %}{{ m['content'] }}"
                               "{% endfor %}")
    with pytest.raises(BadRecord, match="renders the conversation up to message 1"):
        encode(check_record({"messages": CONVERSATION[3:]}, "messages"))


BAD_RECORDS = [
    ({"text": "a"}, "messages", "no 'messages' field (it has: text)"),
    ({"messages": "hi"}, "messages", "'messages' is not a list of messages"),
    ({"messages": []}, "messages", "'messages' is empty"),
    ({"messages": ["hi"]}, "messages", "messages[0] is not an object"),
    ({"messages": [{"content": "a"}]}, "messages", "messages[0] has no 'role'"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "messages",
     "messages[0].role 'bot' is not one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "a", "x": 1}]}, "messages",
     "messages[0] has an unknown key 'x'"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages",
     "messages[0].content is not a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
     "messages", "messages[1].content is empty"),
    ({"messages": [{"role": "user", "content": "a", "weight": 1}]}, "messages",
     "messages[0].weight: only assistant messages have a weight"),
    ({"messages": [{"role": "assistant", "content": "a", "weight": 2}]}, "messages",
     "messages[0].weight must be 0 or 1"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages",
     "no assistant message to train on"),
    ({"messages": [{"role": "assistant", "content": "a", "weight": 0}]}, "messages",
     "every assistant message has weight 0"),
    ({"prompt": "a"}, "prompt-completion", "no 'completion' field"),
    ({"prompt": "a", "completion": ""}, "prompt-completion", "'completion' is empty"),
    ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]},
     "prompt-completion", "'prompt' and 'completion' must be two strings or two lists"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user",
                                                                    "content": "b"}]},
     "prompt-completion", "completion[0].role is 'user'"),
]


@pytest.mark.parametrize(("fields", "fmt", "problem"), BAD_RECORDS,
                         ids=[p for _, _, p in BAD_RECORDS])
def test_record_checks_name_the_field(fields, fmt, problem):
    from nlgen.finetune.chat import BadRecord, check_record

    with pytest.raises(BadRecord) as info:
        check_record(fields, fmt)
    assert str(info.value).startswith(problem)


def test_cli_choices_are_the_cores():
    from nlgen.cli.finetune import FinetuneInput, TrainOn
    from nlgen.finetune.chat import INPUT_FORMATS, TRAIN_ON

    assert tuple(e.value for e in FinetuneInput) == INPUT_FORMATS
    assert tuple(e.value for e in TrainOn) == TRAIN_ON


# ----------------------------------------------------------------------------- runs


def test_chat_run_trains_on_replies_and_draws_the_curve(chatml_model, tmp_path, cli):
    from nlgen.finetune.chat import Encoder, check_record

    data = write_jsonl(tmp_path / "chats.jsonl", conversations(8))
    out = tmp_path / "out"
    r = cli("finetune", str(data), "--model", str(chatml_model), "-o", str(out),
            "--validation-split", "0.25", "--precision", "bf16", *FAST)
    assert r.exit_code == 0, r.output
    rec = record(out)
    assert rec["format"] == "messages" and rec["hyperparameters"]["precision"] == "bf16"
    assert rec["validation_precision"] == "bf16"  # the masked loss: the Trainer's
    ex = rec["examples"]
    assert (ex["train"]["examples"], ex["validation"]["examples"]) == (6, 2)
    assert ex["skipped_bad_records"] == ex["truncated"] == ex["dropped_by_truncation"] == 0
    # The counts are the Encoder's, over every record: replies trained, the rest masked.
    tokenizer, _ = encoder(chatml_model)
    encode = Encoder(tokenizer, "completion", [tokenizer.eos_token_id])
    pairs = [encode(check_record(c, "messages")) for c in conversations(8)]
    trained = sum(sum(t != -100 for t in labels) for _, labels in pairs)
    total = sum(len(ids) for ids, _ in pairs)
    assert ex["train"]["trained_tokens"] + ex["validation"]["trained_tokens"] == trained
    assert trained + ex["train"]["masked_tokens"] + ex["validation"]["masked_tokens"] == total
    assert rec["trained_tokens"] == ex["train"]["trained_tokens"]
    # tokens_seen counts no padding: two steps of two examples each.
    assert rec["tokens_seen"] < 2 * 2 * max(len(ids) for ids, _ in pairs) + 1
    loss = rec["validation_loss"]
    assert loss["before"] > 0 and loss["after"] > 0
    # The curve: the loss at every step, validation before (step 0) and at the end.
    lines = (out / "loss.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "step,epoch,train_loss,validation_loss,learning_rate"
    rows = [line.split(",") for line in lines[1:]]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    assert rows[0][2] == "" and float(rows[0][3]) == pytest.approx(loss["before"], rel=1e-5)
    assert float(rows[2][3]) == pytest.approx(loss["after"], rel=1e-5)
    assert all(float(row[2]) > 0 for row in rows[1:])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rec["loss_curve"] == {"csv": "loss.csv", "png": "loss.png"}
    assert f"loss per step: {out / 'loss.csv'}, {out / 'loss.png'}" in r.stderr
    assert "validation examples (messages, at most 128 tokens each)" in r.stderr
    # The saved tokenizer keeps the template: generate --chat answers with it.
    gen = cli("generate", "--model", str(out), "--chat", "--greedy", "-n", "4",
              "--format", "jsonl", "Where did the fox go?")
    assert gen.exit_code == 0, gen.output
    assert json.loads(gen.stdout)["prompt_tokens"] == len(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Where did the fox go?"}], add_generation_prompt=True,
        tokenize=True, return_dict=False))


def test_bf16_batches_of_like_length_train_the_replies_only(chatml_model):
    """Records run in batches of like length (less padding); under bf16 autocast a padded
    batch's loss is still that of each example's replies alone: padding and prompts count
    for nothing, and no example sees another."""
    import torch
    from transformers import AutoModelForCausalLM

    from nlgen.finetune.chat import check_record
    from nlgen.finetune.examples import PadCollator
    from nlgen.finetune.options import FinetuneOptions
    from nlgen.finetune.run import _training_args

    tokenizer, encode = encoder(chatml_model)
    model = AutoModelForCausalLM.from_pretrained(chatml_model, dtype=torch.float32).eval()
    short = conversations(1)[0]
    long = {"messages": CONVERSATION + [{"role": "user", "content": "Why?"},
                                        {"role": "assistant", "content": "Tired after a "
                                         "long day of running through the woods."}]}
    pairs = [encode(check_record(r, "messages")) for r in (short, long)]
    assert len(pairs[0][0]) < len(pairs[1][0])
    batch = PadCollator(tokenizer.eos_token_id)([{"input_ids": i, "labels": lab}
                                                 for i, lab in pairs])
    with torch.no_grad():
        nll, trained = 0.0, 0
        for ids, labels in pairs:  # each alone, float32, no padding
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum",
                                                           ignore_index=-100))
            trained += int((target != -100).sum())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = float(model(**batch).loss)
            batch["input_ids"][0, len(pairs[0][0]):] = 7  # other padding: the same loss
            assert float(model(**batch).loss) == loss
    assert loss == pytest.approx(nll / trained, rel=0.02)
    opts = FinetuneOptions(data=("x.jsonl",))
    plan = type("Plan", (), {"checkpoints": "unused"})()
    assert _training_args(opts, plan, "bf16", True, [], True, padded=True) \
        .train_sampling_strategy == "group_by_length"
    assert _training_args(opts, plan, "bf16", True, [], True, padded=False) \
        .train_sampling_strategy == "random"  # packed text blocks are all one length


def test_a_text_run_draws_its_curve_too(tiny_model, tmp_path, cli):
    from conftest import CORPUS

    out = tmp_path / "out"
    r = cli("finetune", str(CORPUS), "--model", str(tiny_model), "-o", str(out), *FAST,
            "--eval-steps", "1")
    assert r.exit_code == 0, r.output
    rows = (out / "loss.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["0", "1", "2"]
    assert all(row.split(",")[3] for row in rows)  # validation measured at every step
    rec = record(out)
    assert rec["format"] == "text" and rec["examples"] is None
    assert rec["masked_tokens"] == 0 and rec["trained_tokens"] == rec["train_blocks"] * 128
    assert (out / "loss.png").is_file()


def test_bad_records_are_named_by_line_or_skipped_and_counted(chatml_model, tmp_path, cli):
    good = conversations(6)
    data = write_jsonl(tmp_path / "chats.jsonl", [
        *good[:2], {"messages": [{"role": "bot", "content": "hi"}]}, *good[2:4], "not json",
        *good[4:]])
    out = tmp_path / "out"
    r = cli("finetune", str(data), "--model", str(chatml_model), "-o", str(out), *FAST)
    assert r.exit_code == 1
    assert r.stderr.startswith(f"Error: {data}:3: messages[0].role 'bot' is not one of "
                               "system, user, assistant (and 1 more bad records)"), r.stderr
    assert "--skip-bad" in r.stderr and not out.exists()
    r = cli("finetune", str(data), "--model", str(chatml_model), "-o", str(out), *FAST,
            "--skip-bad")
    assert r.exit_code == 0, r.output
    assert f"skipped {data}:3: messages[0].role" in r.stderr
    assert f"skipped {data}:6: not JSON" in r.stderr
    ex = record(out)["examples"]
    assert ex["skipped_bad_records"] == 2
    assert ex["train"]["examples"] + ex["validation"]["examples"] == 6


def test_truncation_is_reported_and_empty_examples_left_out(tiny_model, tmp_path, cli):
    """Prompt-completion strings on a model without a chat template; --block-size 12."""
    long_prompt = "The fox walked to the river and drank and drank and then walked home again"
    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "The fox", "completion": " ran."},
        {"prompt": "The owl", "completion": " flew."},
        {"prompt": "The deer", "completion": " walked to the river and drank and slept."},
        {"prompt": long_prompt, "completion": " Then it slept."},
    ])
    out = tmp_path / "out"
    r = cli("finetune", str(data), "--model", str(tiny_model), "-o", str(out), *FAST,
            "--block-size", "12", "--validation-split", "0")
    assert r.exit_code == 0, r.output
    assert "1 training example longer than 12 tokens, cut to fit" in r.stderr
    assert "1 training example lost every trained token to the cut" in r.stderr
    assert f"{data}:4" in r.stderr and f"{data}:3" in r.stderr
    rec = record(out)
    assert rec["format"] == "prompt-completion"
    ex = rec["examples"]
    assert (ex["truncated"], ex["dropped_by_truncation"], ex["train"]["examples"]) == (1, 1, 3)
    r = cli("finetune", str(data), "--model", str(tiny_model), "-o", str(tmp_path / "o2"),
            *FAST, "--block-size", "2", "--validation-split", "0")
    assert r.exit_code == 1 and "no training example is left" in r.stderr


def test_wrong_kinds_of_data_are_refused(tiny_model, tmp_path, cli):
    from conftest import CORPUS

    chats = write_jsonl(tmp_path / "chats.jsonl", conversations(4))
    r = cli("finetune", str(chats), str(CORPUS), "--model", str(tiny_model), "-o",
            str(tmp_path / "o"), *FAST)
    assert r.exit_code == 1 and "mixes plain text" in r.stderr
    r = cli("finetune", str(chats), "--model", str(tiny_model), "-o", str(tmp_path / "o"),
            *FAST)
    assert r.exit_code == 1 and "has no chat template" in r.stderr
    r = cli("finetune", str(chats), "--input-format", "text", "--model", str(tiny_model),
            "-o", str(tmp_path / "o"), *FAST)
    assert r.exit_code == 1 and "has no 'text' field" in r.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- built-in model


@pytest.mark.slow
def test_builtin_model_learns_conversations_and_chats_with_its_template(tmp_path):
    from transformers import AutoTokenizer

    colours = [("sky", "Blue."), ("grass", "Green."), ("snow", "White."), ("coal", "Black."),
               ("sun", "Yellow."), ("blood", "Red.")]
    chats = [[{"role": "system", "content": "You answer in one word."},
              {"role": "user", "content": f"What colour is the {thing}?"},
              {"role": "assistant", "content": colour}] for thing, colour in colours]
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in chats])
    out = tmp_path / "chat-ft"
    proc = run_nlgen("finetune", str(data), "--model", "builtin", "-o", str(out),
                     "--max-steps", "3", "--batch-size", "2", "--learning-rate", "1e-4",
                     "--validation-split", "0.34", "--seed", "0", "--logging-steps", "1")
    assert proc.returncode == 0, proc.stderr.decode()
    rec = record(out)
    ex = rec["examples"]
    assert rec["format"] == "messages" and ex["validation"]["examples"] == 2
    # Each reply: its word and <|im_end|> (ChatML's newline after it is not trained).
    tokenizer = AutoTokenizer.from_pretrained(out)
    replies = sum(len(tokenizer(c + "<|im_end|>", add_special_tokens=False)["input_ids"])
                  for _, c in colours)
    total = sum(len(tokenizer(tokenizer.apply_chat_template(c, tokenize=False),
                              add_special_tokens=False)["input_ids"]) for c in chats)
    sets = (ex["train"], ex["validation"])
    assert sum(s["trained_tokens"] for s in sets) == replies
    assert sum(s["masked_tokens"] for s in sets) == total - replies
    assert rec["validation_loss"]["after"] < rec["validation_loss"]["before"]
    assert (out / "loss.png").is_file()
    gen = run_nlgen("generate", "--model", str(out), "--chat", "--greedy", "-n", "8",
                    "--format", "jsonl", "What colour is the sea?")
    assert gen.returncode == 0, gen.stderr.decode()
    answer = json.loads(gen.stdout)
    assert answer["completion"].strip() and answer["finish_reason"] in ("eos", "length")


def test_a_resumed_chat_run_keeps_its_whole_curve(chatml_model, tmp_path):
    import signal

    from nlgen import finetune
    from nlgen.errors import UsageError

    data = write_jsonl(tmp_path / "chats.jsonl", conversations(8))
    out = tmp_path / "out"

    def opts(**kw) -> finetune.FinetuneOptions:
        return finetune.FinetuneOptions(data=(str(data),), model=str(chatml_model),
                                        output_dir=str(out), max_steps=4, learning_rate=1e-3,
                                        batch_size=2, logging_steps=1, seed=0,
                                        validation_split=0.25, **kw)

    def interrupt_at_2(event) -> None:
        if isinstance(event, finetune.StepProgress) and event.step == 2 and not event.logged:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(finetune.TrainingInterrupted):
        finetune.finetune(opts(), on_event=interrupt_at_2)
    with pytest.raises(UsageError, match="--train-on completion then, all now"):
        finetune.finetune(opts(resume=True, train_on="all"))
    result = finetune.finetune(opts(resume=True))
    assert result.record["resumed_from_step"] == 2
    rows = (out / "loss.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["0", "1", "2", "3", "4"]
    assert all(row.split(",")[2] for row in rows[1:])


def test_a_reply_that_shares_a_token_with_its_prompt_is_refused(tiny_model):
    from nlgen.finetune.chat import BadRecord, check_record

    tokenizer, encode = encoder(tiny_model)
    # The generation prompt "th" and a reply "e fox" render " the fox": one token " the".
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'th' + m['content'] }}"
        "{% else %}{{ m['content'] + ' ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'th' }}{% endif %}")
    with pytest.raises(BadRecord, match="message 1's reply does not begin or end on a token"):
        encode(check_record({"messages": [{"role": "user", "content": "Where"},
                                          {"role": "assistant", "content": "e fox"}]},
                            "messages"))
