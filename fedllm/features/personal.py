"""Personal adapters: each client keeps its own trained adapter on its own disk, never sent.

After every training round a client writes the adapter it trained (after every other feature's
`post_process`: what it keeps, e.g. fedsa's local B with the A it trained) as a PEFT folder with
a model card, in `<run_dir>/clients/<partition>/personal_adapter/` (simulation, or a one-machine
deployment), or under the SuperNode's `personal-dir` node config key. It is written before the
reply is built and adds nothing to it: the server never sees it.

On by default for aggregators that keep B on the clients (fedsa: the server's global adapter has
B = 0, so the personal adapters are the run's usable models); any other run turns it on with
`features: {personal_adapter: {}}`, and `{enabled: false}` turns the default off. Refused with
pruned bases (an adapter for a pruned base does not fit the full one) and with aggregators that
merge each round into the base (the adapter is relative to a base that exists only on the client
during the round).

A node's own state is kept here too (`save_node_state` / `restore_node_state`): what a feature
keeps in `context.state` across rounds (SDFLoRA's local module, a top-k residual, HetLoRA's pruned
rank), written by the client in `<client folder>/node_state/` after each round and taken back by
a node whose state lacks it (a resumed simulation's nodes are new processes with empty state).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from fedllm.aggregators import Factors, round_spec
from fedllm.constrained.pruned import planned_ranks
from fedllm.features.base import Feature
from fedllm.features.registry import register
from fedllm.features.types import ClientRound, ClientUpdate
from fedllm.model.adapters import PEFT_PREFIX
from fedllm.model.card import make_card, save_adapter
from fedllm.model.identity import IDENTITY_MEMO, base_identity
from fedllm.model.wire import LOCAL_B

if TYPE_CHECKING:
    from fedllm.recipe.schema import RunConfig

log = logging.getLogger("fedllm.client")

NAME = "personal_adapter"
NODE_KEY = "personal-dir"  # a SuperNode's folder for its personal adapters
CLIENTS = "clients"
FOLDER = "personal_adapter"
NODE_STATE = "node_state"  # a node's own feature state, kept across a resume


class PersonalAdapterOptions(BaseModel):
    """`features.personal_adapter`: on (default) or off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True


def client_dir(cfg: RunConfig, partition: int, node_config) -> Path:
    """This client's own folder: the node's `personal-dir`, else `<run_dir>/clients/<p>`."""
    if node_config.get(NODE_KEY):
        return Path(str(node_config[NODE_KEY])).expanduser()
    return cfg.run_dir / CLIENTS / str(partition)


def raw_update(cfg: RunConfig) -> bool:
    """Whether a client's trained adapter is its raw update in this run's privacy setting:
    client-level DP noised by the server, or SecAgg+ without DP-SGD. The server never sees it
    then, so it is not written into the run directory (the server's folder), only into a node's
    own `personal-dir`."""
    p = cfg.privacy
    server_noise = p.mode == "client" and p.noise_at == "server"
    return server_noise or (p.secure_aggregation.enabled and p.mode != "sample")


def personal_adapter_dir(cfg: RunConfig, partition: int, node_config=None) -> Path:
    """Where client `partition` keeps its personal adapter."""
    return client_dir(cfg, partition, node_config or {}) / FOLDER


def restore_local_B(folder: Path, state: RecordDict) -> bool:
    """Put the B matrices of the personal adapter in `folder` into `state` (a node's context
    state) if it holds none: a resumed simulation's nodes start with empty state, and under
    `local_B` (fedsa) B would restart from zero. True if restored."""
    weights = folder / "adapter_model.safetensors"
    if LOCAL_B in state or not weights.exists():
        return False
    end = ".lora_B.weight"
    tensors = load_file(str(weights))
    B = {k[len(PEFT_PREFIX) : -len(end)]: t for k, t in tensors.items() if k.endswith(end)}
    state[LOCAL_B] = ArrayRecord({m: t.float().contiguous() for m, t in B.items()})
    return True


