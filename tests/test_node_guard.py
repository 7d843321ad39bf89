"""A node's own privacy minimums (node config) and its own ε ledger, enforced before training."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedllm.aggregators import Factors, RoundSpec
from fedllm.features import registry
from fedllm.features.types import ClientPlan, ClientRound, RoundResult
from fedllm.privacy import node_guard
from fedllm.privacy.accounting import epsilon
from fedllm.privacy.client_level import ClientLevel
from fedllm.privacy.node_guard import LEDGER_KEY, NodeGuard, NodeRules, load_ledger
from fedllm.privacy.plan import sample_plan
from fedllm.recipe import build_config

DP_SGD = {"mode": "sample", "noise_multiplier": 1.0, "delta": 1e-5}
SECAGG = {"secure_aggregation": {"enabled": True}}
CLIENT_DP = {"aggregator": {"name": "svd", "weighting": "uniform"}}


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe's relative output_dir (where a node writes its ledger) under tmp_path."""
    monkeypatch.chdir(tmp_path)


def recipe(privacy: dict | None = None, **sections):
    return build_config({"federation": {"local_steps": 5}, "privacy": privacy or {}, **sections})


def client_round(cfg, node: dict, *, state: RecordDict | None = None, rnd: int = 1, n: int = 100):
    """A hand-built round of partition 0 on a node whose shard holds `n` training examples."""
    plan = ClientPlan(0, 4)
    state = RecordDict() if state is None else state
    return ClientRound(
        cfg,
        0,
        rnd,
        RoundSpec(),
        ConfigRecord({"server-round": rnd}),
        {"partition-id": 0, **node},
        state,
        0,
        plan,
        shard=SimpleNamespace(train=[{}] * n),
    )


def guard_round(cfg, node: dict, **kw) -> ClientRound:
    """Run the guard's hooks as the ClientApp does before local steps (plan, then start)."""
    rnd = client_round(cfg, node, **kw)
    guard = NodeGuard(cfg)
    rnd.plan = guard.plan(rnd.plan, rnd)
    guard.start({}, rnd)
    return rnd


def test_the_guard_is_on_for_every_recipe_and_runs_first() -> None:
    for cfg in (recipe(), recipe(DP_SGD), recipe(SECAGG, aggregator={"name": "ffa"})):
        assert NodeGuard.enabled(cfg)
        assert registry.active(cfg)[0] is NodeGuard
    guard_round(recipe(), {})  # a node without rules accepts anything


def test_require_secagg_refuses_a_recipe_without_it() -> None:
    node = {"require-secagg": True}
    with pytest.raises(ValueError, match=r"require-secagg=true.*secure_aggregation\.enabled"):
        guard_round(recipe(DP_SGD), node)
    guard_round(recipe(SECAGG, aggregator={"name": "ffa"}), node)
    guard_round(recipe(), {"require-secagg": False})


def test_max_epsilon_refuses_no_dp_and_a_larger_target_or_budget() -> None:
    node = {"max-epsilon": 4.0}
    with pytest.raises(ValueError, match=r"max-epsilon=4.*privacy\.mode: none.*ε ≤ 4"):
        guard_round(recipe(), node)
    too_far = {"mode": "sample", "target_epsilon": 8.0}
    with pytest.raises(ValueError, match=r"max-epsilon=4.*privacy\.target_epsilon=8"):
        guard_round(recipe(too_far), node)
    with pytest.raises(ValueError, match=r"max-epsilon=4.*privacy\.epsilon_budget=6"):
        guard_round(recipe({**DP_SGD, "epsilon_budget": 6.0}), node)
    # client-level DP with a given z: the ε its rounds plan
    z = {"mode": "client", "client_noise_multiplier": 0.5}
    with pytest.raises(ValueError, match=r"max-epsilon=4.*client-level DP plans ε="):
        guard_round(recipe(z, **CLIENT_DP), node)
    guard_round(recipe({"mode": "client", "target_epsilon": 3.0}, **CLIENT_DP), node)


