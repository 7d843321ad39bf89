"""The feature interface: one optional capability = one class with client and server hooks.

The ClientApp and the server's round loop call every active feature's hooks in `order`, and know
no feature by name. Every hook has a no-op default, so a feature overrides only what it changes.
A feature is enabled by its recipe keys (`enabled`), checks them (`check`), and is built once per
round on a client (hooks may keep per-round values on `self`) and once per run on the server
(`state_dict` is saved with each checkpoint).

Client hooks, in the order one training round calls them:
    plan → read_global → fold → prepare_base → start → regularizers / train → stage (before
    each stage of plain steps) → post_process → reply
    (+ `metrics`)
Server hooks: on_server (once, when the run is built) → before_round (may stop the run) →
assign, then download (per node) → encode → decode → receive (per reply) → accepted → release
(the accepted inputs) → after_aggregate → record; `run_round` lets one feature run a round's
whole training exchange itself (SecAgg+).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from flwr.app import ArrayRecord, RecordDict
from pydantic import BaseModel

from fedllm.aggregators.base import Factors
from fedllm.aggregators.registry import round_spec
from fedllm.features.types import (
    ClientPlan,
    ClientRound,
    ClientUpdate,
    Download,
    RoundResult,
    TrainReply,
)

if TYPE_CHECKING:
    from fedllm.client.train import TrainResult
    from fedllm.recipe.schema import RunConfig

Regularizer = Callable[[], torch.Tensor]
ReplyMetrics = Mapping[str, type | tuple[type, float]]  # key -> int/float, or (type, minimum)


class Feature:
    """An optional capability of a run; subclass, set `name`, override the hooks it needs."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 50  # lower runs first in every hook chain
    # the keys of the recipe section `features.<name>` (None: the feature has its own section)
    Options: ClassVar[type[BaseModel] | None] = None
    # the checkpoint key of `state_dict` (default: `name`); the DP mechanisms share "privacy"
    state_key: ClassVar[str] = ""
    # a DP mechanism: the `privacy.mode` value that turns it on (None: not a DP mechanism)
    privacy_mode: ClassVar[str | None] = None
    # False: the server screens each update against fixed bounds only, never relative to the
    # others (so one client's presence cannot get another's update rejected)
    screen_relative: ClassVar[bool] = True
    # True: the clients train an adapter of this feature's own shape (parallel modules, nested
    # prefixes, a local part); features that reshape the adapter themselves refuse it
    own_adapter_shape: ClassVar[bool] = False
    # True: `train` returns its own result (DP-SGD), so the plain local steps never run, nor any
    # feature's `regularizers` or `stage`; the registry refuses a recipe that combines them
    replaces_trainer: ClassVar[bool] = False
    # the scalar metrics its client `metrics()` sends that the server checks and writes into the
    # client's row of metrics.jsonl: reply key -> int or float, or (type, minimum); a reply with
    # a value that is not a finite number of that type (>= minimum) is rejected. Keys it sends
    # but does not declare here reach no file (a client's reply is not trusted).
    reply_metrics: ClassVar[ReplyMetrics] = {}
    # the same for its client `evaluated()` metrics in an evaluation reply: per-token values over
    # the client's held-out tokens (like `held-out-loss`), written into the client's eval row;
    # the server row gets their token-weighted mean
    eval_metrics: ClassVar[ReplyMetrics] = {}

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.options = self.parse_options(cfg)

    # -- recipe -----------------------------------------------------------------------------
    @classmethod
    def enabled(cls, cfg: RunConfig) -> bool:
        """Whether the recipe turns this feature on: its `privacy.mode`, or its name under
        `features`."""
        if cls.privacy_mode is not None:
            return cfg.privacy.mode == cls.privacy_mode
        return cls.Options is not None and cls.name in cfg.features

    @classmethod
    def parse_options(cls, cfg: RunConfig) -> BaseModel | None:
        """This feature's validated `features.<name>` section (None without an Options model)."""
        if cls.Options is None:
            return None
        return cls.Options.model_validate(cfg.features.get(cls.name) or {})

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Raise ValueError naming the recipe key when this feature cannot run with `cfg`."""

    @classmethod
    def adds_to_steps(cls, cfg: RunConfig) -> bool:
        """Whether, under `cfg`, this feature adds to the plain local steps (a loss term, stages),
        which a feature that `replaces_trainer` would never run; default: it overrides
        `regularizers` or `stage`. Override when a recipe can switch those off."""
        return cls.regularizers is not Feature.regularizers or cls.stage is not Feature.stage

    @classmethod
    def prepare(cls, cfg: RunConfig, *, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Checks that need the base model or the data, before any training (`fedllm prepare`)."""

    # -- client: the message ------------------------------------------------------------------
    # a Flower mod for every train message (None: none); it must pass other messages through
    client_mod: ClassVar[Callable[..., Any] | None] = None

    @classmethod
    def wrap_train(
        cls,
        cfg: RunConfig,
        content: RecordDict,
        *,
        context: Any,
        train: Callable[..., RecordDict],
    ) -> RecordDict | None:
        """Handle a train message in this feature's own form (calling
        `train(cfg, content, context=context)` inside), or None."""
        return None

    # -- client -----------------------------------------------------------------------------
    def plan(self, plan: ClientPlan, rnd: ClientRound) -> ClientPlan:
        """Change what this client runs this round (rank, pruning ratio, quantization, the
        lora_alpha its adapter trains at)."""
        return plan

    def read_global(self, record: ArrayRecord, rnd: ClientRound) -> dict[str, Factors] | None:
        """Decode the global factors the server sent (None: not this feature's encoding)."""
        return None

    def fold(self, factors: Mapping[str, Factors], rnd: ClientRound) -> dict[str, Factors]:
        """A delta added to the frozen base for this round and restored after it (Fed-PLoRA folds
        the global modules it does not train); `factors` are the global factors received."""
        return {}

    def prepare_base(self, base: torch.nn.Module, rnd: ClientRound) -> torch.nn.Module:
        """The frozen base this client trains on (e.g. pruned); `rnd.shard` holds its data."""
        return base

    def start(self, factors: Mapping[str, Factors], rnd: ClientRound) -> dict[str, Factors]:
        """The received global factors as this client's base needs them (before the rank cut)."""
        return dict(factors)

    def sent_start(self) -> bool:
        """True: the server reads this feature's reply as a change from the factors it sent (a
        top-k delta, client-level DP's clipped change), so the client must start from exactly
        those: no dead component is revived (`fedllm.client.round.revive`)."""
        return False

    def personalise(self, factors: Mapping[str, Factors], rnd: ClientRound) -> dict[str, Factors]:
        """The adapter this client evaluates on its own held-out split, from the global factors
        received (default: those; SDFLoRA adds the private local module it keeps)."""
        return dict(factors)

    def eval_precision(self, quantization: str | None, rnd: ClientRound) -> str | None:
        """The base precision ('4bit', '8bit', None: full) this client evaluates on (default: as
        given, the recipe's; a device tier's own: a small device never loads a bigger base)."""
        return quantization

    def evaluated(self, factors: Mapping[str, Factors], rnd: ClientRound) -> dict[str, float]:
        """After this client scored `factors` (as personalised) on its held-out split, with
        `rnd.tokenizer` and `rnd.shard` set: metrics for the evaluation reply (`eval_metrics`)."""
        return {}

    def regularizers(self, model: torch.nn.Module, rnd: ClientRound) -> list[Regularizer]:
        """Terms added to every local step's loss (differentiable scalars of the live adapter)."""
        return []

    def train(self, model: torch.nn.Module, rnd: ClientRound, *, steps: int) -> TrainResult | None:
        """Run the local steps in this feature's own way (e.g. DP-SGD: set `replaces_trainer`),
        or None for plain steps."""
        return None

    def stage(self, model: torch.nn.Module, rnd: ClientRound, *, done: int, steps: int) -> int:
        """Before plain local steps resume at step `done` of `steps`: change the live adapter if
        this feature does (squeeze_intune cuts its rank) and return how many steps may run before
        it is asked again (default: all that are left). Each stage starts a fresh optimizer at the
        same schedule position and data order; regularizers are built once, before the first."""
        return steps - done

    def post_process(self, update: ClientUpdate, rnd: ClientRound) -> ClientUpdate:
        """The trained update before it is encoded (clip and noise, cut the rank, ...)."""
        return update

    def reply(
        self, arrays: dict[str, ArrayRecord], update: ClientUpdate, *, rnd: ClientRound
    ) -> dict[str, ArrayRecord]:
        """The arrays this client sends (re-encode `update`, add a map, ...)."""
        return arrays

    def metrics(self) -> dict[str, int | float]:
        """Per-round metrics this feature adds to the client's reply."""
        return {}

    def reply_keys(self) -> frozenset[str] | None:
        """The reply metrics its guarantee lets leave the client (None: no limit). With any such
        feature active a run is private: the server keeps no per-client results on disk."""
        return None

    # -- server -----------------------------------------------------------------------------
    def on_server(self, *, cache: Any) -> None:
        """Once, when the server's run is built: its `fedllm.data.shards.ProcessCache` (the base
        model and data it already holds), for a feature that scores adapters on the server."""

    def before_round(
        self, server_round: int, *, partitions: Sequence[int], sampled: int
    ) -> str | None:
        """Why round `server_round` must not run, or None; `partitions` may train in it (nodes
        not seen yet may hold any partition not seen yet), `sampled` nodes will be asked."""
        return None

    def lost_round(self, server_round: int, *, partitions: Sequence[int], sampled: int) -> None:
        """Account for a round that began (clients were asked to train) but never ended: the
        server crashed before its checkpoint; called on --resume."""

    def run_round(self, server_round: int, *, strategy: Any, grid: Any) -> RoundResult | None:
        """Run the round's whole training exchange instead of the plain one, or None."""
        return None

    def assign(self, node: int, down: Download) -> Download:
        """Decide what `node` runs this round (its rank, `pruning` and other config entries):
        every feature's `assign` runs before any feature's `download`, so the features that
        shape a download (a pruned base's kept ids, a rank cut) see the final plan (the bandit)."""
        return down

    def download(self, node: int, down: Download) -> Download:
        """What `node` is sent this round (its rank, factors, extra config entries)."""
        return down

    def encode(self, node: int, factors: Mapping[str, Factors]) -> ArrayRecord | None:
        """The record `node` is sent, in this feature's encoding (None: the plain one)."""
        return None

    def decode(self, node: int, content: RecordDict, *, rank: int) -> dict[str, Factors] | None:
        """A reply's factors in this feature's encoding (None: the plain one)."""
        return None

    def receive(
        self,
        node: int,
        content: RecordDict,
        *,
        factors: dict[str, Factors],
        reply: TrainReply,
        shapes: Mapping[str, tuple[int, int]],
    ) -> dict[str, Factors]:
        """A reply's factors at the global shapes, for screening; raise ValueError to reject.
        Check here any `reply.extra` metric a later hook reads (`types.extra_number`): `receive`
        runs inside the round's per-reply error handling, `accepted` and `record` do not."""
        return factors

    def accepted(self, node: int, reply: TrainReply) -> None:
        """Learn from a reply that passed screening."""

    def release(
        self,
        nodes: Sequence[int],
        inputs: list[dict[str, Factors]],
        *,
        weights: list[float],
        global_: Mapping[str, Factors],
    ) -> tuple[list[dict[str, Factors]], list[float]]:
        """The aggregator's inputs and weights from the accepted updates (e.g. clipped + noised)."""
        return inputs, weights

    def after_aggregate(
        self,
        old: Mapping[str, Factors],
        new: dict[str, Factors],
        *,
        server_round: int,
    ) -> dict[str, Factors]:
        """The new global factors after aggregation (e.g. with server momentum)."""
        return new

    def record(self, result: RoundResult, *, server_row: dict[str, Any]) -> None:
        """Account for a finished round; may add keys to its rows and `server_row`."""

    def progress(self) -> str:
        """A short addition to the round's progress line ('' for none)."""
        return ""

    def state_dict(self) -> dict[str, Any]:
        """What this feature must keep across a resume (saved with each checkpoint)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore `state_dict`'s output (None: the checkpoint has none for this feature)."""

    def renumber(self, ids: Mapping[int, int]) -> None:
        """Move what is kept per node from an old id to the new one of the node that now holds
        its partition (`ids`: old -> new; a resumed simulation's nodes get new ids)."""


def require_adapter_state(cfg: RunConfig, what: str) -> None:
    """Refuse `what` (a feature's recipe keys) with an aggregator whose clients do not start from
    the global factors (a merged delta, or B kept on the clients)."""
    spec = round_spec(cfg.aggregator.name)
    if spec.merge or spec.local_B:
        raise ValueError(
            f"{what} needs clients that start from the global factors; aggregator "
            f"{cfg.aggregator.name!r} merges a delta into the base or keeps B locally, so use an "
            "adapter-state aggregator (svd, squeeze, fedit, hetlora, lorafair, ffa, ...) "
            "or drop the pruning/compression"
        )


def allowed_metrics(metrics: Mapping[str, Any], features: Sequence[Feature]) -> dict[str, Any]:
    """The metrics every active feature's guarantee lets leave a client (all without one): what
    a client sends, and all the server reads of a reply (h107: the server read whatever came,
    and kept an outdated or non-conforming client's training loss in a private run's rows)."""
    limits = [keys for f in features if (keys := f.reply_keys()) is not None]
    return {k: v for k, v in metrics.items() if all(k in keys for keys in limits)}