def node_state_dir(rnd: ClientRound, *, uncovered: bool) -> Path | None:
    """The folder where this client keeps `context.state` entries across a resume: in its own
    folder (`client_dir`); None where `uncovered` (the entry is outside the run's privacy
    guarantee) and that folder would be the run directory, the server's folder in a simulation:
    then only a node's own personal-dir keeps it, as for a raw update's personal adapter."""
    if uncovered and not rnd.node_config.get(NODE_KEY):
        return None
    return client_dir(rnd.cfg, rnd.partition, rnd.node_config) / NODE_STATE


def save_node_state(
    rnd: ClientRound, key: str, *, uncovered: bool, strict: bool = False
) -> Path | None:
    """Write `rnd.state[key]` (arrays as `<key>.safetensors`, a config record as `<key>.json`)
    into `node_state_dir`, atomically, with the recipe's fingerprint and the round; returns the
    file, or None where it is not kept. A folder it cannot write is a warning, not an error: the
    node trains on, and only a resume would start that state afresh; `strict` (a privacy
    ledger, which must not start afresh) makes it an error."""
    record, folder = rnd.state.get(key), node_state_dir(rnd, uncovered=uncovered)
    if folder is None or not isinstance(record, ArrayRecord | ConfigRecord):
        return None
    meta = {"fingerprint": rnd.cfg.fingerprint(budget=False), "round": str(rnd.server_round)}
    arrays = isinstance(record, ArrayRecord)
    path = folder / f"{key}.{'safetensors' if arrays else 'json'}"
    tmp = folder / f"{path.name}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if arrays:
            tensors = {k: t.contiguous() for k, t in record.to_torch_state_dict().items()}
            save_file(tensors, str(tmp), metadata=meta)
        else:
            tmp.write_text(json.dumps({**meta, "state": dict(record)}))
        with tmp.open("rb") as f:  # on disk before the rename, so a crash leaves old or new
            os.fsync(f.fileno())
        os.replace(tmp, path)  # never half a file, even if the node dies while writing
    except OSError as err:
        if strict:
            raise OSError(
                f"client {rnd.partition}: cannot keep {key} in {folder} ({err}); refusing to "
                f"train without it (give the SuperNode a writable --node-config {NODE_KEY})"
            ) from err
        log.warning(
            "client %d: cannot keep %s in %s (%s); a resumed run would start it afresh (give "
            "the SuperNode a writable folder with --node-config %s=<folder>)",
            rnd.partition,
            key,
            folder,
            err,
            NODE_KEY,
        )
        return None
    return path


