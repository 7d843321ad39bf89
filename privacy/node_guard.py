"""A node's own privacy minimums: node-config rules its ClientApp enforces before any training.

A SuperNode started with `require-secagg`, `max-epsilon` or `min-noise` in its node config refuses
a training round whose recipe is weaker than that, whatever the server sends (`plan`: the recipe's
keys; `start`, once the node's shard is loaded: the σ DP-SGD derives for it). Under
`privacy.mode: sample` or `client` the node also keeps its own ε ledger in its `context.state`
(σ, q and steps of every round it trained: DP-SGD's from the recipe and its own shard size;
client-level DP's one Gaussian step at q = 1 with the noise the server sees of its update, as the
server's ledger charges it) and refuses the round that would take it past `max-epsilon`. For
client-level DP `max-epsilon` also bounds the ε the server's ledger would reach over the recipe's
rounds (`planned_client_epsilon`: the server's accounting, not amplification by sampling).
The ledger is also written to the node's own folder (`features.node_state`: its
`personal-dir`, else `<run_dir>/clients/<p>/node_state/`)
and read back by a node with empty state, so a resumed run or a restarted SuperNode goes on
from what it spent; a recipe with another budget keeps it, another recipe starts afresh. Only a
`personal-dir` is out of the server's reach: in a simulation the run directory is the server's.
A refusal reaches the server as the client's error reply and leaves the node out of the round.
Evaluation rounds are not guarded (no training).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from fedllm.aggregators.base import Factors
from fedllm.errors import NodeRefusal
from fedllm.features.base import Feature
from fedllm.features.node_state import restore_node_state, save_node_state
from fedllm.features.registry import register
from fedllm.features.types import ClientPlan, ClientRound
from fedllm.privacy.accounting import PrivacyLedger, epsilon
from fedllm.privacy.plan import (
    client_level_round,
    client_noise_multiplier,
    sample_plan,
    seen_noise_multiplier,
)
from fedllm.recipe.schema import RunConfig

log = logging.getLogger("fedllm.client")  # the node's own log: numbers a refusal withholds
LEDGER_KEY = "fedllm.node-privacy-ledger"  # a ConfigRecord in the node's context.state
NODE = "node"  # the ledger's one key: this node's own data


@dataclass(frozen=True)
class NodeRules:
    """What this node insists on, from its node config (None / False: no rule)."""

    require_secagg: bool = False
    max_epsilon: float | None = None
    min_noise: float | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeRules:
        """The rules of a node config; a malformed value names its key and what is valid."""
        return cls(
            require_secagg=_flag(node_config, "require-secagg"),
            max_epsilon=_positive(node_config, "max-epsilon", example="8.0"),
            min_noise=_positive(node_config, "min-noise", example="0.8"),
        )


def _flag(node_config: Mapping[str, Any], key: str) -> bool:
    raw = node_config.get(key, False)
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    raise ValueError(f"node config {key}={raw!r}: must be true or false")


def _positive(node_config: Mapping[str, Any], key: str, *, example: str) -> float | None:
    raw = node_config.get(key)
    if raw is None:
        return None
    try:
        value = float(raw) if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"node config {key}={raw!r}: must be a number > 0, e.g. {key}={example}")
    return value


def planned_client_epsilon(cfg: RunConfig) -> float:
    """The ε the server's ledger reaches after all the recipe's rounds of client-level DP: the
    bound a node's `max-epsilon` is checked against before it trains (never below the server's)."""
    sigma, q, steps = client_level_round(cfg)
    return epsilon(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps * cfg.federation.rounds,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
    )


def _refuse(rule: str, *, why: str, valid: str) -> NodeRefusal:
    return NodeRefusal(f"this node refuses the run ({rule}): {why}; valid: {valid}")


def check_recipe(cfg: RunConfig, rules: NodeRules) -> None:
    """Refuse a recipe weaker than the node's rules, from its keys alone (no data needed)."""
    p = cfg.privacy
    if rules.require_secagg and not p.secure_aggregation.enabled:
        raise _refuse(
            "node config require-secagg=true",
            why="the recipe has privacy.secure_aggregation.enabled: false, so the server would see "
            "this node's update",
            valid="a recipe with privacy.secure_aggregation.enabled: true",
        )
    known = p.mode in ("sample", "client")
    if rules.max_epsilon is not None:
        cap = rules.max_epsilon
        rule, valid = (
            f"node config max-epsilon={cap:g}",
            f"privacy.mode sample or client, ε ≤ {cap:g}",
        )
        if p.mode == "none":
            raise _refuse(
                rule, why="the recipe has privacy.mode: none (no differential privacy)", valid=valid
            )
        for key in ("target_epsilon", "epsilon_budget"):
            value = getattr(p, key)
            if value is not None and value > cap:
                raise _refuse(rule, why=f"the recipe has privacy.{key}={value:g}", valid=valid)
        # with an epsilon_budget (≤ cap, checked above) the server stops before it is spent
        if p.mode == "client" and p.epsilon_budget is None:
            planned = planned_client_epsilon(cfg)
            if planned > cap:
                why = (
                    f"the recipe's client-level DP plans ε={planned:.3f} over its "
                    f"{cfg.federation.rounds} rounds (δ={p.delta:g}, q = 1, noise multiplier "
                    f"{client_level_round(cfg)[0]:.3f} as the server sees it, "
                    f"noise_at: {p.noise_at})"
                )
                raise _refuse(rule, why=why, valid=valid)
        if not known and p.target_epsilon is None and p.epsilon_budget is None:
            why = f"privacy.mode={p.mode!r} states no privacy.target_epsilon or epsilon_budget"
            raise _refuse(rule, why=why, valid=valid)
    if rules.min_noise is not None:
        floor = rules.min_noise
        rule = f"node config min-noise={floor:g}"
        if p.mode == "none":
            why = "the recipe has privacy.mode: none (no noise)"
            raise _refuse(
                rule, why=why, valid=f"privacy.mode sample or client with noise ≥ {floor:g}"
            )
        if p.mode == "sample" and p.noise_multiplier is not None and p.noise_multiplier < floor:
            why = f"the recipe's DP-SGD privacy.noise_multiplier={p.noise_multiplier:g}"
            raise _refuse(rule, why=why, valid=f"privacy.noise_multiplier ≥ {floor:g}")
        if p.mode == "client" and (seen := seen_noise_multiplier(cfg)) < floor:
            z = client_noise_multiplier(cfg)
            why = (  # the noise of one update as the server sees it: z/√m when clients add it
                f"the recipe's client-level noise multiplier z={z:.3f} gives {seen:.3f} on one "
                f"update as the server sees it (noise_at: {p.noise_at})"
            )
            raise _refuse(
                rule, why=why, valid=f"privacy.client_noise_multiplier (or derived z) ≥ {floor:g}"
            )
        if not known:
            why = f"privacy.mode={p.mode!r} is not a mechanism whose noise this node can check"
            raise _refuse(rule, why=why, valid="privacy.mode sample or client")


