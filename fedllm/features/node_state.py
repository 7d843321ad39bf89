"""A node's own feature state kept across a resume: what a feature keeps in `context.state`
between rounds (SDFLoRA's local module, a top-k residual, HetLoRA's pruned rank, the node's ε
ledger), written by the client into `<client folder>/node_state/` after each round and taken
back by a node whose state lacks it (a resumed simulation's nodes are new processes with empty
state; a restarted SuperNode too).

Each save keeps the file it replaces as `<key>.prev.*`, both tagged with their round and the
server process (attempt) that asked for it. A round lost to a server crash is run again after
the resume, and the state a client wrote in the lost attempt must not be its start, neither in
the rerun nor in a later round it is next sampled in: the server sends every round the run's
attempts (`ATTEMPTS`: token and first round of each process, the current one last), and
`restore_node_state` takes the newest file that a finished round wrote: of this attempt before
this round, or of an earlier one before the round its successor started again from (`newest=True`
instead for a privacy ledger, which must count the lost attempt too, and another run's spend).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from fedllm.features.types import ClientRound
from fedllm.recipe.schema import RunConfig

log = logging.getLogger("fedllm.client")

NODE_KEY = "personal-dir"  # a SuperNode's own folder (personal adapters, node state)
CLIENTS = "clients"  # a simulation's clients' folders, in the run directory
NODE_STATE = "node_state"  # the folder, under the client's own folder
SUFFIXES = ("safetensors", "json")  # arrays, a config record
ATTEMPTS = "attempts"  # round-config key: "token:first_round,..." (a scalar: legacy FitIns too)


def encode_attempts(attempts: list[tuple[str, int]]) -> str:
    """The run's attempts as one config string, oldest first."""
    return ",".join(f"{token}:{first}" for token, first in attempts)


def decode_attempts(text: object) -> list[tuple[str, int]]:
    """`encode_attempts`'s output back ([] for none, or for a malformed value)."""
    try:
        pairs = [part.split(":") for part in str(text or "").split(",") if part]
        return [(token, int(first)) for token, first in pairs]
    except ValueError:
        return []


def finished(meta: Mapping[str, Any], rnd: ClientRound) -> bool:
    """Whether a state file's round finished (the server went on from it): written in this
    attempt before this round, or in an earlier attempt before the round the next one started
    from (a later one was lost to a crash). A file of no attempt the server names is another
    run's. A file or a server from before attempts were kept: its round before this one."""
    written, token = int(meta.get("round", 0)), meta.get("attempt")
    attempts = decode_attempts(rnd.config.get(ATTEMPTS))
    if token is None or not attempts:
        return written < rnd.server_round
    tokens = [t for t, _ in attempts]
    if token not in tokens:
        return False
    i = tokens.index(token)
    ends = attempts[i + 1][1] if i + 1 < len(attempts) else rnd.server_round
    return written < ends


def client_dir(cfg: RunConfig, partition: int, *, node_config: Mapping[str, Any]) -> Path:
    """This client's own folder: the node's `personal-dir`, else `<run_dir>/clients/<p>`."""
    if node_config.get(NODE_KEY):
        return Path(str(node_config[NODE_KEY])).expanduser()
    return cfg.run_dir / CLIENTS / str(partition)


def node_state_dir(rnd: ClientRound, *, uncovered: bool) -> Path | None:
    """The folder where this client keeps `context.state` entries across a resume: in its own
    folder (`client_dir`); None where `uncovered` (the entry is outside the run's privacy
    guarantee) and that folder would be the run directory, the server's folder in a simulation:
    then only a node's own personal-dir keeps it, as for a raw update's personal adapter."""
    if uncovered and not rnd.node_config.get(NODE_KEY):
        return None
    return client_dir(rnd.cfg, rnd.partition, node_config=rnd.node_config) / NODE_STATE


