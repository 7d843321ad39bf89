"""Round checkpoints: written atomically after every finished round, read back by `--resume`.

A checkpoint holds only tensors and plain containers (dict, list, tuple, str, int, float, bool,
None) and is read with `torch.load(weights_only=True)`, so a file dropped into a run directory
cannot run code when it is resumed. Each save keeps the one before as `checkpoint.prev.pt`; a
latest checkpoint that cannot be read (a bad disk, a partial copy) falls back to it. The save that
marks a round pending (its clients may be training: a resume charges it to the DP ledgers) writes
both files, so that the fallback charges it too. Each file carries a SHA-256 of its own content
(`digest`), checked on reading: `torch.load` does not check the zip's CRCs, so a flipped bit in a
tensor read back as a valid checkpoint (h92: a B entry 0.267 became 9.1e37).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedllm.server.metrics import fsync_dir

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # the checkpoint before the latest: the fallback when it is bad
CORRUPT = "checkpoint.corrupt.pt"  # an unreadable latest, moved aside when the fallback is used
DIGEST = "digest"  # the payload's key for the SHA-256 of the rest of it

log = logging.getLogger(__name__)

_LEAVES = (str, bytes, int, float, bool, type(None))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back, naming the file and what to do about it."""


def has_checkpoint(run_dir: Path) -> bool:
    """Whether `run_dir` holds a checkpoint (latest or previous) that `--resume` would read."""
    return (run_dir / CHECKPOINT).is_file() or (run_dir / PREVIOUS).is_file()


def plain(value: Any, where: str = "state") -> Any:
    """`value` as tensors and plain containers only, which `torch.load(weights_only=True)` reads.

    Converted: numpy scalars to Python numbers, numpy arrays to tensors, nn.Parameters to plain
    tensors, subclasses of int/float/str (enums) to the base type, other mappings to dicts and
    tuple subclasses (named tuples) to tuples. Anything else is a TypeError naming its key path,
    raised before anything is written.
    """
    if isinstance(value, torch.Tensor):
        return value.detach() if isinstance(value, torch.nn.Parameter) else value
    if type(value) in _LEAVES:
        return value
    if type(value).__module__ == "numpy":
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray) and value.dtype != object:
            return torch.from_numpy(value.copy())
    if isinstance(value, str):  # str(x) of a (str, Enum) member is "E.X", not its value
        return str.__str__(value)
    for base in (int, float, bytes):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        items = {
            plain(k, f"{where} key {k!r}"): plain(v, f"{where}[{k!r}]") for k, v in value.items()
        }
        return OrderedDict(items) if isinstance(value, OrderedDict) else items
    if isinstance(value, torch.Size):
        return value
    if isinstance(value, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"checkpoint value {where} is a {type(value).__module__}.{type(value).__qualname__}; "
        "a checkpoint holds only tensors, dicts, lists, tuples, str, int, float, bool and None "
        "(return those from state_dict)"
    )


def save_checkpoint(run_dir: Path, state: dict, *, as_previous: bool = False) -> Path:
    """Write `state` and RNG states to run_dir/checkpoint.pt atomically (never half a file).

    The file is written to a temporary name and fsynced, the current checkpoint becomes
    checkpoint.prev.pt, the new one is renamed into place and the directory is fsynced, so after
    a crash at any point the latest finished round (or the one before it) is intact on disk.

    `as_previous`: `state` is the latest round's again with an entry every file a resume may read
    must carry (a round's pending DP charge): it is written as checkpoint.prev.pt too (a copy of
    its own), instead of keeping the current checkpoint, which lacks the entry, as the fallback.
    """
    path, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS
    payload = plain({**state, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}})
    payload[DIGEST] = digest(payload)
    tmp = _write(run_dir / f"{CHECKPOINT}.tmp", payload)
    if as_previous:
        os.replace(_write(run_dir / f"{PREVIOUS}.tmp", payload), previous)
    elif path.is_file():
        _keep_as(path, previous)
    os.replace(tmp, path)
    fsync_dir(run_dir)
    return path


