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

A node's other state kept across a resume is in `fedllm.features.node_state`, beside this
client's folder (`client_dir`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, RecordDict
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file

from fedllm.aggregators import Factors, round_spec
from fedllm.constrained.pruned import planned_ranks
from fedllm.features.base import Feature
from fedllm.features.node_state import (
    NODE_KEY,
    client_dir,
    has_node_state,
    restore_node_state,
    save_node_state,
)
from fedllm.features.registry import register
from fedllm.features.types import ClientRound, ClientUpdate
from fedllm.model import wire
from fedllm.model.adapters import PEFT_PREFIX
from fedllm.model.card import make_card, read_card, save_adapter
from fedllm.model.identity import IDENTITY_MEMO, base_identity
from fedllm.model.wire import LOCAL_B

if TYPE_CHECKING:
    from fedllm.recipe.schema import RunConfig

log = logging.getLogger("fedllm.client")

NAME = "personal_adapter"
FOLDER = "personal_adapter"


class PersonalAdapterOptions(BaseModel):
    """`features.personal_adapter`: on (default) or off."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = True


def raw_update(cfg: RunConfig) -> bool:
    """Whether a client's trained adapter is its raw update in this run's privacy setting:
    client-level DP noised by the server, or SecAgg+ without DP-SGD. The server never sees it
    then, so it is not written into the run directory (the server's folder), only into a node's
    own `personal-dir`."""
    p = cfg.privacy
    server_noise = p.mode == "client" and p.noise_at == "server"
    return server_noise or (p.secure_aggregation.enabled and p.mode != "sample")


def personal_adapter_dir(
    cfg: RunConfig, partition: int, *, node_config: Mapping[str, Any] | None = None
) -> Path:
    """Where client `partition` keeps its personal adapter."""
    return client_dir(cfg, partition, node_config=node_config or {}) / FOLDER


def restore_local_B(folder: Path, state: RecordDict, *, fingerprint: str) -> bool:
    """Put the B matrices of the personal adapter in `folder` into `state` (a node's context
    state) if it holds none: a resumed simulation's nodes start with empty state, and under
    `local_B` (fedsa) B would restart from zero. Only an adapter this recipe wrote (its card's
    `fingerprint`): another run's B in a shared personal-dir stays out (audit h90). True if
    restored."""
    weights = folder / "adapter_model.safetensors"
    if LOCAL_B in state or not weights.exists():
        return False
    if (read_card(folder) or {}).get("fingerprint") != fingerprint:
        log.info("%s: written by another recipe; B starts afresh", folder)
        return False
    end = ".lora_B.weight"
    tensors = load_file(str(weights))
    B = {k[len(PEFT_PREFIX) : -len(end)]: t for k, t in tensors.items() if k.endswith(end)}
    state[LOCAL_B] = ArrayRecord({m: t.float().contiguous() for m, t in B.items()})
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
                "raw update, so only nodes started with `fedllm node --personal-dir <folder>` "
                "keep one (never in the run directory; none in a simulation)"
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
        """B from the node state written before this round (a lost round restarts from the
        one before it), else, for a run that kept none, from the personal adapter."""
        if not rnd.spec.local_B or LOCAL_B in rnd.state:
            return
        if restore_node_state(rnd, LOCAL_B, uncovered=raw_update(rnd.cfg)):
            return
        if has_node_state(rnd, LOCAL_B, uncovered=raw_update(rnd.cfg)):
            return  # only a lost attempt's: B starts afresh, as in that round's first attempt
        folder = personal_adapter_dir(rnd.cfg, rnd.partition, node_config=rnd.node_config)
        if restore_local_B(folder, rnd.state, fingerprint=rnd.cfg.fingerprint()):
            log.info("client %d: local B restored from %s", rnd.partition, folder)

    def post_process(self, update: ClientUpdate, rnd: ClientRound) -> ClientUpdate:
        """Write the update as this client's personal adapter; the update is left unchanged."""
        cfg = rnd.cfg
        if raw_update(cfg) and not rnd.node_config.get(NODE_KEY):
            return update  # a raw update stays out of the run directory (see `raw_update`)
        home = client_dir(cfg, rnd.partition, node_config=rnd.node_config)
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
                card=card,
                target_modules=cfg.lora.target_modules,
                dropout=cfg.lora.dropout,
            )
        except OSError as err:
            raise OSError(
                f"client {rnd.partition}: cannot write its personal adapter in {home} ({err}); "
                "give the node a writable folder with `fedllm node --personal-dir <folder>`, "
                f"or turn it off with features.{NAME}.enabled=false"
            ) from err
        if rnd.spec.local_B:  # the B it trains on next, by round (see `_restore_local_B`)
            wire.keep_local_B(rnd.state, update.factors)
            save_node_state(rnd, LOCAL_B, uncovered=raw_update(cfg))
        log.info(
            "client %d round %d: personal adapter in %s", rnd.partition, rnd.server_round, folder
        )
        return update
