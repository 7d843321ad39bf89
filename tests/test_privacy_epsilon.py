"""ε in every DP mode, through real federations (the round loop and ClientApp on the in-process
grid): a target ε is met, the reported ε is the accountant's for the noise the server really sees,
and no round crosses `privacy.epsilon_budget`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedllm.data.shards import raw_shard
from fedllm.deploy.local_grid import run_local
from fedllm.privacy.accounting import epsilon
from fedllm.privacy.plan import client_noise_multiplier, sample_plan
from fedllm.recipe import load_recipe
from fedllm.server.metrics import MetricsLog

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
pytestmark = pytest.mark.slow  # every test here runs a federation

BASE = [
    "data.max_examples=150",
    "data.num_clients=3",
    "data.max_length=32",
    "lora.ranks=[2,4,8]",
    "federation.local_steps=1",
    "federation.rounds=3",
]
CLIENT = ["privacy.mode=client", "aggregator.weighting=uniform", "privacy.delta=1e-3"]


def run(tmp_path: Path, name: str, overrides: list[str]):
    cfg = load_recipe(RECIPE, [f"output_dir={tmp_path}", f"name={name}", *BASE, *overrides])
    run_dir, _ = run_local(cfg)
    rows = MetricsLog(run_dir).read()
    return cfg, {r["round"]: r for r in rows if r["kind"] == "server"}, rows


def test_sample_level_target_is_met_and_equals_the_accountant(tmp_path: Path) -> None:
    target = 6.0
    overrides = ["privacy.mode=sample", f"privacy.target_epsilon={target}", "federation.rounds=2"]
    cfg, server, rows = run(tmp_path, "sample", overrides)
    per_partition = []
    for p in range(cfg.data.num_clients):
        plan = sample_plan(cfg, n_train=len(raw_shard(cfg, p).train), partition=p)
        want = epsilon(
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps_per_round * cfg.federation.rounds,
            delta=cfg.privacy.delta,
        )
        per_partition.append(want)
    final = server[cfg.federation.rounds]["epsilon"]
    assert final == pytest.approx(max(per_partition), rel=1e-9)
    # charged from the replies' own numbers: honest ones pass the server's plan check
    assert {r["status"] for r in rows if r["kind"] == "client"} == {"ok"}
    assert target * 0.99 <= final <= target * (1 + 1e-3), "met, with no more noise than needed"
    assert not any(
        "train_loss" in r and r["train_loss"] is not None for r in rows if r["kind"] == "client"
    )


@pytest.mark.parametrize("noise_at", ["server", "client"])
def test_client_level_target_is_met_at_the_noise_the_server_sees(
    tmp_path: Path, noise_at: str
) -> None:
    target = 8.0
    cfg, server, _ = run(
        tmp_path,
        f"client-{noise_at}",
        [*CLIENT, f"privacy.noise_at={noise_at}", f"privacy.target_epsilon={target}"],
    )
    z = client_noise_multiplier(cfg)
    seen = z / math.sqrt(3) if noise_at == "client" else z  # each update: its own share only
    rounds = cfg.federation.rounds
    want = epsilon(noise_multiplier=seen, sample_rate=1.0, steps=rounds, delta=1e-3)
    assert server[rounds]["epsilon"] == pytest.approx(want, rel=1e-9)
    assert target * 0.99 <= server[rounds]["epsilon"] <= target * (1 + 1e-3)
    assert server[rounds]["dp_noise_multiplier"] == pytest.approx(seen)


def test_client_level_budget_stops_before_the_round_that_would_cross_it(tmp_path: Path) -> None:
    z = 1.5
    one = epsilon(noise_multiplier=z, sample_rate=1.0, steps=1, delta=1e-3)
    two = epsilon(noise_multiplier=z, sample_rate=1.0, steps=2, delta=1e-3)
    budget = (one + two) / 2
    _, server, rows = run(
        tmp_path,
        "budget",
        [*CLIENT, f"privacy.client_noise_multiplier={z}", f"privacy.epsilon_budget={budget}"],
    )
    assert max(server) == 1 and server[1]["epsilon"] == pytest.approx(one, rel=1e-9)
    assert all(r["epsilon"] <= budget for r in server.values() if "epsilon" in r)
    stop = [r for r in rows if r["kind"] == "stop"]
    assert len(stop) == 1 and "round 2 would bring ε" in stop[0]["reason"]


def test_a_round_lost_to_a_crash_is_charged_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server dies after round 2's clients trained, before its checkpoint: --resume charges
    that round at the plan before it runs round 2 again."""
    from fedllm.server import app

    sigma, overrides = 1.5, ["privacy.mode=sample", "privacy.noise_multiplier=1.5"]
    cfg = load_recipe(RECIPE, [f"output_dir={tmp_path}", "name=crash", *BASE, *overrides])
    real = app.Run.evaluate

    def dies_in_round_2(self, server_round: int):
        if server_round == 2:
            raise RuntimeError("the server process died")
        return real(self, server_round)

    monkeypatch.setattr(app.Run, "evaluate", dies_in_round_2)
    with pytest.raises(RuntimeError, match="died"):
        run_local(cfg)
    monkeypatch.setattr(app.Run, "evaluate", real)
    run_dir, _ = run_local(cfg, resume=True)
    server = {r["round"]: r for r in MetricsLog(run_dir).read() if r["kind"] == "server"}
    steps = cfg.federation.local_steps

    def eps(p: int, rounds: int) -> float:
        q = cfg.federation.batch_size / len(raw_shard(cfg, p).train)
        return epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps * rounds, delta=1e-5)

    # 3 finished rounds + the lost one, for every partition
    assert server[3]["epsilon"] == pytest.approx(max(eps(p, 4) for p in range(3)), rel=1e-9)