def test_min_noise_refuses_a_smaller_sigma_or_z() -> None:
    node = {"min-noise": 1.5}
    with pytest.raises(ValueError, match=r"min-noise=1\.5.*privacy\.mode: none"):
        guard_round(recipe(), node)
    with pytest.raises(ValueError, match=r"min-noise=1\.5.*noise_multiplier=1\b.*≥ 1\.5"):
        guard_round(recipe(DP_SGD), node)
    z = {"mode": "client", "client_noise_multiplier": 1.0}
    with pytest.raises(ValueError, match=r"min-noise=1\.5.*z=1\.000"):
        guard_round(recipe(z, **CLIENT_DP), node)
    guard_round(recipe({**DP_SGD, "noise_multiplier": 2.0}), node)
    # each of m = 4 clients adds z/√m of the noise: the server sees 2/√4 = 1 on one update
    shared = {"mode": "client", "client_noise_multiplier": 2.0, "noise_at": "client"}
    with pytest.raises(ValueError, match=r"min-noise=1\.5.*z=2\.000 gives 1\.000 on one update"):
        guard_round(recipe(shared, **CLIENT_DP), node)
    guard_round(recipe({**shared, "noise_at": "server"}, **CLIENT_DP), node)


def test_min_noise_checks_the_sigma_derived_for_this_nodes_shard(caplog) -> None:
    """σ follows the shard's size: the refusal (which reaches the server, even from a private
    run) names neither; the node's own log has both."""
    cfg = recipe({"mode": "sample", "target_epsilon": 8.0})
    rnd = client_round(cfg, {"min-noise": 5.0})
    guard = NodeGuard(cfg)
    guard.plan(rnd.plan, rnd)  # σ is not in the recipe: known only once the shard is
    with caplog.at_level("WARNING", logger="fedllm.client"):
        with pytest.raises(ValueError, match=r"min-noise=5.*σ derived for this node's shard") as e:
            guard.start({}, rnd)
    sigma = sample_plan(cfg, n_train=100, partition=0).noise_multiplier
    assert "100" not in str(e.value) and f"{sigma:.3f}" not in str(e.value)
    assert f"100 training examples is {sigma:.3f}" in caplog.text
    assert LEDGER_KEY not in rnd.state  # refused rounds are not charged


def test_malformed_rules_name_the_key_and_what_is_valid() -> None:
    with pytest.raises(ValueError, match=r"require-secagg='yes'.*true or false"):
        NodeRules.from_node_config({"require-secagg": "yes"})
    with pytest.raises(ValueError, match=r"max-epsilon=-1.*number > 0.*max-epsilon=8\.0"):
        NodeRules.from_node_config({"max-epsilon": -1})
    with pytest.raises(ValueError, match=r"min-noise='lots'.*number > 0"):
        NodeRules.from_node_config({"min-noise": "lots"})
    rules = NodeRules.from_node_config({"require-secagg": "true", "max-epsilon": 8, "min-noise": 1})
    assert rules == NodeRules(True, 8.0, 1.0)


def test_the_ledger_grows_each_round_and_refuses_the_round_past_max_epsilon(caplog) -> None:
    """DP-SGD's ε follows q = batch / shard size: the refusal names no ε, the node's log does."""
    cfg = recipe(DP_SGD)  # σ = 1, q = 8/100, 5 local steps a round
    per_round = epsilon(noise_multiplier=1.0, sample_rate=0.08, steps=5, delta=1e-5)
    three = epsilon(noise_multiplier=1.0, sample_rate=0.08, steps=15, delta=1e-5)
    four = epsilon(noise_multiplier=1.0, sample_rate=0.08, steps=20, delta=1e-5)
    node, state = {"max-epsilon": (three + four) / 2}, RecordDict()
    spent = []
    for rnd in (1, 2, 3):
        guard_round(cfg, node, state=state, rnd=rnd)
        ledger, rounds = load_ledger(state, cfg)
        spent.append(ledger.epsilon())
        assert rounds == list(range(1, rnd + 1)) and ledger.steps("node") == 5 * rnd
    assert spent[0] == pytest.approx(per_round) and spent[2] == pytest.approx(three)
    assert spent[0] < spent[1] < spent[2]
    with caplog.at_level("WARNING", logger="fedllm.client"):
        with pytest.raises(ValueError, match=r"max-epsilon=.*round 4 would bring this node's") as e:
            guard_round(cfg, node, state=state, rnd=4)
    assert f"{four:.3f}" not in str(e.value) and f"{three:.3f}" not in str(e.value)
    assert f"ε {four:.3f} (δ=1e-05; spent {three:.3f} over 3 rounds" in caplog.text
    assert load_ledger(state, cfg)[1] == [1, 2, 3]  # the refused round is not charged
    # the ledger is plain config values in the node's context state
    record = state.config_records[LEDGER_KEY]
    assert isinstance(record, ConfigRecord) and record["steps"] == [15]
    assert record["rounds"] == [1, 2, 3] and record["sigma"] == [1.0]


