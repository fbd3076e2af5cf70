"""The models this machine can load without a network: builtin, Hub cache, converted GGUFs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from nlgen.errors import ModelError
from nlgen.models import gguf, spec


@dataclass(frozen=True)
class Entry:
    name: str  # what to pass to --model
    kind: str  # "builtin" | "hub-cache" | "converted"
    size: int  # bytes on disk
    location: str
    note: str = ""

    @property
    def size_human(self) -> str:
        size = float(self.size)
        for unit in ("B", "KB", "MB", "GB"):
            if size < 1000 or unit == "GB":
                return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
            size /= 1000
        return f"{size:.1f} GB"

    def as_dict(self) -> dict:
        return asdict(self)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_models() -> list[Entry]:
    entries = []
    try:
        path = spec.builtin_gguf_path()
        note = ("converted copy cached" if gguf.is_converted(path)
                else "converted on first use (~20 s)")
        entries.append(Entry(spec.BUILTIN, "builtin", path.stat().st_size, str(path),
                             f"{spec.BUILTIN_NAME}; {note}"))
    except ModelError as exc:
        entries.append(Entry(spec.BUILTIN, "builtin", 0, "-", f"missing: {exc.hint}"))
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
        for repo in sorted(info.repos, key=lambda r: r.repo_id):
            if repo.repo_type == "model":
                entries.append(Entry(repo.repo_id, "hub-cache", repo.size_on_disk,
                                     str(repo.repo_path)))
    except Exception:  # no cache directory yet, or an unreadable one: nothing to list
        pass
    return entries