def restore_node_state(
    rnd: ClientRound, key: str, *, uncovered: bool, strict: bool = False
) -> bool:
    """Put `rnd.state[key]` back from what this client wrote (`save_node_state`) if its state
    has none (a live node's state wins); True if restored. A file of another recipe, or one
    that cannot be read, is skipped with a warning: the feature starts afresh, as without it;
    with `strict` (a privacy ledger) a file that cannot be read is an error instead."""
    folder = node_state_dir(rnd, uncovered=uncovered)
    if key in rnd.state or folder is None:
        return False
    arrays, config = folder / f"{key}.safetensors", folder / f"{key}.json"
    path = arrays if arrays.exists() else config
    if not path.exists():
        return False
    try:
        if path == arrays:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                record = ArrayRecord({k: f.get_tensor(k) for k in f.keys()})
        else:
            meta = json.loads(path.read_text())
            record = ConfigRecord(meta["state"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        if strict:
            raise ValueError(
                f"client {rnd.partition}: cannot read {path} ({err}); refusing to train rather "
                f"than start {key} afresh (restore the file, or remove it to start over)"
            ) from err
        log.warning(
            "client %d: cannot read %s (%s); %s starts afresh", rnd.partition, path, err, key
        )
        return False
    if meta.get("fingerprint") != rnd.cfg.fingerprint(budget=False):
        log.warning("client %d: %s is another recipe's; %s starts afresh", rnd.partition, path, key)
        return False
    rnd.state[key] = record
    log.info(
        "client %d: %s restored from %s (round %s)", rnd.partition, key, path, meta.get("round")
    )
    return True


@register
class PersonalAdapter(Feature):
    """Each client saves its trained adapter locally after every round (never in the reply)."""

    name = NAME
    order = 95  # after every feature that changes the update (rank cut, local noise)
    Options = PersonalAdapterOptions

    @classmethod
    def enabled(cls, cfg: RunConfig) -> bool:
        """Named under `features` (unless `enabled: false`), or a local-B aggregator (fedsa)."""
        if NAME in cfg.features:
            return cls.parse_options(cfg).enabled
        return round_spec(cfg.aggregator.name).local_B

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Refuse pruned bases and merge-each-round aggregators; say where a private run's
        adapters go."""
        if not cls.enabled(cfg):
            return
        if raw_update(cfg):
            log.warning(
                "features.personal_adapter: in this privacy setting a client's adapter is its "
                "raw update, so only nodes started with --node-config %s=<folder> keep one "
                "(never in the run directory; none in a simulation)",
                NODE_KEY,
            )
        pruned = [who for who, _, q in planned_ranks(cfg) if q > 0]
        if pruned:
            raise ValueError(
                f"features.personal_adapter: {pruned[0]} trains on a pruned base, and its "
                "adapter would not fit the full base; drop the pruning or personal_adapter"
            )
        if round_spec(cfg.aggregator.name).merge:
            raise ValueError(
                f"features.personal_adapter: aggregator.name={cfg.aggregator.name!r} merges each "
                "round into the base and trains a fresh adapter on top, which means nothing on "
                "the plain base; use an adapter-state aggregator or drop personal_adapter"
            )

    def start(self, factors: Mapping[str, Factors], rnd: ClientRound) -> dict[str, Factors]:
        """Under `local_B` (fedsa), a node whose state is empty (a resumed run's new process)
        takes its B back from the personal adapter it wrote in an earlier round."""
        self._restore_local_B(rnd)
        return dict(factors)

    def personalise(self, factors: Mapping[str, Factors], rnd: ClientRound) -> dict[str, Factors]:
        """The same before an evaluation: a resumed node may evaluate before it trains."""
        self._restore_local_B(rnd)
        return dict(factors)

    @staticmethod
    def _restore_local_B(rnd: ClientRound) -> None:
        if rnd.spec.local_B:
            folder = personal_adapter_dir(rnd.cfg, rnd.partition, rnd.node_config)
            if restore_local_B(folder, rnd.state):
                log.info("client %d: local B restored from %s", rnd.partition, folder)

    def post_process(self, update: ClientUpdate, rnd: ClientRound) -> ClientUpdate:
        """Write the update as this client's personal adapter; the update is left unchanged."""
        cfg = rnd.cfg
        if raw_update(cfg) and not rnd.node_config.get(NODE_KEY):
            return update  # a raw update stays out of the run directory (see `raw_update`)
        home = client_dir(cfg, rnd.partition, rnd.node_config)
        card = make_card(
            cfg,
            base_identity(cfg, memo=home / IDENTITY_MEMO),
            what="personal",
            round=rnd.server_round,
            rank=update.rank,
            partition=rnd.partition,
            note="Trained and kept by this client; never sent to the server. Its metrics are "
            f"the rows of partition {rnd.partition} in the run's metrics.jsonl.",
        )
        try:
            folder = save_adapter(
                home / FOLDER,
                update.factors,
                card,
                target_modules=cfg.lora.target_modules,
                dropout=cfg.lora.dropout,
            )
        except OSError as err:
            raise OSError(
                f"client {rnd.partition}: cannot write its personal adapter in {home} ({err}); "
                f"give the SuperNode a writable folder with --node-config {NODE_KEY}=<folder>, "
                f"or turn it off with features.{NAME}.enabled=false"
            ) from err
        log.info(
            "client %d round %d: personal adapter in %s", rnd.partition, rnd.server_round, folder
        )
        return update