def test_a_node_with_empty_state_goes_on_from_the_ledger_it_wrote(tmp_path: Path) -> None:
    """A resumed simulation's node (or a restarted SuperNode) starts with empty context state:
    the ledger comes back from the node's own folder, so max-epsilon still holds across the
    restart; a recipe with another budget keeps it, another recipe starts afresh."""
    cfg = recipe(DP_SGD)
    three = epsilon(noise_multiplier=1.0, sample_rate=0.08, steps=15, delta=1e-5)
    four = epsilon(noise_multiplier=1.0, sample_rate=0.08, steps=20, delta=1e-5)
    node = {"max-epsilon": (three + four) / 2}
    before = RecordDict()
    for rnd in (1, 2, 3):
        guard_round(cfg, node, state=before, rnd=rnd)
    assert (cfg.run_dir / "clients" / "0" / "node_state" / f"{LEDGER_KEY}.json").is_file()
    restarted = RecordDict()
    with pytest.raises(ValueError, match=r"round 4 would bring this node's own ε"):
        guard_round(cfg, node, state=restarted, rnd=4)
    assert load_ledger(restarted, cfg)[1] == [1, 2, 3]
    budget = recipe({**DP_SGD, "epsilon_budget": 50.0})  # the same run, a new budget
    kept = RecordDict()
    guard_round(budget, {}, state=kept, rnd=4)
    assert load_ledger(kept, budget)[1] == [1, 2, 3, 4]
    other = recipe({**DP_SGD, "noise_multiplier": 2.0})
    fresh = RecordDict()
    guard_round(other, node, state=fresh, rnd=4)
    assert load_ledger(fresh, other)[1] == [4]
    own = {**node, "personal-dir": str(tmp_path / "org0")}  # a SuperNode's own folder
    guard_round(cfg, own, state=RecordDict(), rnd=1)
    written = tmp_path / "org0" / "node_state" / f"{LEDGER_KEY}.json"
    assert written.is_file()
    written.write_text('{"fingerprint": "')  # torn or tampered: the ledger fails closed
    with pytest.raises(ValueError, match=r"cannot read .* refusing to train"):
        guard_round(cfg, own, state=RecordDict(), rnd=2)


def test_every_dp_sgd_round_is_charged_even_without_rules() -> None:
    cfg, state = recipe(DP_SGD), RecordDict()
    guard_round(cfg, {}, state=state, rnd=1)
    guard_round(cfg, {}, state=state, rnd=2)
    assert load_ledger(state, cfg)[1] == [1, 2]
    plain = RecordDict()
    guard_round(recipe(), {}, state=plain)
    assert LEDGER_KEY not in plain


def test_the_client_app_refuses_before_loading_anything(monkeypatch) -> None:
    from fedllm.client import app, round

    def must_not_load(*args, **kwargs):
        raise AssertionError("the base model or the data was loaded for a refused round")

    # training loads both in fedllm.client.round, evaluation in app: every place is watched
    for module in (app, round):
        monkeypatch.setattr(module, "cached_base_at", must_not_load)
        monkeypatch.setattr(module, "node_shard", must_not_load)
    content = RecordDict({"config": ConfigRecord({"server-round": 1}), "global": ArrayRecord()})
    context = Context(0, 0, {"partition-id": 0, "require-secagg": True}, RecordDict(), {})
    with pytest.raises(ValueError, match="require-secagg=true"):
        app.train_content(recipe(DP_SGD), content, context=context)


def audit_recipe(noise_at: str, *, rounds: int = 10):
    """The audit's example: N = 10 clients, m = 5 a round, z = 2, δ = 1e-3."""
    return recipe(
        {"mode": "client", "client_noise_multiplier": 2.0, "delta": 1e-3, "noise_at": noise_at},
        federation={"local_steps": 5, "rounds": rounds, "clients_per_round": 5},
        data={"num_clients": 10},
        **CLIENT_DP,
    )