def load_ledger(state: RecordDict, cfg: RunConfig) -> tuple[PrivacyLedger, list[int]]:
    """This node's ε ledger from its context state (empty at first), at the recipe's δ and
    accountant, and the rounds it has charged."""
    ledger = PrivacyLedger(delta=cfg.privacy.delta, accountant=cfg.privacy.accountant)
    record = state.config_records.get(LEDGER_KEY)
    if record is None:
        return ledger, []
    history = zip(record["sigma"], record["sample-rate"], record["steps"], strict=True)
    acc = {"history": [(float(s), float(q), int(n)) for s, q, n in history]}
    ledger.load_state_dict(
        {
            "delta": ledger.delta,
            "accountant": ledger.accountant,
            "accountants": {NODE: {**acc, "mechanism": ledger.accountant}},
        }
    )
    return ledger, [int(r) for r in record["rounds"]]


def save_ledger(state: RecordDict, ledger: PrivacyLedger, *, rounds: list[int]) -> None:
    """Write the ledger into the context state as plain config values (Flower keeps it)."""
    history = ledger.state_dict()["accountants"][NODE]["history"]
    state[LEDGER_KEY] = ConfigRecord(
        {
            "sigma": [float(s) for s, _, _ in history],
            "sample-rate": [float(q) for _, q, _ in history],
            "steps": [int(n) for _, _, n in history],
            "rounds": [int(r) for r in rounds],
        }
    )


