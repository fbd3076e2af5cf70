"""transformers' index of its lazy modules, kept between nlgen's processes.

``import transformers`` (5.x) walks its ``models/`` directory, some 1,500 files, reading each
one's ``__all__`` to build the table its lazy module serves names from
(``transformers.utils.import_utils.define_import_structure``): 0.2-0.3 s of every process that
imports it, for the same answer each time until transformers itself changes. nlgen's CLI keeps
that answer (JSON, in nlgen's cache directory, keyed by the directory, its modification time
and transformers' own file) and hands it back on the next import: ``import transformers``
0.72-0.76 s -> 0.43-0.54 s on the 2-core test machine (5 runs each, interleaved).

:func:`install` is called by the CLI only, before anything imports transformers; it wraps
that one function as the module is loaded, and any surprise (another transformers, a cache
that cannot be read or written) falls back to transformers' own walk: the table is never
different from the one transformers builds (tests/test_models.py compares them).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODULE = "transformers.utils.import_utils"
FUNCTION = "define_import_structure"


def install() -> None:
    """Serve transformers' table of lazy modules from nlgen's cache in this process (a no-op
    once transformers is imported)."""
    if "transformers" in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when transformers' import_utils is imported, wraps its loader so
    that :data:`FUNCTION` is replaced by :func:`_kept` right after the module runs."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != MODULE:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # once
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            original = getattr(module, FUNCTION, None)
            if callable(original):
                setattr(module, FUNCTION, _kept(original, Path(module.__file__)))

        loader.exec_module = exec_module
        return spec


def _kept(original: Callable[..., Any], source: Path) -> Callable[..., Any]:
    """``original`` for the one call that walks all of ``models/`` (transformers' own
    ``__init__``), kept; every other call (each model's package, on its import) as it was."""

    def define_import_structure(module_path: Any, prefix: str | None = None) -> Any:
        if prefix != "models":
            return original(module_path, prefix)
        try:
            key = [str(module_path), prefix, os.stat(module_path).st_mtime_ns,
                   os.stat(source).st_mtime_ns, sys.version]
            path = _cache_file()
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                stored = json.loads(path.read_text(encoding="utf-8"))
                if stored["key"] == key:
                    return _decode(stored["structure"])
        except Exception:  # never in the way of transformers' own import
            return original(module_path, prefix)
        structure = original(module_path, prefix)
        with contextlib.suppress(Exception):
            _write(path, {"key": key, "structure": _encode(structure)})
        return structure

    return define_import_structure


def _cache_file() -> Path:
    from nlgen.models.gguf import cache_dir

    return cache_dir() / "transformers-import-index.json"


def _encode(structure: dict[frozenset[str], dict[str, set[str]]]) -> list[Any]:
    return [[sorted(backends), {name: sorted(objects) for name, objects in modules.items()}]
            for backends, modules in structure.items()]


def _decode(stored: list[Any]) -> dict[frozenset[str], dict[str, set[str]]]:
    return {frozenset(backends): {name: set(objects) for name, objects in modules.items()}
            for backends, modules in stored}


def _write(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".import-index-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
