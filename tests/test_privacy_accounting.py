"""fedllm.privacy accounting: ε functions, the checkpointed ledger, recipe checks, and a DP run
through the real ServerApp loop / ClientApp (fedllm.deploy.local_grid) with a budget stop and a
resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedllm.data.shards import raw_shard
from fedllm.privacy.accounting import PrivacyLedger, epsilon, noise_multiplier_for
from fedllm.privacy.plan import check_shards
from fedllm.recipe import ConfigError, load_recipe
from fedllm.server.checkpoint import load_checkpoint, save_checkpoint

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Hand-computed: q = 1 Gaussian RDP steps·α/(2σ²), converted as in Balle et al. 2020."""
    return min(
        steps * a / (2 * sigma**2)
        - (math.log(delta) + math.log(a)) / (a - 1)
        + math.log((a - 1) / a)
        for a in ALPHAS
    )


def test_epsilon_without_subsampling_matches_the_closed_form() -> None:
    for sigma, steps in ((2.0, 10), (5.0, 100), (1.0, 1)):
        got = epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=1e-5)
        assert got == pytest.approx(gaussian_epsilon(sigma, steps, 1e-5), rel=1e-9)


def test_epsilon_grows_with_steps_and_rate_and_prv_is_tighter() -> None:
    kw = {"noise_multiplier": 1.0, "delta": 1e-5}
    e1 = epsilon(sample_rate=0.01, steps=100, **kw)
    assert (
        0
        < e1
        < epsilon(sample_rate=0.01, steps=400, **kw)
        < epsilon(sample_rate=0.05, steps=400, **kw)
    )
    assert epsilon(sample_rate=0.01, steps=0, **kw) == 0.0
    prv = epsilon(sample_rate=0.01, steps=100, accountant="prv", **kw)
    assert 0.5 * e1 < prv < e1


def test_noise_multiplier_for_hits_the_target() -> None:
    kw = {"delta": 1e-5, "sample_rate": 0.02, "steps": 300}
    sigma = noise_multiplier_for(target_epsilon=3.0, **kw)
    assert 2.98 <= epsilon(noise_multiplier=sigma, **kw) <= 3.0
    assert epsilon(noise_multiplier=0.95 * sigma, **kw) > 3.0


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier must be > 0"),
        ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\]"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\)"),
        ({"steps": -1}, "steps must be an int >= 0"),
        ({"accountant": "gdp2"}, "accountant must be one of"),
    ],
)
def test_bad_accounting_input(kw: dict, message: str) -> None:
    args = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "delta": 1e-5, **kw}
    with pytest.raises(ValueError, match=message):
        epsilon(**args)
    with pytest.raises(ValueError, match="target_epsilon must be > 0"):
        noise_multiplier_for(target_epsilon=0.0, delta=1e-5, sample_rate=0.1, steps=10)


