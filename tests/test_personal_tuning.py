"""Personal tuning (fedllm.features.personal_tuning): after the last round each client tunes the
final global on its own data into an adapter it keeps, and reports its held-out loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedllm.aggregators import Factors, RoundSpec
from fedllm.client.train import evaluate_nll
from fedllm.data.shards import load_shard
from fedllm.deploy.local_grid import LocalGrid, server_identity
from fedllm.features import registry
from fedllm.features.personal_tuning import PersonalTuning, cut_to_rank, tuning_start
from fedllm.features.types import ClientPlan, ClientRound, EvalRow
from fedllm.model.base import cached_base_model
from fedllm.model.card import CARD_JSON
from fedllm.recipe import ConfigError, build_config, load_recipe
from fedllm.server.exchange import describe_evaluation

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
BASE = {"data": {"num_clients": 2}, "lora": {"ranks": 2, "alpha": 4}}
ON = {"personal_tuning": {}}


# ---------------------------------------------------------------- the cut and the recipe checks


def test_the_cut_is_the_best_rank_r_approximation_of_the_global() -> None:
    torch.manual_seed(0)
    f = Factors(torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64), 2.0)
    dW = 2.0 * f.B @ f.A
    S = torch.linalg.svdvals(dW)
    (cut,) = cut_to_rank({"m": f}, rank=2, scaling=0.5).values()
    assert (cut.rank, cut.scaling) == (2, 0.5)
    error = torch.linalg.matrix_norm(dW - 0.5 * cut.B @ cut.A)
    torch.testing.assert_close(error, S[2:].norm())  # Eckart–Young: the tail's norm
    (padded,) = cut_to_rank(
        {"m": f}, rank=6, scaling=1.0
    ).values()  # more rank than it holds: same ΔW
    assert padded.rank == 6
    torch.testing.assert_close(padded.B @ padded.A, dW)


def test_the_tuning_start_revives_what_a_lower_rank_global_left_dead() -> None:
    # h102: a rank-8 client tuning a rank-2 global kept 6 components whose A row and B column
    # were both zero, which never train; they get fresh A rows (B stays 0) as in a round
    torch.manual_seed(1)
    f = Factors(torch.randn(6, 2), torch.randn(2, 5), 1.0)
    (start,) = tuning_start({"m": f}, rank=8, scaling=0.25, seed=3).values()
    assert start.rank == 8 and torch.count_nonzero(start.B[:, 2:]) == 0
    assert bool((start.A[2:] != 0).all(dim=1).all())  # every padded row is alive
    torch.testing.assert_close(0.25 * start.B @ start.A, f.B @ f.A)  # ΔW unchanged
    (again,) = tuning_start({"m": f}, rank=8, scaling=0.25, seed=3).values()
    assert torch.equal(again.A, start.A)  # the seed's draws
    (other,) = tuning_start({"m": f}, rank=8, scaling=0.25, seed=4).values()
    assert not torch.equal(other.A[2:], start.A[2:])


def test_off_unless_named_and_its_options_are_checked() -> None:
    assert "personal_tuning" not in [c.name for c in registry.active(build_config(BASE))]
    cfg = build_config({**BASE, "features": {"personal_tuning": {"lr": 0.003, "steps": 5}}})
    assert (PersonalTuning(cfg).options.lr, PersonalTuning(cfg).options.steps) == (0.003, 5)
    with pytest.raises(ConfigError, match=r"features\.personal_tuning\.lr"):
        build_config({**BASE, "features": {"personal_tuning": {"lr": 0}}})
    with pytest.raises(ConfigError, match=r"features\.personal_tuning\.stpes"):
        build_config({**BASE, "features": {"personal_tuning": {"stpes": 5}}})


@pytest.mark.parametrize(
    ("sections", "says"),
    [
        ({"aggregator": {"name": "flora"}}, r"aggregator\.name='flora' merges each round"),
        ({"aggregator": {"name": "sdflora"}}, r"features\.sdflora_local shapes the adapter"),
        ({"federation": {"evaluate_clients": 1}}, r"set federation\.evaluate_clients: all"),
        (
            {
                "lora": {
                    "tiers": [
                        {"name": "phone", "rank": 2, "clients": 1, "pruning": 0.5},
                        {"name": "server", "rank": 2, "clients": 1},
                    ]
                }
            },
            "client 0 trains on a pruned base",
        ),
    ],
)
def test_refused_where_a_tuning_round_cannot_start_or_reach_every_client(
    sections: dict, says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        build_config({**BASE, **sections, "features": ON})


def test_a_tuned_loss_that_is_not_a_finite_nonnegative_number_drops_the_evaluation() -> None:
    honest = {"partition-id": 1, "nll-sum": 6.0, "tokens": 3, "held-out-loss": 2.0}
    declared = PersonalTuning.eval_metrics
    row = EvalRow.parse(2, {**honest, "tuned-loss": 1.5}, declared=declared)
    assert row.to_json()["tuned_loss"] == 1.5
    assert "tuned_loss" not in EvalRow.parse(2, honest, declared=declared).to_json()
    assert "tuned_loss" not in EvalRow.parse(2, {**honest, "tuned-loss": 1.5}).to_json()
    for bad in (-0.1, float("nan"), "1.5"):
        with pytest.raises(ValueError, match="tuned-loss"):
            EvalRow.parse(2, {**honest, "tuned-loss": bad}, declared=declared)
    content = RecordDict({"metrics": MetricRecord({**honest, "tuned-loss": 1.5})})
    with server_identity(1):
        reply = Message(content, dst_node_id=1, message_type=MessageType.EVALUATE)
    said = describe_evaluation(reply, private=False, declared=declared)
    assert said == "(partition 1): held-out loss 2.0000, tuned loss 1.5000"
    assert describe_evaluation(reply, private=True, declared=declared) == "(partition 1)"


@pytest.mark.parametrize(
    "privacy",
    [
        {"mode": "sample", "noise_multiplier": 1.0},
        {"mode": "client", "noise_at": "client", "client_noise_multiplier": 1.0},
        {"secure_aggregation": {"enabled": True}},
    ],
)
def test_a_private_run_tunes_nothing_into_the_run_directory_and_sends_nothing(
    tmp_path: Path, privacy: dict
) -> None:
    """Without a node's own personal-dir the adapter would land in the server's folder (a
    simulation's clients/): a private run's client neither tunes nor reports."""
    cfg = build_config(
        {
            **BASE,
            "aggregator": {"name": "fedit", "weighting": "uniform"},
            "data": {"num_clients": 3},
            "privacy": privacy,
            "features": ON,
            "output_dir": str(tmp_path),
            "name": "r",
        }
    )
    f = {"m": Factors(torch.ones(4, 2), torch.ones(2, 3), 2.0)}
    plan = ClientPlan(0, 2, 0.0, None)
    rnd = ClientRound(
        cfg, 0, cfg.federation.rounds, RoundSpec(), ConfigRecord({}), {}, RecordDict(), 0, plan
    )
    assert PersonalTuning(cfg).evaluated(f, rnd) == {}
    assert not (tmp_path / "r").exists(), "nothing written under the run directory"


# ---------------------------------------------------------------- a tiny federation with it on


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    from fedllm.client.app import make_client_app
    from fedllm.server.app import run_server

    out = tmp_path_factory.mktemp("tuning")
    overrides = [
        f"output_dir={out}",
        "name=tuned",
        "aggregator.name=svd",
        "data.num_clients=2",
        "data.max_examples=120",
        "lora.ranks=[2,4]",
        "federation.rounds=2",
        "federation.local_steps=3",
        "features.personal_tuning.lr=0.01",
    ]
    cfg = load_recipe(RECIPE, overrides)
    grid = LocalGrid(make_client_app(cfg), cfg.data.num_clients)
    with server_identity(grid.run.run_id):
        run_dir = run_server(grid, cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, run_dir, rows


@pytest.mark.slow
def test_each_client_keeps_a_tuned_adapter_that_loads_and_scores_what_it_reported(
    tuned_run,
) -> None:
    cfg, run_dir, rows = tuned_run
    final = {r["partition"]: r for r in rows if r["kind"] == "eval" and r["round"] == 2}
    assert sorted(final) == [0, 1]
    _, tok = cached_base_model(cfg)
    for pid, row in final.items():
        folder = run_dir / "clients" / str(pid) / "tuned_adapter"
        card = json.loads((folder / CARD_JSON).read_text())
        assert (card["what"], card["partition"], card["round"]) == ("tuned", pid, 2)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == cfg.client_rank(pid)
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(run_dir / "tiny_base"), str(folder)
        )
        model.train()  # as the client scored it (a float base: dropout is the only difference)
        shard = load_shard(cfg, pid, tokenizer=tok)
        nll, tokens = evaluate_nll(
            model,
            shard.held_out,
            batch_size=cfg.federation.eval_batch_size,
            pad_id=tok.pad_token_id,
            share_head=cfg.federation.share_head,
        )
        assert tokens == row["tokens"]
        assert nll / tokens == pytest.approx(row["tuned_loss"], abs=1e-4)
        assert row["tuned_loss"] != pytest.approx(row["held_out_loss"], abs=1e-6), "it trained"


@pytest.mark.slow
def test_only_the_final_round_tunes_and_the_server_row_has_the_token_weighted_mean(
    tuned_run,
) -> None:
    _, _, rows = tuned_run
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["round"] for r in evals if "tuned_loss" in r] == [2, 2]
    server = {r["round"]: r for r in rows if r["kind"] == "server"}
    assert "tuned_loss" not in server[1] and "tuned_loss" not in server[0]
    final = [r for r in evals if r["round"] == 2]
    mean = sum(r["tuned_loss"] * r["tokens"] for r in final) / sum(r["tokens"] for r in final)
    assert server[2]["tuned_loss"] == pytest.approx(mean, rel=1e-9)


def test_a_client_whose_tuning_fails_still_reports_its_score(tmp_path: Path, caplog) -> None:
    """Tuning runs before the evaluation reply is built: a failure there (here its folder is a
    file) is logged and the reply keeps the global's held-out loss, without a tuned loss."""
    from fedllm.client.app import evaluate
    from fedllm.model.wire import outgoing
    from fedllm.model.wire import spec_config as wire_config

    overrides = [f"output_dir={tmp_path}", "name=t", "lora.ranks=[2,2]", "data.num_clients=2"]
    cfg = load_recipe(RECIPE, [*overrides, "data.max_examples=120", "features.personal_tuning={}"])
    base, _ = cached_base_model(cfg)
    g = torch.Generator().manual_seed(0)
    factors = {}
    for i, layer in enumerate(base.model.layers):
        for p in ("q_proj", "v_proj"):
            d, k = getattr(layer.self_attn, p).weight.shape
            B, A = torch.randn(d, 2, generator=g) * 0.1, torch.randn(2, k, generator=g)
            factors[f"model.layers.{i}.self_attn.{p}"] = Factors(B, A, cfg.client_scaling(2))
    spec = RoundSpec()
    config = {"server-round": cfg.federation.rounds, "global-scaling": cfg.client_scaling(2)}
    config |= {"recipe-hash": cfg.fingerprint(), **wire_config(spec)}
    content = RecordDict({"global": outgoing(factors, spec), "config": ConfigRecord(config)})
    (cfg.run_dir / "clients").mkdir(parents=True)
    (cfg.run_dir / "clients" / "1").write_text("not a folder")
    with server_identity(1):
        msg = Message(content, dst_node_id=1, message_type=MessageType.EVALUATE)
    context = Context(0, 1, {"partition-id": 1}, RecordDict(), {})
    metrics = evaluate(cfg, msg, context=context).content["metrics"]
    assert metrics["tokens"] > 0 and metrics["held-out-loss"] > 0
    assert "tuned-loss" not in metrics
    assert "features.personal_tuning failed after the evaluation" in caplog.text