def save_node_state(
    rnd: ClientRound, key: str, *, uncovered: bool, strict: bool = False
) -> Path | None:
    """Write `rnd.state[key]` (arrays as `<key>.safetensors`, a config record as `<key>.json`)
    into `node_state_dir`, atomically, with the recipe's fingerprint and the round, keeping the
    file it replaces as `<key>.prev.*`; returns the file, or None where it is not kept. A folder
    it cannot write is a warning, not an error: the node trains on, and only a resume would start
    that state afresh; `strict` (a privacy ledger, which must not start afresh) makes it one."""
    record, folder = rnd.state.get(key), node_state_dir(rnd, uncovered=uncovered)
    if folder is None or not isinstance(record, ArrayRecord | ConfigRecord):
        return None
    meta = {"fingerprint": rnd.cfg.fingerprint(budget=False), "round": str(rnd.server_round)}
    if attempts := decode_attempts(rnd.config.get(ATTEMPTS)):
        meta["attempt"] = attempts[-1][0]
    suffix = SUFFIXES[0] if isinstance(record, ArrayRecord) else SUFFIXES[1]
    path, prev = folder / f"{key}.{suffix}", folder / f"{key}.prev.{suffix}"
    tmp = folder / f"{path.name}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a fresh name no one could have planted a symlink at (audit h90: the fixed `.tmp`
        # path was written through a link another local user made in a shared output_dir)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        tmp = Path(name)
        if isinstance(record, ArrayRecord):
            tensors = {k: t.contiguous() for k, t in record.to_torch_state_dict().items()}
            save_file(tensors, str(tmp), metadata=meta)
        else:
            tmp.write_text(json.dumps({**meta, "state": dict(record)}))
        with tmp.open("rb") as f:  # on disk before the rename, so a crash leaves old or new
            os.fsync(f.fileno())
        if (meta_then := _meta(path)) is not None and finished(meta_then, rnd):
            os.replace(path, prev)  # else a lost round's file: dropped, `prev` kept
        os.replace(tmp, path)  # never half a file, even if the node dies while writing
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if strict:
            raise OSError(
                f"client {rnd.partition}: cannot keep {key} in {folder} ({err}); refusing to "
                "train without it (give the node a writable `fedllm node --personal-dir <folder>`)"
            ) from err
        log.warning(
            "client %d: cannot keep %s in %s (%s); a resumed run would start it afresh (give "
            "the node a writable folder with `fedllm node --personal-dir <folder>`)",
            rnd.partition,
            key,
            folder,
            err,
        )
        return None
    return path


def _files(folder: Path, key: str) -> list[Path]:
    """Where `key` may be kept, newest first: the last save, then the one it replaced."""
    return [folder / f"{key}{tag}.{suffix}" for tag in ("", ".prev") for suffix in SUFFIXES]


def has_node_state(rnd: ClientRound, key: str, *, uncovered: bool) -> bool:
    """Whether this client wrote `key` at all (of any round)."""
    folder = node_state_dir(rnd, uncovered=uncovered)
    return folder is not None and any(path.exists() for path in _files(folder, key))


def _read(path: Path) -> tuple[dict, ArrayRecord | ConfigRecord]:
    """(metadata, record) of a saved state file; raises if it cannot be read."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), ArrayRecord({k: f.get_tensor(k) for k in f.keys()})
    meta = json.loads(path.read_text())
    return meta, ConfigRecord(meta["state"])


def _meta(path: Path) -> dict | None:
    """A saved state file's metadata (round, attempt, fingerprint), or None if none is readable."""
    try:
        if path.suffix == ".safetensors":  # the header alone: the tensors stay on disk
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        else:
            meta = json.loads(path.read_text())
        int(meta["round"])
        return meta
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None


def restore_node_state(
    rnd: ClientRound, key: str, *, uncovered: bool, strict: bool = False, newest: bool = False
) -> bool:
    """Put `rnd.state[key]` back from what this client wrote (`save_node_state`) if its state
    has none (a live node's state wins); True if restored. It takes the newest file of a
    finished round (`finished`; `newest`: the newest file, whatever its round). A file of another
    recipe, or one that cannot be read, is skipped with a warning: the feature starts afresh,
    as without it; with `strict` (a privacy ledger) a file that cannot be read is an error."""
    folder = node_state_dir(rnd, uncovered=uncovered)
    if key in rnd.state or folder is None:
        return False
    for path in _files(folder, key):
        if not path.exists():
            continue
        try:
            meta, record = _read(path)
            written = int(meta.get("round", 0))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            if strict:
                raise ValueError(
                    f"client {rnd.partition}: cannot read {path} ({err}); refusing to train "
                    f"rather than start {key} afresh (restore the file, or remove it to start over)"
                ) from err
            log.warning("client %d: cannot read %s (%s); skipped", rnd.partition, path, err)
            continue
        if meta.get("fingerprint") != rnd.cfg.fingerprint(budget=False):
            log.warning("client %d: %s is another recipe's; skipped", rnd.partition, path)
            continue
        if not newest and not finished(meta, rnd):  # a round lost to a crash, or another run's
            log.info("client %d: %s: its round did not finish; skipped", rnd.partition, path)
            continue
        rnd.state[key] = record
        log.info("client %d: %s restored from %s (round %s)", rnd.partition, key, path, written)
        return True
    return False