def test_ledger_survives_a_checkpoint_and_continues(tmp_path: Path) -> None:
    ledger = PrivacyLedger(delta=1e-5, accountant="rdp")
    ledger.record("partition-0", noise_multiplier=1.1, sample_rate=0.05, steps=20)
    ledger.record("partition-1", noise_multiplier=1.1, sample_rate=0.02, steps=20)
    assert ledger.epsilon() == ledger.epsilon("partition-0") > ledger.epsilon("partition-1")
    save_checkpoint(tmp_path, {"privacy": ledger.state_dict()})
    restored = PrivacyLedger(delta=1e-5, accountant="rdp")
    restored.load_state_dict(load_checkpoint(tmp_path)["privacy"])
    restored.record("partition-0", noise_multiplier=1.1, sample_rate=0.05, steps=20)
    want = epsilon(noise_multiplier=1.1, sample_rate=0.05, steps=40, delta=1e-5)
    assert restored.epsilon("partition-0") == pytest.approx(want, rel=1e-12)
    assert restored.steps("partition-0") == 40
    assert restored.epsilon_if({"partition-1": (1.1, 0.02, 20)}) == pytest.approx(want)
    with pytest.raises(ValueError, match=r"privacy\.accountant / privacy\.delta must not change"):
        PrivacyLedger(delta=1e-5, accountant="prv").load_state_dict(ledger.state_dict())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.mode=sample"], "set exactly one of privacy.noise_multiplier and privacy.target"),
        (
            ["privacy.mode=sample", "privacy.noise_multiplier=1", "privacy.target_epsilon=3"],
            "exactly one",
        ),
        (
            ["privacy.mode=sample", "privacy.target_epsilon=0"],
            "privacy.target_epsilon: Input should be greater than 0",
        ),
        (["privacy.mode=sample", "privacy.target_epsilon=-2"], "privacy.target_epsilon"),
        (["privacy.mode=sample", "privacy.noise_multiplier=1", "privacy.delta=0"], "privacy.delta"),
        (["privacy.mode=sample", "privacy.noise_multiplier=1", "privacy.delta=1"], "privacy.delta"),
        (
            ["privacy.mode=sample", "privacy.noise_multiplier=1", "privacy.max_grad_norm=0"],
            "privacy.max_grad_norm",
        ),
        (
            [
                "privacy.mode=client",
                "privacy.client_noise_multiplier=1",
                "aggregator.weighting=uniform",
                "privacy.client_clip=-1",
            ],
            "privacy.client_clip",
        ),
        (
            ["privacy.mode=sample", "privacy.noise_multiplier=1", "privacy.noise_at=client"],
            "privacy.noise_at does not apply",
        ),
        (
            ["privacy.mode=client", "privacy.client_noise_multiplier=1"],
            "aggregator.weighting='uniform'",
        ),
        (
            [
                "privacy.mode=client",
                "privacy.client_noise_multiplier=1",
                "aggregator.weighting=uniform",
                "privacy.delta=0.5",
            ],
            "below 1/data.num_clients",
        ),
        (
            ["privacy.epsilon_budget=3"],
            "privacy.epsilon_budget does not apply to privacy.mode='none'",
        ),
        (
            ["privacy.mode=sample", "privacy.noise_multiplier=1", "privacy.epsilon_budget=0"],
            "privacy.epsilon_budget",
        ),
    ],
)
def test_bad_privacy_recipes(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe(RECIPE, overrides)


def test_delta_must_be_below_one_over_each_shard(tmp_path: Path) -> None:
    cfg = load_recipe(
        RECIPE,
        [
            f"output_dir={tmp_path}",
            "privacy.mode=sample",
            "privacy.noise_multiplier=1",
            "privacy.delta=0.02",
        ],
    )
    with pytest.raises(
        ConfigError, match=r"privacy.delta=0.02 must be below 1/n = 1/\d+ for client 0"
    ):
        check_shards(cfg)
    ok = load_recipe(
        RECIPE, [f"output_dir={tmp_path}", "privacy.mode=sample", "privacy.noise_multiplier=1"]
    )
    check_shards(ok)


def test_a_target_epsilon_no_noise_can_meet_names_its_floor() -> None:
    """Opacus says only "The privacy budget is too low." when σ passes its cap: RDP's δ term
    log(1/δ)/(α−1) is a floor no noise gets under."""
    kw = dict(delta=1e-5, sample_rate=0.05, steps=40)
    floor = epsilon(noise_multiplier=1e6, **kw)
    assert 0.05 < floor < 1.0
    with pytest.raises(ValueError, match=rf"target ε=0.1 is below .* \(≈{floor:.3g} at σ=1e\+06"):
        noise_multiplier_for(target_epsilon=0.1, **kw)
    assert noise_multiplier_for(target_epsilon=2 * floor, **kw) > 0  # above the floor: found


def test_a_target_epsilon_below_the_floor_fails_before_any_round(tmp_path: Path) -> None:
    low = [f"output_dir={tmp_path}", "privacy.target_epsilon=0.05"]
    with pytest.raises(ConfigError, match=r"\n  privacy.target_epsilon: target ε=0.05 is below"):
        load_recipe(RECIPE, [*low, "privacy.mode=client", "aggregator.weighting=uniform"])
    cfg = load_recipe(RECIPE, [*low, "privacy.mode=sample"])  # σ depends on each shard's size
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon \(client 0\): target ε=0.05"):
        check_shards(cfg)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dp_run_reports_accountant_epsilon_stops_at_budget_and_resumes(tmp_path: Path) -> None:
    """Real ServerApp loop + ClientApp over fedllm.deploy.local_grid (Flower serialisation,
    no Ray)."""
    from fedllm.deploy.local_grid import run_local

    sigma, delta, local = 1.2, 1e-3, 2
    base = [
        f"output_dir={tmp_path}",
        "name=dp",
        "data.max_examples=200",
        "data.num_clients=2",
        "data.max_length=32",
        f"federation.local_steps={local}",
        "federation.rounds=3",
        "privacy.mode=sample",
        f"privacy.noise_multiplier={sigma}",
        f"privacy.delta={delta}",
    ]
    plain = load_recipe(RECIPE, base)
    q = {p: plain.federation.batch_size / len(raw_shard(plain, p).train) for p in range(2)}

    def eps(p: int, rounds: int) -> float:  # recomputed from the recipe's q, σ and steps
        return epsilon(noise_multiplier=sigma, sample_rate=q[p], steps=local * rounds, delta=delta)

    budget = (max(eps(p, 2) for p in q) + max(eps(p, 3) for p in q)) / 2
    run_dir, _ = run_local(load_recipe(RECIPE, [*base, f"privacy.epsilon_budget={budget}"]))
    first = rows(run_dir)
    clients = [r for r in first if r["kind"] == "client"]
    assert {r["round"] for r in clients} == {1, 2}, "round 3 would cross the budget: not run"
    for r in clients:
        assert r["dp_steps"] == local and r["dp_sample_rate"] == pytest.approx(q[r["partition"]])
        assert r["epsilon"] == pytest.approx(eps(r["partition"], r["round"]), rel=1e-9)
    server = {r["round"]: r for r in first if r["kind"] == "server"}
    assert server[2]["epsilon"] == pytest.approx(max(eps(p, 2) for p in q), rel=1e-9)
    assert server[2]["epsilon"] <= budget
    stop = [r for r in first if r["kind"] == "stop"]
    assert len(stop) == 1 and "round 3 would bring ε" in stop[0]["reason"]
    assert (run_dir / "final_adapter" / "adapter_model.safetensors").is_file()
    assert load_checkpoint(run_dir)["privacy"]["ledger"]["accountants"]

    budgeted = load_recipe(RECIPE, [*base, f"privacy.epsilon_budget={budget}"])
    run_local(budgeted, resume=True)  # the same budget: it stops again, with no second row
    assert [r for r in rows(run_dir) if r["kind"] == "stop"] == stop
    run_local(load_recipe(RECIPE, base), resume=True)  # no budget now: round 3 runs
    assert not [r for r in rows(run_dir) if r["kind"] == "stop"], "it did not stop this time"
    third = [r for r in rows(run_dir) if r["kind"] == "client" and r["round"] == 3]
    assert {r["partition"] for r in third} == {0, 1}
    for r in third:  # continues from the saved ledger (from zero it would be eps(p, 1))
        assert r["epsilon"] == pytest.approx(eps(r["partition"], 3), rel=1e-9)


def test_a_lost_round_is_charged_at_the_noise_planned_for_it_not_the_resumed_recipes() -> None:
    """A round lost to a crash is charged on --resume. A target ε's noise is planned for the
    run's rounds: resumed with federation.rounds=20 (was 10) the rest would run at a larger z
    and the run would end past the target, so the resume is refused. A checkpoint from before
    that check (no `planned_for`) still charges the lost round at the noise saved with it, not
    at the z the resumed recipe derives."""
    from fedllm.privacy.client_level import ClientLevel
    from fedllm.recipe import build_config

    def recipe(rounds: int):
        return build_config(
            {
                "data": {"num_clients": 4},
                "aggregator": {"name": "svd", "weighting": "uniform"},
                "privacy": {"mode": "client", "target_epsilon": 8.0, "delta": 1e-5},
                "federation": {"rounds": rounds},
            }
        )

    first = ClientLevel(recipe(10))
    assert first.before_round(3, partitions=[0, 1, 2, 3], sampled=4) is None
    state = first.state_dict()  # what the pending checkpoint holds
    assert state["planned_for"] == {"federation.rounds": 10}
    with pytest.raises(ValueError, match=r"federation\.rounds=10.*federation\.rounds=20"):
        ClientLevel(recipe(20)).load_state_dict(state)
    same = ClientLevel(recipe(10))
    same.load_state_dict(state)  # the plan it ran under: resumes
    same.lost_round(3, partitions=[0, 1, 2, 3], sampled=4)
    spent = same.account.ledger.epsilon()
    assert spent == pytest.approx(
        epsilon(noise_multiplier=first.seen_z, sample_rate=1.0, steps=1, delta=1e-5)
    )
    before_check = {k: v for k, v in state.items() if k != "planned_for"}
    resumed = ClientLevel(recipe(20))
    assert resumed.seen_z > first.seen_z  # the resumed recipe would charge less per round
    resumed.load_state_dict(before_check)
    resumed.lost_round(3, partitions=[0, 1, 2, 3], sampled=4)
    assert resumed.account.ledger.epsilon() == pytest.approx(spent)
    older = ClientLevel(recipe(20))  # a checkpoint written before the plan was kept
    older.load_state_dict({k: v for k, v in before_check.items() if k != "pending"})
    older.lost_round(3, partitions=[0, 1, 2, 3], sampled=4)
    assert older.account.ledger.epsilon() < spent


def test_a_target_epsilon_run_resumed_with_other_dp_sgd_steps_is_refused() -> None:
    """DP-SGD's σ for a target ε is planned over rounds × local steps at q = batch/n: each of
    those settings is kept with the ledger, and a resume that changes one is refused by name.
    A σ given outright plans nothing: such a run may be extended (its ε is what it spends)."""
    from fedllm.privacy.plan import noise_planned_for
    from fedllm.privacy.sample_level import SampleLevelDP
    from fedllm.recipe import build_config

    def recipe(**fed):
        privacy = fed.pop("privacy", {"target_epsilon": 8.0})
        return build_config(
            {
                "data": {"num_clients": 2},
                "privacy": {"mode": "sample", "delta": 1e-6, **privacy},
                "federation": {"rounds": 3, "local_steps": 4, **fed},
            }
        )

    state = SampleLevelDP(recipe()).state_dict()
    assert state["planned_for"] == {
        "federation.rounds": 3,
        "federation.local_steps": 4,
        "federation.local_epochs": None,
        "federation.batch_size": recipe().federation.batch_size,
    }
    SampleLevelDP(recipe()).load_state_dict(state)
    with pytest.raises(ValueError, match=r"federation\.local_steps=4; resuming with .*=8"):
        SampleLevelDP(recipe(local_steps=8)).load_state_dict(state)
    given = recipe(privacy={"noise_multiplier": 1.0})
    assert noise_planned_for(given) == {}
    saved = SampleLevelDP(given).state_dict()
    SampleLevelDP(recipe(rounds=9, privacy={"noise_multiplier": 1.0})).load_state_dict(saved)


@pytest.mark.parametrize(("noise_at", "charged"), [("client", True), ("server", False)])
def test_a_client_level_round_whose_every_reply_was_rejected(noise_at: str, charged: bool) -> None:
    """Nothing is released, but with noise_at: client each client's own noised update reached
    the server: charged at the noise of one update. With noise_at: server the raw updates
    reach a server trusted with them and nothing is released: not charged."""
    from fedllm.features.types import ClientRow, RoundResult
    from fedllm.privacy.client_level import ClientLevel
    from fedllm.recipe import build_config

    privacy = {"mode": "client", "client_noise_multiplier": 2.0, "delta": 1e-5}
    cfg = build_config(
        {
            "data": {"num_clients": 4},
            "aggregator": {"name": "svd", "weighting": "uniform"},
            "privacy": {**privacy, "noise_at": noise_at},
        }
    )
    feature = ClientLevel(cfg)
    rows = [ClientRow(1, n, "rejected", reason="norm") for n in (1, 2)]
    rows.append(ClientRow(1, 3, "failed", reason="timeout"))
    feature.record(RoundResult(sampled=3, rows=rows, replies=3), server_row={})
    spent = feature.account.ledger.epsilon()
    if charged:  # z/√m with m = 4: 1.0
        assert spent == pytest.approx(
            epsilon(noise_multiplier=1.0, sample_rate=1.0, steps=1, delta=1e-5)
        )
    else:
        assert spent == 0.0
