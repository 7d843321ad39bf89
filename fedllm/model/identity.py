"""A base model as something portable: its name, what it is, and sha256 hashes of its weights.

An adapter's card (`fedllm.model.card`) carries this identity, so a reader can tell which base
it was trained on from the weights themselves, not from a cache path. Hashing a large base is
memoised per run (`IDENTITY_MEMO`: the files' names, sizes and mtimes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fedllm.files import write_atomic
from fedllm.model.base import base_model_dir
from fedllm.model.loading import (
    EMBEDDED,
    EMBEDDED_GGUF,
    EMBEDDED_PACKAGE,
    embedded_gguf_path,
)
from fedllm.recipe.schema import RunConfig

IDENTITY_MEMO = "base_identity.json"  # per-run memo: hashing a large base once, not per adapter
EMBEDDED_UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class BaseIdentity:
    """A base model as something portable: its name, what it is, and hashes of its weights."""

    name: str  # what adapter_config.json's base_model_name_or_path says
    kind: str  # embedded | tiny | folder | hub
    files: dict[str, str]  # weight file name -> sha256 (embedded: the GGUF it is converted from)
    source: dict[str, str] = field(default_factory=dict)  # package/version, hub revision, ...
    upstream: str | None = None  # the hub model it derives from (the card's `base_model`)

    @property
    def sha256(self) -> str:
        """One hash over every weight file's hash (a single file: that file's sha256)."""
        if len(self.files) == 1:
            return next(iter(self.files.values()))
        text = "".join(f"{name}\0{digest}\n" for name, digest in sorted(self.files.items()))
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BaseIdentity:
        """The identity in a card's `base` entry (keys it does not hold, like `sha256`, ignored)."""
        keys = ("name", "kind", "files", "source", "upstream")
        return cls(**{k: data[k] for k in keys if k in data})


def file_sha256(path: Path, *, chunk: int = 1 << 23) -> str:
    """sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder (safetensors, bin, pt, gguf), by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("adapter_") and p.is_file()
    )


def _stamp(files: list[Path]) -> list[list]:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _hashed(files: list[Path], memo: Path | None, *, key: str) -> dict[str, str]:
    """name -> sha256 of `files`, reusing `memo` when it holds the same files (size, mtime)."""
    stamp = _stamp(files)
    if memo is not None and memo.is_file():
        try:
            kept = json.loads(memo.read_text())
        except ValueError:
            kept = {}
        if kept.get("key") == key and kept.get("stamp") == stamp:
            return dict(kept["files"])
    hashes = {p.name: file_sha256(p) for p in files}
    if memo is not None:
        write_atomic(memo, json.dumps({"key": key, "stamp": stamp, "files": hashes}, indent=2))
    return hashes


def base_identity(cfg: RunConfig, *, memo: Path | None = None) -> BaseIdentity:
    """The portable identity of the recipe's base (hashes memoised in `memo`, if given)."""
    name = cfg.model.name
    if name == EMBEDDED:
        gguf = embedded_gguf_path()
        try:
            pkg_version = version(EMBEDDED_PACKAGE.replace("_", "-"))
        except PackageNotFoundError:
            pkg_version = "unknown"
        source = {
            "package": EMBEDDED_PACKAGE.replace("_", "-"),
            "version": pkg_version,
            "file": EMBEDDED_GGUF,
            "conversion": "GGUF Q4_1 dequantized to a float32 Hugging Face folder by fedllm",
        }
        files = _hashed([gguf], memo, key=f"embedded:{gguf}")
        return BaseIdentity(name, "embedded", files, source, EMBEDDED_UPSTREAM)
    folder = base_model_dir(cfg)
    if name == "tiny":
        source = {"built": "from the recipe's model.tiny settings, in <run_dir>/tiny_base"}
        files = _hashed(weight_files(folder), memo, key=f"tiny:{folder}")
        return BaseIdentity(name, "tiny", files, source)
    files = _hashed(weight_files(folder), memo, key=f"folder:{folder.resolve()}")
    if Path(name).expanduser().is_dir():
        return BaseIdentity(name, "folder", files)
    # a hub id from the offline cache: .../models--org--name/snapshots/<revision>/
    return BaseIdentity(name, "hub", files, {"revision": folder.name}, upstream=name)
