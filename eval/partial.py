"""What an interrupted `fedllm eval` keeps: each finished piece (one client's quality tasks, one
leakage view) is saved as JSON as it ends, in a folder beside the report; the same eval run
again takes those pieces instead of recomputing them, and the folder goes once the report is
written.

"The same eval" is a key over everything a piece depends on: the recipe's fingerprint, the
eval settings and tasks (with the data a task brings, e.g. an --mc-file's questions), the bytes
of every adapter evaluated and the source of the code that computes pieces. A folder with
another key (other settings, a retrained adapter, edited code) is discarded, with a line saying
so.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedllm.files import write_atomic

KEY = "key.json"


def adapter_digest(folders: Iterable[Path]) -> str:
    """A digest of the adapter folders' files (names and bytes): a retrained or replaced adapter
    makes another digest."""
    return _files_digest(
        (f"{folder.name}/{path.name}", path)
        for folder in folders
        for path in folder.iterdir()
        if path.is_file()
    )


def code_digest(classes: Iterable[type]) -> str:
    """A digest of the source of every loaded fedllm module and of the modules defining
    `classes` (a plugin's tasks): a piece computed by other code is not reused."""
    files = {
        (name, Path(module.__file__))
        for name, module in list(sys.modules.items())
        if (name == "fedllm" or name.startswith("fedllm.")) and getattr(module, "__file__", None)
    }
    files |= {(cls.__module__, Path(inspect.getfile(cls))) for cls in classes}
    return _files_digest(files)


def _files_digest(files: Iterable[tuple[str, Path]]) -> str:
    """sha256 over (name, sha256 of the bytes) in name order; a file gone reads as empty."""
    h = hashlib.sha256()
    for name, path in sorted(files):
        h.update(f"{name}\0".encode())
        h.update(hashlib.sha256(path.read_bytes() if path.is_file() else b"").digest())
    return h.hexdigest()


class Pieces:
    """The finished pieces of one eval, as JSON files in `folder`, for the eval named by `key`."""

    def __init__(self, folder: Path, key: Mapping[str, Any], *, say: Callable[[str], None]) -> None:
        self.folder = folder
        wanted = json.dumps(dict(key), sort_keys=True, default=str)
        kept = folder / KEY
        if folder.exists() and (not kept.is_file() or kept.read_text() != wanted):
            say(f"{folder}: an interrupted eval of other adapters or settings, discarded")
            shutil.rmtree(folder)
        elif kept.is_file():
            done = sorted(p.stem for p in folder.glob("*.json") if p.name != KEY)
            if done:
                say(f"resuming an interrupted eval: {len(done)} finished pieces in {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(kept, wanted)

    @classmethod
    def beside(cls, out: Path, key: Mapping[str, Any], *, say: Callable[[str], None]) -> Pieces:
        """The pieces of the eval whose report goes to `out` (a hidden folder next to it)."""
        return cls(out.parent / f".{out.name}.partial", key, say=say)

    def get(self, name: str) -> Any | None:
        """A finished piece, or None (not done, or half written by a crash: done again)."""
        path = self.folder / f"{name}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def put(self, name: str, value: Any) -> Any:
        """Save a finished piece (atomically); returns it as a later run would read it back."""
        text = json.dumps(value, default=float)
        write_atomic(self.folder / f"{name}.json", text)
        return json.loads(text)

    def remove(self) -> None:
        """The report is written: nothing left to resume."""
        shutil.rmtree(self.folder, ignore_errors=True)