def digest(value: Any) -> str:
    """SHA-256 of a plain value's content: every tensor's dtype, shape and bytes, every leaf's
    type and repr, containers with their keys in order (what `torch.load` gives back)."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        h.update(f"D{len(value)}".encode())
        for k, v in value.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(value, (list, tuple, torch.Size)):
        h.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for v in value:
            _feed(h, v)
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def _write(tmp: Path, payload: dict) -> Path:
    """`payload` saved to `tmp` (a fresh file, never written through a link planted at the
    name) and fsynced; returns `tmp`."""
    tmp.unlink(missing_ok=True)
    with tmp.open("xb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _keep_as(path: Path, target: Path) -> None:
    """Make `target` a durable copy of `path` without ever removing `path` (hard link or copy)."""
    tmp = target.with_name(f"{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # a file system without hard links: copy and fsync instead
        shutil.copyfile(path, tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, target)


def _read(path: Path) -> dict:
    """One checkpoint file, tensors and plain containers only; CheckpointError saying why not."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # a truncated zip, a bad pickle, a forbidden global: all unreadable
        text = str(err)
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", text):
            reason = (
                f"it refers to {found[1]}, but a checkpoint holds only tensors and plain "
                "containers (refused: loading it could run code)"
            )
        else:
            detail = re.search(r"PytorchStreamReader[^.]*|Unsupported operand \d+", text)
            reason = f"damaged or truncated ({detail[0] if detail else type(err).__name__})"
        raise CheckpointError(f"{path} is not a readable checkpoint: {reason}") from err
    rng = state.get("rng") if isinstance(state, dict) else None
    if not (
        isinstance(rng, dict)
        and isinstance(rng.get("torch"), torch.Tensor)
        and isinstance(rng.get("python"), tuple)
    ):
        raise CheckpointError(f"{path} is not a fedllm checkpoint: no 'rng' states in it")
    written = state.pop(DIGEST, None)  # None: a checkpoint from before stop 44
    if written is not None and written != digest(state):
        raise CheckpointError(
            f"{path} is not a readable checkpoint: damaged (its content does not match the "
            "SHA-256 written with it)"
        )
    return state


def _find(run_dir: Path) -> tuple[dict, Path, str | None] | None:
    """(state, its file, why the latest was skipped or None) of the newest readable checkpoint."""
    latest, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS
    errors: list[str] = []
    for path in (latest, previous):
        if not path.is_file():
            continue
        try:
            state = _read(path)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        return state, path, (errors[0] if errors else None)
    if not errors:
        return None
    raise CheckpointError(
        f"cannot resume the run in {run_dir}: "
        + "; ".join(errors)
        + (f" (and there is no {PREVIOUS} to fall back to)" if len(errors) == 1 else "")
        + "; start the run again with --overwrite, or use a new name="
    )


def read_checkpoint(run_dir: Path) -> tuple[dict, Path] | None:
    """The newest readable checkpoint and its file, without side effects; None if there is none.

    The latest checkpoint if it reads, else the previous copy; CheckpointError (naming the files
    and suggesting --overwrite) if every checkpoint present is unreadable.
    """
    found = _find(run_dir)
    return None if found is None else found[:2]


def load_checkpoint(run_dir: Path) -> dict | None:
    """The last finished round's state, restoring the RNG states; None if there is none.

    An unreadable latest checkpoint falls back to the previous one (with a warning); the bad file
    is moved to checkpoint.corrupt.pt so the next save does not keep it as the fallback.
    """
    found = _find(run_dir)
    if found is None:
        return None
    state, path, skipped = found
    if skipped is not None:
        os.replace(run_dir / CHECKPOINT, run_dir / CORRUPT)
        fsync_dir(run_dir)
        log.warning(
            "%s; moved it to %s and resuming from the previous checkpoint %s (round %s)",
            skipped,
            CORRUPT,
            path,
            state.get("round", "?"),
        )
    elif path.name == PREVIOUS:
        log.warning(
            "no %s in %s; resuming from the previous checkpoint %s (round %s)",
            CHECKPOINT,
            run_dir,
            path,
            state.get("round", "?"),
        )
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state
