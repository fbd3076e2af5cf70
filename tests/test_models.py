"""Model resolution: specs, the Hub cache offline, device/dtype choice, `nlgen models`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_nlgen

from nlgen.errors import ModelError, UsageError
from nlgen.models import devices, gguf, loading, spec

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path, tiny_model) -> Path:
    """A Hugging Face cache laid out as huggingface_hub writes it, holding `nlgen-test/tiny`."""
    repo = tmp_path / "hub" / "models--nlgen-test--tiny"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in tiny_model.iterdir():
        shutil.copy(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return tmp_path / "hub"


def test_resolve_spec_kinds(tiny_model, tmp_path):
    assert spec.resolve_spec(None) == spec.ModelSpec("hub", "gpt2", "gpt2", False)
    assert spec.resolve_spec("gpt2").explicit
    assert spec.resolve_spec("org/name").kind == "hub"
    assert spec.resolve_spec(str(tiny_model)).kind == "dir"
    builtin = spec.resolve_spec("builtin")
    assert builtin.kind == "builtin" and builtin.path.endswith(".gguf")
    with pytest.raises(ModelError, match="GGUF file not found"):
        spec.resolve_spec(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelError, match="model directory not found"):
        spec.resolve_spec("./nope")


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NLGEN_CACHE", str(tmp_path / "c"))
    assert gguf.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NLGEN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf.cache_dir() == tmp_path / "xdg" / "nlgen"


class _Connection:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_hub_probe_honours_offline_flag_and_remembers_failures(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("NLGEN_CACHE", str(tmp_path))
    calls = []

    def connect(address, timeout):
        calls.append(address)
        if fail:
            raise OSError("unreachable")
        return _Connection()

    monkeypatch.setattr(spec.socket, "create_connection", connect)
    fail = False
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert spec.hub_reachable() is False and calls == []  # the flag wins, no probe
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert spec.hub_reachable() is True and len(calls) == 1  # a reachable Hub says so
    fail = True
    assert spec.hub_reachable() is False and len(calls) == 2
    assert spec.hub_reachable() is False and len(calls) == 2  # remembered: no second wait
    (tmp_path / "hub-unreachable").unlink()
    fail = False
    assert spec.hub_reachable() is True and len(calls) == 3


def test_device_and_dtype_validation():
    for ok in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert devices.check_device_spec(ok) == ok
    with pytest.raises(UsageError):
        devices.check_device_spec("gpu")
    with pytest.raises(UsageError):
        devices.check_dtype_spec("float8")
    assert devices.resolve_device("auto") == "cpu"  # no GPU on the test machines
    assert devices.resolve_dtype("float16", "cpu") == "float16"
    assert devices.resolve_dtype("auto", "cpu", purpose="score") == "float32"
    expected = "bfloat16" if devices.cpu_has_fast_bf16() else "float32"
    assert devices.resolve_dtype("auto", "cpu") == expected


def test_cuda_requested_without_a_gpu():
    with pytest.raises(ModelError, match="CUDA is not available"):
        devices.resolve_device("cuda")


def test_tiny_model_loads_with_pad_token(tiny_lm):
    assert tiny_lm.tokenizer.pad_token is not None
    assert tiny_lm.context_length == 128
    assert (tiny_lm.device, tiny_lm.dtype) == ("cpu", "float32")


def test_hub_id_loads_from_the_local_cache_offline(hub_cache):
    result = run_nlgen("generate", "--model", "nlgen-test/tiny", "--greedy", "-n", "3",
                       "--format", "jsonl", "The fox", env={"HF_HUB_CACHE": str(hub_cache)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "nlgen-test/tiny"


def test_models_lists_builtin_and_hub_cache(hub_cache):
    result = run_nlgen("models", "--format", "jsonl", env={"HF_HUB_CACHE": str(hub_cache)})
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    assert entries[0]["name"] == "builtin" and entries[0]["kind"] == "builtin"
    assert {"name": "nlgen-test/tiny", "kind": "hub-cache"}.items() <= entries[1].items()
    text = run_nlgen("models", env={"HF_HUB_CACHE": str(hub_cache)}).stdout.decode()
    assert "nlgen-test/tiny\thub-cache" in text


def test_gguf_cache_key_changes_with_the_file(tmp_path):
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"x" * 10)
    first = gguf.cache_path(model_file)
    model_file.write_bytes(b"y" * 11)
    assert gguf.cache_path(model_file) != first


def test_bad_gguf_file_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NLGEN_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="cannot read GGUF file"):
        loading.load_model(str(broken), device="cpu")
    assert not any((tmp_path / "cache" / "converted").glob("broken-*/config.json"))


@pytest.mark.parametrize("others, threads, expected", [
    (0.0, 2, 2), (0.3, 2, 2), (0.8, 2, 1), (1.9, 2, 1), (3.0, 8, 5), (0.0, 1, 1)])
def test_spare_threads_leave_busy_cores_to_other_processes(monkeypatch, others, threads,
                                                           expected):
    from nlgen.models import devices

    cores = max(threads, 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(devices.os, "cpu_count", lambda: cores)
    # 2 s of wall time; this process used 1.5 CPU seconds, the others `others` cores.
    monkeypatch.setattr(devices, "cpu_snapshot", lambda: (12.0, 100 + 1.5 + 2 * others, 6.5))
    assert devices.spare_threads((10.0, 100.0, 5.0), threads) == expected
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    assert devices.spare_threads((10.0, 100.0, 5.0), threads) == threads  # the user's choice
    assert devices.spare_threads(None, threads) == threads  # not measured: unchanged


# ----------------------------------------------------------------------------- import index


def test_the_kept_import_index_is_transformers_own(tmp_path, monkeypatch):
    """nlgen.models.import_index: the table read back equals the one transformers builds; a
    changed directory builds it again."""
    import os

    import transformers
    from transformers.utils import import_utils

    from nlgen.models import import_index

    monkeypatch.setenv("NLGEN_CACHE", str(tmp_path))
    models = Path(transformers.__file__).parent / "models"
    # transformers memoizes the function, and its __init__ adds to the table it got: the
    # function itself, unmemoized, is the reference.
    build = getattr(import_utils.define_import_structure, "__wrapped__",
                    import_utils.define_import_structure)
    calls = []

    def original(path, prefix=None):
        calls.append((path, prefix))
        return build(path, prefix)

    kept = import_index._kept(original, Path(import_utils.__file__))
    want = build(models, "models")
    assert kept(models, prefix="models") == want and len(calls) == 1  # built, and kept
    assert (tmp_path / "transformers-import-index.json").is_file()
    assert kept(models, prefix="models") == want and len(calls) == 1  # read back
    llama = models / "llama"
    assert kept(llama) == build(llama) and len(calls) == 2  # one model's package: as it was
    assert kept(models, prefix="models") == want and len(calls) == 2  # still kept
    # A changed directory (transformers reinstalled) is walked again.
    mine = tmp_path / "site" / "models"
    shutil.copytree(models / "gpt2", mine / "gpt2")
    first = kept(mine, prefix="models")
    assert first == build(mine, "models") and len(calls) == 3
    assert kept(mine, prefix="models") == first and len(calls) == 3
    shutil.copytree(models / "llama", mine / "llama")
    stat = mine.stat()
    os.utime(mine, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    kept(mine, prefix="models")
    assert len(calls) == 4  # built again (transformers memoizes its walk within a process)


@pytest.mark.slow
def test_a_process_with_the_kept_index_sees_every_name_transformers_has(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    script = ("import sys\nfrom nlgen.models import import_index\n"
              "if sys.argv[1] == 'kept': import_index.install()\n"
              "import transformers\nfrom transformers import GenerationConfig, LlamaConfig\n"
              "from transformers import GPT2LMHeadModel\n"
              "print(len(dir(transformers)), hash(tuple(sorted(dir(transformers)))))")
    env = {**os.environ, "NLGEN_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}

    def names(how: str) -> str:
        proc = subprocess.run([sys.executable, "-c", script, how], capture_output=True,
                              text=True, env={**env, "PYTHONHASHSEED": "0"}, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    plain = names("plain")
    assert names("kept") == plain  # the first builds the index and keeps it
    assert (tmp_path / "transformers-import-index.json").is_file()
    assert names("kept") == plain  # the second reads it
