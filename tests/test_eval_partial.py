"""eval/partial.py's digests: what makes a finished piece of an eval stale."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fedllm.eval.partial import adapter_digest, code_digest


def _adapter(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def test_adapter_digest_follows_names_and_bytes_not_the_parent(tmp_path: Path) -> None:
    one = _adapter(tmp_path / "a" / "global", b"\x00\x01")
    same = _adapter(tmp_path / "b" / "global", b"\x00\x01")
    assert adapter_digest([one]) == adapter_digest([same])  # moved run folder: same pieces
    other = _adapter(tmp_path / "c" / "global", b"\x00\x02")
    assert adapter_digest([one]) != adapter_digest([other])  # retrained weights
    renamed = _adapter(tmp_path / "d" / "client_0", b"\x00\x01")
    assert adapter_digest([one]) != adapter_digest([renamed])
    (same / "extra.txt").write_text("x")
    assert adapter_digest([one]) != adapter_digest([same])  # a file added


def _module(folder: Path, name: str, source: str, monkeypatch: pytest.MonkeyPatch) -> type:
    """The class `Task` of a module `name` loaded from `folder` (registered for this test only)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module.Task


def test_code_digest_follows_a_plugin_task_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = code_digest([])
    assert code_digest([]) == base
    task = _module(tmp_path, "plugin_task_one", "class Task:\n    answer = 1\n", monkeypatch)
    with_task = code_digest([task])
    assert with_task != base
    (tmp_path / "plugin_task_one.py").write_text("class Task:\n    answer = 2\n")
    assert code_digest([task]) != with_task  # the same class, its file edited since


def test_code_digest_names_modules_not_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same module and source in another checkout give the same digest (pieces survive a
    moved or re-cloned checkout); a path-keyed digest would differ."""
    source = "class Task:\n    answer = 1\n"
    here = code_digest([_module(tmp_path / "a", "plugin_task_two", source, monkeypatch)])
    there = code_digest([_module(tmp_path / "b", "plugin_task_two", source, monkeypatch)])
    assert here == there
