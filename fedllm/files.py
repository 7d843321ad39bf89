"""Files and folders written so that a reader (or a crash) never sees half of one, with the
ordinary modes the user's umask gives: a run's adapters, reports and caches are meant to be
shared, though tempfile and safetensors make theirs private."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """This process's umask, read without changing it (Linux: /proc; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (readers never see half),
    with the mode an ordinary write would give it (mkstemp's files are private: 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_folder(built: Path, final: Path) -> None:
    """Put the finished folder `built` at `final` (a sibling), replacing what is there: readers
    see the old folder or the new one, never a mix (an old one is moved aside, then deleted).

    Everything in it gets an ordinary mode first (the umask's): mkdtemp, mkstemp and safetensors
    make private ones, and a run's adapters and reports are meant to be shared.
    """
    mask = umask()
    for path in [built, *built.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(built, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, final)


@contextmanager
def building_folder(final: Path) -> Iterator[Path]:
    """An empty folder beside `final` to build in; when the block ends it replaces `final` whole
    (`replace_folder`), and an error leaves `final` as it was and no half folder behind."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        replace_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_folder(final: Path, *, is_complete: Callable[[Path], bool]) -> Iterator[Path]:
    """`building_folder` for a cache: if another process completed ``final`` meanwhile, theirs
    is kept (as good as ours); a stale or half folder is swapped out."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if not (final.exists() and is_complete(final)):
            replace_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path) -> dict | None:
    """The JSON in `path`, or None when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_json_object(path: Path, *, remedy: str) -> dict:
    """The JSON object in `path`; a ValueError naming the file (and `remedy`, what to do) when it
    is empty, cut short or not an object, e.g. after an interrupted copy: json's own message
    ("Expecting value: line 1 column 1") names no file."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not text (not UTF-8); {remedy}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        what = "empty" if not text.strip() else f"not valid JSON ({err})"
        raise ValueError(f"{path} is {what}; {remedy}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; {remedy}")
    return data


RECIPE = "recipe.yaml"  # the recipe a run began with; a resume's own: recipe.resume-<k>.yaml


def keep_recipe(run_dir: Path, text: str, *, resume: bool) -> None:
    """recipe.yaml is the recipe the run began with: written when it starts (or when a resumed
    folder lacks one), kept by a resume, whose own recipe `keep_resume_recipe` adds."""
    if not resume or not (run_dir / RECIPE).exists():
        write_atomic(run_dir / RECIPE, text)


def keep_resume_recipe(run_dir: Path, text: str) -> None:
    """A resume whose recipe differs from the last one kept adds it as recipe.resume-<k>.yaml
    (k one above the highest there), once its checks have passed (recipe.yaml if none)."""
    first = run_dir / RECIPE
    if not first.exists():
        write_atomic(first, text)
        return
    kept = sorted(
        (n, p) for p in run_dir.glob("recipe.resume-*.yaml") if (n := _resume_number(p.name))
    )
    last = kept[-1][1] if kept else first
    if last.read_text() != text:
        write_atomic(run_dir / f"recipe.resume-{(kept[-1][0] if kept else 0) + 1}.yaml", text)


def _resume_number(name: str) -> int:
    digits = name.removeprefix("recipe.resume-").removesuffix(".yaml")
    return int(digits) if digits.isdigit() else 0
