"""Every recipe check that spans sections, in one place; `RunConfig` runs them at construction.

Field-level rules (types, ranges, unknown keys) are pydantic's, in `fedllm.recipe.schema` and
its section modules (`schema_*`).
"""

from __future__ import annotations

from typing import Any

from fedllm.suggest import did_you_mean

RunConfig = Any  # fedllm.recipe.schema.RunConfig, which imports this module (no cycle back)

# Method names users bring from other toolkits that are not aggregators here: what they are.
NOT_AGGREGATORS = {
    "fedavg": "FedAvg of the LoRA factors is 'fedit'",
    "fedavgm": "FedAvgM is 'fedit' with features.server_momentum (recipes/fedavgm.yaml)",
    "fedprox": "FedProx is a client-side term, features.fedprox.mu, beside any aggregator "
    "(recipes/fedprox.yaml)",
}


class ConfigError(ValueError):
    """A recipe that cannot run, with every problem named by its dotted key."""


def cross_check(cfg: RunConfig) -> None:
    """Raise ValueError naming the keys of the first cross-section problem in `cfg`."""
    n = cfg.data.num_clients
    per_round = cfg.federation.clients_per_round
    if per_round is not None and per_round > n:
        raise ValueError(
            f"federation.clients_per_round ({per_round}) exceeds data.num_clients ({n})"
        )
    tiers = cfg.lora.tiers
    if tiers is not None and sum(t.clients for t in tiers) != n:
        total = sum(t.clients for t in tiers)
        raise ValueError(f"lora.tiers cover {total} clients but data.num_clients is {n}")
    canaries = cfg.data.canaries
    if canaries is not None and any(not 0 <= c < n for c in canaries.clients):
        raise ValueError(
            f"data.canaries.clients {canaries.clients} must be partition ids in [0, {n})"
        )
    if tiers is None and cfg.lora.ranks is None:
        raise ValueError("set lora.ranks or lora.tiers")
    from fedllm.aggregators import available, check_options, round_spec

    if cfg.aggregator.name not in available():
        name = cfg.aggregator.name
        if (known := NOT_AGGREGATORS.get(name.lower())) is not None:
            raise ValueError(f"aggregator.name: {name!r} is not an aggregator: {known}")
        raise ValueError(_unknown("aggregator.name", name, valid=available()))
    check_options(cfg.aggregator.name, cfg.aggregator.options)  # typos fail before any training
    _check_best_by(cfg, local_B=round_spec(cfg.aggregator.name).local_B)
    if round_spec(cfg.aggregator.name).merge and cfg.model.quantization != "none":
        raise ValueError(
            f"aggregator.name: {cfg.aggregator.name!r} merges each round's aggregate into the "
            f"base weights, which needs model.quantization: none "
            f"(got {cfg.model.quantization!r})"
        )


HELD_OUT = ("held_out_loss", "held_out_vote")  # best_by metrics from the clients' evaluations


def _check_best_by(cfg: RunConfig, *, local_B: bool) -> None:
    """`output.best_by` names a metric the run measures, of an adapter the server holds."""
    best_by = cfg.output.best_by
    if best_by == "test_loss" and cfg.data.test_set is None:
        raise ValueError(
            "output.best_by: test_loss needs data.test_set (the server's own test set); set it, "
            "or use output.best_by: held_out_loss (the clients' held-out splits), auto or none"
        )
    if best_by in HELD_OUT and cfg.federation.evaluate_clients == "none":
        raise ValueError(
            f"output.best_by: {best_by} needs clients that evaluate, but "
            "federation.evaluate_clients is none; use output.best_by: test_loss, auto or none"
        )
    if best_by == "held_out_vote" and cfg.federation.evaluate_clients != "all":
        raise ValueError(
            "output.best_by: held_out_vote compares each client's losses across rounds, so "
            "every client must evaluate every round; set federation.evaluate_clients: all (it "
            f"is {cfg.federation.evaluate_clients!r})"
        )
    if best_by == "held_out_vote" and (panel := cfg.data.num_clients) < 3:
        raise ValueError(
            f"output.best_by: held_out_vote needs at least 3 evaluating clients (of {panel}, "
            "one liar is half the vote); raise data.num_clients or federation.evaluate_clients, "
            "or use test_loss (the server's own test set)"
        )
    if best_by == "held_out_vote" and cfg.privacy.private:
        raise ValueError(
            "output.best_by: held_out_vote compares each client's losses across rounds, which a "
            "private run keeps out of its files (metrics.jsonl); use test_loss (the server's own "
            "test set) or held_out_loss"
        )
    if best_by in (*HELD_OUT, "test_loss") and local_B:
        raise ValueError(
            f"output.best_by: {best_by} under aggregator.name: {cfg.aggregator.name}, whose "
            "server holds A only (each B stays on its client): its global adapter of any round "
            "is the base model; use output.best_by: none (or auto)"
        )


def _unknown(key: str, value: str, *, valid: list[str]) -> str:
    hint = did_you_mean(value, valid)
    return f"{key}: unknown value {value!r}{hint}; valid: {', '.join(sorted(valid))}"