def _dp_sgd_round(rnd: ClientRound, rules: NodeRules) -> tuple[float, float, int]:
    """(σ, q, steps) of this node's DP-SGD round on its own shard, σ checked against
    `min-noise` (known only once the shard is)."""
    n = len(rnd.shard.train)
    plan = sample_plan(rnd.cfg, n_train=n, partition=rnd.partition)
    sigma = plan.noise_multiplier
    if rules.min_noise is not None and sigma < rules.min_noise:
        log.warning("min-noise: the recipe's DP-SGD σ for %d training examples is %.3f", n, sigma)
        raise _refuse(
            f"node config min-noise={rules.min_noise:g}",
            why="the recipe's DP-SGD σ derived for this node's shard is below it (σ and the "
            "shard's size stay in the node's log: a node refused from round 1 never tells)",
            valid=f"σ ≥ {rules.min_noise:g} (a larger privacy.noise_multiplier or target_epsilon "
            "that derives it)",
        )
    return sigma, plan.sample_rate, plan.steps_per_round


def charge(rnd: ClientRound, rules: NodeRules) -> float:
    """Check the node's ledger against `max-epsilon` with this round's spend (DP-SGD: its σ,
    checked against `min-noise`, q and local steps; client-level DP: `client_level_round`), then
    charge the ledger; a refused round is not charged. Returns the node's ε after the round."""
    cfg = rnd.cfg
    if cfg.privacy.mode == "client":
        sigma, q, steps = client_level_round(cfg)
    else:
        sigma, q, steps = _dp_sgd_round(rnd, rules)
    # a resumed simulation's node (or a restarted SuperNode) has empty state: the ledger it wrote
    restore_node_state(rnd, LEDGER_KEY, uncovered=False, strict=True, newest=True)
    ledger, rounds = load_ledger(rnd.state, cfg)
    after = ledger.epsilon_if({NODE: (sigma, q, steps)})
    if rules.max_epsilon is not None and after > rules.max_epsilon:
        numbers = (
            f"(δ={cfg.privacy.delta:g}; spent {ledger.epsilon(NODE):.3f} over {len(rounds)} "
            "rounds of this run)"
        )
        log.warning("max-epsilon: round %d: ε %.3f %s", rnd.server_round, after, numbers)
        shown = (  # DP-SGD's ε follows q = batch / shard size, which a refusal withholds
            f"to {after:.3f} {numbers}"
            if cfg.privacy.mode == "client"
            else f"past it (δ={cfg.privacy.delta:g}; ε, a function of the shard's size, stays "
            "in the node's log)"
        )
        raise _refuse(
            f"node config max-epsilon={rules.max_epsilon:g}",
            why=f"round {rnd.server_round} would bring this node's own ε {shown}",
            valid=f"no more rounds: this node's ε stays ≤ {rules.max_epsilon:g}",
        )
    ledger.record(NODE, noise_multiplier=sigma, sample_rate=q, steps=steps)
    save_ledger(rnd.state, ledger, rounds=[*rounds, rnd.server_round])
    save_node_state(rnd, LEDGER_KEY, uncovered=False, strict=True)
    return after


@register
class NodeGuard(Feature):
    """The node's own rules (`require-secagg`, `max-epsilon`, `min-noise`) and ε ledger."""

    name = "node_guard"
    order = 0  # before every other feature's hooks

    @classmethod
    def enabled(cls, cfg: RunConfig) -> bool:
        """On for every recipe: a node's rules hold whatever the server's recipe says."""
        return True

    def plan(self, plan: ClientPlan, rnd: ClientRound) -> ClientPlan:
        """Refuse the round before anything else runs when the recipe breaks a node rule."""
        check_recipe(rnd.cfg, NodeRules.from_node_config(rnd.node_config))
        return plan

    def start(self, factors: Mapping[str, Factors], rnd: ClientRound) -> dict[str, Factors]:
        """Before any local step (the shard is known): DP-SGD σ and the node's ε ledger, for
        DP-SGD and client-level DP alike."""
        if rnd.cfg.privacy.mode in ("sample", "client"):
            charge(rnd, NodeRules.from_node_config(rnd.node_config))
        return dict(factors)
