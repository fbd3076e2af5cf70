"""GGUF files -> a cached float32 safetensors directory, converted once.

transformers dequantizes a GGUF file on every load (20-35 s on 2 cores); the safetensors copy
loads in about 2 s. The conversion is written to a temporary sibling and renamed into place,
under a file lock, so concurrent runs and crashes never leave a half-written entry.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nlgen.errors import ModelError, OutputError, first_line, write_failure
from nlgen.models.devices import process_alive

log = logging.getLogger("nlgen")

MAGIC = b"GGUF"  # the first four bytes of every GGUF file


def cache_dir() -> Path:
    """Where converted models live: $NLGEN_CACHE, else the user's cache dir."""
    env = os.environ.get("NLGEN_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nlgen"


def cache_path(gguf: Path) -> Path:
    """One cache entry per GGUF file version (path, size and mtime decide; no 90 MB hash)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "converted" / f"{gguf.stem}-{key[:16]}"


def is_converted(gguf: Path) -> bool:
    return (cache_path(gguf) / "config.json").is_file()


def check_magic(gguf: Path) -> None:
    """Refuse a file that is not GGUF before announcing a conversion or taking a lock."""
    try:
        with open(gguf, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError as exc:
        raise ModelError(f"cannot read GGUF file {gguf}: {exc.strerror}") from None
    if head != MAGIC:
        raise ModelError(f"cannot read GGUF file {gguf}: not a GGUF file (it does not start "
                         "with 'GGUF')", hint="pass a .gguf model file, e.g. from llama.cpp")


def _cache_error(path: Path, exc: Exception) -> OutputError:
    why = write_failure(exc) or first_line(exc)
    return OutputError(f"cannot write the model cache at {path}: {why}",
                       hint="free some space, or set NLGEN_CACHE to a writable directory "
                       "with room")


def converted_dir(gguf: Path) -> Path:
    """Convert a GGUF file to a float32 safetensors directory once; return the cached copy."""
    check_magic(gguf)
    target = cache_path(gguf)
    if (target / "config.json").is_file():
        remove_stale_temporaries(target)
        return target
    from filelock import FileLock, Timeout

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(target) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.warning("waiting for another nlgen process that is converting %s", gguf.name)
            lock.acquire()
    except OSError as exc:
        raise _cache_error(target.parent, exc) from None
    try:
        if not (target / "config.json").is_file():  # another process may have converted it
            remove_stale_temporaries(target)
            _convert(gguf, target)
    finally:
        lock.release()
    return target


TMP_MARK = ".tmp-"  # ENTRY.tmp-HOST-PID-RANDOM: a conversion in progress, or a killed one's


def _temporary_dir(target: Path) -> Path:
    """A temporary sibling of ``target`` that names its host and process, so that a later run
    can tell a live conversion's from one a kill -9 left behind."""
    prefix = f"{target.name}{TMP_MARK}{socket.gethostname().replace('-', '_')}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))


def remove_stale_temporaries(target: Path) -> None:
    """Remove what killed conversions left in the cache (a directory listing: cheap): every
    temporary of ``target``, which no process is converting (we hold its lock, or it is
    converted already), and the others whose process, on this host, is gone."""
    host = socket.gethostname().replace("-", "_")
    for tmp in target.parent.glob(f"*{TMP_MARK}*"):
        entry, _, tail = tmp.name.rpartition(TMP_MARK)
        parts = tail.rsplit("-", 2)
        mine = entry == target.name
        if mine or (len(parts) == 3 and parts[0] == host and parts[1].isdigit()
                    and not process_alive(int(parts[1]))):
            log.info("removing %s, left by a conversion that was killed", tmp.name)
            shutil.rmtree(tmp, ignore_errors=True)


def umask_modes(directory: Path) -> None:
    """Files and folders as the umask makes any other: mkdtemp makes 0700, and safetensors
    writes its file through a temporary one of mode 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _convert(gguf: Path, target: Path) -> None:
    log.warning("converting %s to safetensors once (about 20 s); later runs load the cached "
                "copy in %s", gguf.name, target.parent)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_gguf_reader():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
    except Exception as exc:  # gguf's own errors are many and untyped
        raise ModelError(f"cannot read GGUF file {gguf}: {first_line(exc)}") from exc
    # A model loaded from GGUF carries its quantizer and refuses save_pretrained ("quantized
    # with gguf and is not serializable"); its weights are plain float32 by now, so drop both.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    from safetensors import SafetensorError

    try:
        tmp = _temporary_dir(target)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            umask_modes(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, SafetensorError) as exc:  # a full disk is the usual one
        raise _cache_error(target.parent, exc) from None


@contextlib.contextmanager
def _quiet_gguf_reader() -> Iterator[None]:
    """transformers' GGUF reader draws a plain tqdm bar that its own switch does not reach.

    We say on stderr, once, that the conversion runs; a bar of 272 tensors adds only noise (and
    escape codes in logs). tqdm reads TQDM_DISABLE when it is imported, too early for us. The
    bar is switched off for the conversion only, and put back after it.
    """
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