def server_ledger_epsilon(cfg) -> float:
    """ε in the server's own ledger after every round of the recipe, each releasing m updates,
    through the server's client-level DP hooks (before_round, release, record)."""
    server, m = ClientLevel(cfg), cfg.federation.clients_per_round
    start = {"q": Factors(torch.zeros(3, 2), torch.zeros(2, 2), 1.0)}
    update = {"q": Factors(torch.ones(3, 2), torch.ones(2, 2), 1.0)}
    row: dict = {}
    for rnd in range(1, cfg.federation.rounds + 1):
        assert server.before_round(rnd, partitions=list(range(m)), sampled=m) is None
        server.release(list(range(m)), [update] * m, weights=[1.0] * m, global_=start)
        server.record(RoundResult(sampled=m, rows=[]), server_row=row)
    return row["epsilon"]


@pytest.mark.parametrize(("noise_at", "audited"), [("client", 18.02), ("server", 6.24)])
def test_client_level_max_epsilon_uses_the_servers_own_accounting(
    noise_at: str, audited: float
) -> None:
    """Not z at q = m/N (ε ≈ 3.11 here, below the node's 4): the server charges each round at
    q = 1 with the noise it sees of one update, z/√m under noise_at: client."""
    cfg = audit_recipe(noise_at)
    spent = server_ledger_epsilon(cfg)
    assert spent == pytest.approx(audited, abs=0.01)  # the audit's independent numbers
    state = RecordDict()
    with pytest.raises(ValueError, match=rf"max-epsilon=4.*client-level DP plans ε={spent:.3f}"):
        guard_round(cfg, {"max-epsilon": 4.0}, state=state)
    assert LEDGER_KEY not in state  # refused before training: nothing charged
    assert node_guard.planned_client_epsilon(cfg) == pytest.approx(spent, rel=1e-9)
    guard_round(cfg, {"max-epsilon": spent + 0.01})  # a cap the whole run fits in


@pytest.mark.parametrize("noise_at", ["client", "server"])
def test_client_level_rounds_are_charged_and_stop_at_max_epsilon(noise_at: str) -> None:
    """The node charges each round it trains (one step at q = 1, the z the server sees), so a
    server that runs on past the recipe's rounds is refused the round past max-epsilon; the
    refused round is not charged, in the node's state or in the file a restart reads."""
    cfg = audit_recipe(noise_at, rounds=3)
    seen = 2.0 / 5**0.5 if noise_at == "client" else 2.0  # z/√m, or z at the server

    def spent_after(rounds: int) -> float:
        return epsilon(noise_multiplier=seen, sample_rate=1.0, steps=rounds, delta=1e-3)

    node, state = {"max-epsilon": (spent_after(3) + spent_after(4)) / 2}, RecordDict()
    for rnd in (1, 2, 3):
        guard_round(cfg, node, state=state, rnd=rnd)
        ledger, rounds = load_ledger(state, cfg)
        assert rounds == list(range(1, rnd + 1)) and ledger.steps("node") == rnd
        assert ledger.epsilon() == pytest.approx(spent_after(rnd))
    with pytest.raises(ValueError, match=r"round 4 would bring this node's own ε to (\S+) ") as e:
        guard_round(cfg, node, state=state, rnd=4)  # client-level ε names no data: shown
    assert float(e.value.args[0].split(" ε to ")[1].split()[0]) == pytest.approx(
        spent_after(4), abs=1e-3
    )
    record = state.config_records[LEDGER_KEY]
    assert record["rounds"] == [1, 2, 3] and record["steps"] == [3]
    assert record["sigma"] == [pytest.approx(seen)] and record["sample-rate"] == [1.0]
    restarted = RecordDict()  # the ledger the node wrote: round 4 stays refused
    with pytest.raises(ValueError, match=r"round 4 would bring this node's own ε"):
        guard_round(cfg, node, state=restarted, rnd=4)
    assert load_ledger(restarted, cfg)[1] == [1, 2, 3]
    unruled = RecordDict()  # a node without rules trains on, and is charged all the same
    guard_round(cfg, {}, state=unruled, rnd=4)
    assert load_ledger(unruled, cfg)[1] == [1, 2, 3, 4]
