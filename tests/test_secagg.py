"""SecAgg+ secure aggregation (fedllm.privacy.secagg) through Flower's real simulation engine.

The tiny recipe, 3 clients of ranks 2/4/8. The ClientApp here is fedllm's, plus an oracle that
writes each client's *unmasked* FitRes vectors to disk before `secaggplus_mod` masks them (the
server never sees them); the server's secure result is compared with the plain aggregator run
on exactly those client updates.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedllm.aggregators import Factors, get
from fedllm.privacy.secagg_common import max_weight
from fedllm.recipe import ConfigError, load_recipe
from fedllm.server.metrics import MetricsLog

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
ON = "privacy.secure_aggregation.enabled=true"


# -- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["aggregator.name=hetlora"], "needs each client's update"),
        (
            [
                "aggregator.name=ffa",
                "aggregator.weighting=uniform",
                "privacy.mode=client",
                "privacy.client_noise_multiplier=1.0",
                "privacy.delta=0.01",
            ],
            "privacy.mode='client'",
        ),
        (["aggregator.name=ffa", "compression.dtype=float16"], "compression"),
        (["aggregator.name=ffa", "data.num_clients=1", "lora.ranks=4"], "at least 2 clients"),
        (
            ["aggregator.name=ffa", "privacy.secure_aggregation.quantization_range=2147483648"],
            r"must stay below 2\*\*32",
        ),
        (["aggregator.name=ffa", "privacy.secure_aggregation.num_shares=2"], "must be > 2"),
        (
            [
                "aggregator.name=ffa",
                "privacy.secure_aggregation.num_shares=3",
                "privacy.secure_aggregation.reconstruction_threshold=3",
            ],
            "must be below num_shares",
        ),
    ],
)
def test_incompatible_recipes_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe(RECIPE, [ON, *overrides])


def test_compatible_recipes_load_and_the_option_is_off_by_default() -> None:
    assert not load_recipe(RECIPE).privacy.secure_aggregation.enabled
    for name in ("ffa", "fedit", "svd"):
        cfg = load_recipe(RECIPE, [ON, f"aggregator.name={name}"])
        assert cfg.privacy.secure_aggregation.enabled
    # a resolved recipe (recipe.yaml) loads back; the fingerprint a node pins covers the option
    plain = load_recipe(RECIPE, ["aggregator.name=ffa"])
    assert cfg.fingerprint() != plain.fingerprint()


def test_vectors_have_one_shape_for_every_rank() -> None:
    from fedllm.privacy.secagg_client import vectors

    d, k = 6, 5
    for r in (1, 3):
        u = {"m": Factors(torch.randn(d, r), torch.randn(r, k), 16.0 / r)}
        ffa = vectors(u, mode="ffa", width=3)
        B, A = vectors(u, mode="fedit", width=3)
        (W,) = vectors(u, mode="dense", width=3)
        assert ffa[0].shape == B.shape == (d, 3) and A.shape == (3, k) and W.shape == (d, k)
        np.testing.assert_allclose(B[:, :r], (u["m"].B * u["m"].scaling).double().numpy())
        assert not B[:, r:].any() and not A[r:].any()
        np.testing.assert_allclose(W, u["m"].delta().double().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("override", ["data.num_clients=2", "federation.clients_per_round=2"])
def test_two_clients_per_round_are_refused(override: str) -> None:
    # with 2, each client gets the sum of both updates back and subtracts its own
    with pytest.raises(ConfigError, match=r"privacy\.secure_aggregation: exactly 2 clients"):
        load_recipe(RECIPE, [ON, "aggregator.name=ffa", "lora.ranks=4", override])
    cfg = load_recipe(RECIPE, [ON, "aggregator.name=ffa", "federation.clients_per_round=3"])
    assert cfg.privacy.secure_aggregation.enabled and cfg.federation.clients_per_round == 3


# -- guards: real SecAgg+ rounds on an in-process grid, with fake (instant) training ------------
SHAPES = {"m1": (6, 5), "m2": (4, 3)}
# what a SecAgg+ client may send in the clear: who, rank, weight, traffic, DP-SGD accounting, and
# the count of entries its quantisation clipped
CLEAR = {
    "partition-id",
    "rank",
    "num-examples",
    "steps",
    "train-seconds",
    "bytes-sent",
    "bytes-received",
    "scaling",
    "pruning",
    "dp-noise-multiplier",
    "dp-sample-rate",
    "dp-steps",
    "secagg-clipped-entries",
}
WEIGHTS = {0: 100, 1: 200, 2: 300, 3: 400}


def secure_cfg(*overrides: str):
    return load_recipe(RECIPE, [ON, "aggregator.name=ffa", *overrides])


def updates(cfg, *, seed: int = 0) -> dict[int, dict[str, Factors]]:
    """Each partition's trained factors at its recipe rank, with entries of size ~0.1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in range(cfg.data.num_clients):
        r = cfg.client_rank(p)
        out[p] = {
            m: Factors(
                0.1 * torch.randn(d, r, generator=g),
                torch.randn(r, k, generator=g),
                cfg.client_scaling(r),
            )
            for m, (d, k) in SHAPES.items()
        }
    return out


def all_metrics(partition: int, rank: int, examples: int) -> dict[str, float | int]:
    """Every metric a DP-SGD + HetLoRA client's training could report, private ones included."""
    return {
        "partition-id": partition,
        "rank": rank,
        "num-examples": examples,
        "scaling": 16.0 / rank,
        "train-loss": 2.5,
        "train-loss-first": 3.0,
        "train-loss-last": 2.0,
        "steps": 3,
        "train-seconds": 0.5,
        "bytes-received": 100,
        "bytes-sent": 100,
        "pruning": 0.0,
        "dp-noise-multiplier": 1.5,
        "dp-sample-rate": 0.1,
        "dp-steps": 3,
        "dp-max-grad-norm": 1.0,
        "dp-clipped-fraction": 0.25,
        "dp-empty-batches": 0,
        "hetlora-tail": 0.125,
        "some-future-key": 7.0,
    }


def fake_train(ups: dict[int, dict[str, Factors]], weights: dict[int, int] = WEIGHTS):
    """`train_content` stand-in: the partition's given factors and every metric, at once."""
    from flwr.app import MetricRecord, RecordDict

    from fedllm.model.adapters import to_record

    def train(cfg, content, *, context):
        p = int(context.node_config["partition-id"])
        rank = next(iter(ups[p].values())).rank
        return RecordDict(
            {"update": to_record(ups[p]), "metrics": MetricRecord(all_metrics(p, rank, weights[p]))}
        )

    return train


def node_context(partition: int):
    from flwr.app import Context, RecordDict

    return Context(1, 1001 + partition, {"partition-id": partition}, RecordDict(), {})


def fitins_content(cfg):
    """A SecAgg+ train message's content as `client_reply` receives it (FitIns form)."""
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    config = {
        "server-round": 1,
        "secagg-keys": "m1.lora_A",
        "secagg-mode": "ffa",
        "secagg-width": cfg.max_rank,
        "secagg-uniform": cfg.aggregator.weighting == "uniform",
    }
    params = ndarrays_to_parameters([np.zeros((2, 5), np.float32)])
    return compat.fitins_to_recorddict(FitIns(params, config), keep_input=True)


def secure_round(cfg, ups, *, check=None, tamper=None, rounds: int = 1):
    """One real SecAgg+ round (Flower's workflow and mods, fedllm's `train_round`) on a LocalGrid;
    `tamper(stage, node, reply)` may change any reply as it leaves its node (a hostile client).

    Returns (last round's result, global before, global after, the replies that left each
    client); `rounds` > 1 runs that many rounds on one strategy."""
    from flwr.clientapp import ClientApp

    from fedllm.deploy.local_grid import LocalGrid, server_identity
    from fedllm.features import registry
    from fedllm.privacy import secagg, secagg_client, secagg_server
    from fedllm.server.strategy import LoraStrategy

    app = ClientApp()
    train = fake_train(ups)

    @app.train(mods=[secagg_client.mod])
    def _train(msg, context):
        content = secagg.SecureAggregation.wrap_train(
            cfg, msg.content, context=context, train=train
        )
        return type(msg)(content, reply_to=msg)

    sent = []

    def node(msg, context):  # what leaves each client, after the mod
        configs = msg.content.config_records  # the stage, before the mod reads it out
        stage = (
            configs[RECORD_KEY_CONFIGS].get(Key.STAGE) if RECORD_KEY_CONFIGS in configs else None
        )
        reply = app(msg, context)
        if tamper is not None:
            reply = tamper(stage, context.node_id, reply)
        sent.append(reply)
        return reply

    grid = LocalGrid(node, cfg.data.num_clients)
    lora = LoraStrategy(cfg, shapes=SHAPES, features=registry.build(cfg))
    before = dict(lora.global_)
    with server_identity(grid.run.run_id):
        for rnd in range(1, rounds + 1):
            result = secagg_server.train_round(lora, grid=grid, server_round=rnd)
    return result, before, lora.global_, sent


def plain_mean(cfg, ups, partitions) -> dict[str, torch.Tensor]:
    """Σ wᵢ·sᵢ·pad(Bᵢ) / Σ wᵢ over `partitions`: what the SecAgg+ ffa round must recover."""
    w = {p: WEIGHTS[p] for p in partitions}
    return {
        m: sum(w[p] * ups[p][m].pad(cfg.max_rank).B.double() * ups[p][m].scaling for p in w)
        / sum(w.values())
        for m in SHAPES
    }


def test_a_round_recovers_the_weighted_mean_and_only_allowed_keys_leave_clients() -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    cfg = secure_cfg()
    ups = updates(cfg)
    result, before, after, sent = secure_round(cfg, ups)
    assert [r.status for r in result.rows] == ["ok"] * 3
    assert result.train_loss is None, "the server cannot know the clients' losses"
    want = plain_mean(cfg, ups, [0, 1, 2])
    for m in SHAPES:
        assert torch.equal(after[m].A, before[m].A)  # ffa: the frozen A₀
        tol = tolerance(cfg.privacy.secure_aggregation, [100, 200, 300], max_weight(cfg), 1.0)
        assert (after[m].B.double() - want[m]).abs().max().item() <= tol
    # every key every reply carried in the clear, at every stage of the protocol
    masked = [r for r in sent if "fitres.metrics" in r.content.config_records]
    assert len(masked) == 3 and len(sent) == 12  # 4 stages × 3 clients
    for reply in sent:
        content = reply.content
        assert all(len(rec) == 0 for rec in content.array_records.values()), "unmasked arrays"
        assert set(content.metric_records) <= {"fitres.num_examples"}
        # the protocol's own record (public keys, encrypted shares, masked vector) and FitRes's
        assert set(content.config_records) <= {
            "fitres.metrics",
            "fitres.status",
            RECORD_KEY_CONFIGS,
        }
        if reply in masked:
            metrics = content.config_records["fitres.metrics"]
            assert set(metrics) <= CLEAR, set(metrics) - CLEAR
            assert metrics["secagg-clipped-entries"] == 0
            assert set(content.config_records["fitres.status"]) == {"code", "message"}
            assert set(content.metric_records["fitres.num_examples"]) == {"num_examples"}
    rows = [row.to_json() for row in result.rows]
    assert all(r["train_loss"] is None and r["secagg_clipped_entries"] == 0 for r in rows)
    for row in result.rows:  # what the server read from each reply
        assert set(row.reply.extra) <= CLEAR, set(row.reply.extra) - CLEAR


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_client_refuses_to_send_non_finite_vectors(bad: float) -> None:
    from fedllm.privacy.secagg_client import client_reply

    cfg = secure_cfg()
    ups = updates(cfg)
    ups[1]["m2"].B[0, 0] = bad
    match = r"privacy\.secure_aggregation.*1 non-finite \(NaN/Inf\) entries .* in m2\.B"
    with pytest.raises(ValueError, match=match):
        client_reply(cfg, fitins_content(cfg), context=node_context(1), train=fake_train(ups))


def test_a_non_finite_client_drops_out_and_the_others_are_aggregated() -> None:
    # before: the NaN was quantised and wrapped the masked sum, moving the mean to ~+2040
    cfg = secure_cfg("data.num_clients=4")
    ups = updates(cfg)
    ups[3]["m1"].B[1, 1] = float("nan")
    result, _, after, _ = secure_round(cfg, ups)
    assert sorted(r.partition for r in result.ok) == [0, 1, 2]
    want = plain_mean(cfg, ups, [0, 1, 2])
    tol = tolerance(cfg.privacy.secure_aggregation, [100, 200, 300], max_weight(cfg), 1.0)
    for m in SHAPES:
        assert (after[m].B.double() - want[m]).abs().max().item() <= tol


@pytest.mark.parametrize("server", ["honest", "curious"])
def test_a_dropout_that_would_leave_a_sum_of_two_refuses_the_round(
    server: str, monkeypatch, caplog
) -> None:
    """3 clients, one drops out: Flower's threshold (2 of 3 shares) would let the server unmask
    the other two's sum. fedllm's server halts; a curious one that goes on (Flower's own
    workflow) gets no key shares: each survivor refuses to unmask. The global stays."""
    from fedllm.privacy import secagg_server

    if server == "curious":
        parent = secagg_server.SecAggPlusWorkflow.collect_masked_vectors_stage
        monkeypatch.setattr(secagg_server.Workflow, "collect_masked_vectors_stage", parent)
    cfg = secure_cfg()
    ups = updates(cfg)
    ups[2]["m1"].B[1, 1] = float("nan")
    result, before, after, _ = secure_round(cfg, ups)
    assert result.ok == [] and "3 to unmask a sum" in result.rows[0].reason
    for m in SHAPES:
        assert after[m] is before[m], "the previous global stays"
    refused = "would unmask a sum of 2 updates" in caplog.text
    assert refused is (server == "curious"), caplog.text[-2000:]


def test_the_server_refuses_a_wrapped_mean_and_keeps_the_global(monkeypatch) -> None:
    # a client that skips the check (an older or a dishonest one) quantises its NaN anyway
    from fedllm.privacy import secagg_client

    monkeypatch.setattr(secagg_client, "check_finite", lambda vecs, names: None, raising=False)
    cfg = secure_cfg()
    ups = updates(cfg)
    ups[2]["m1"].B[1, 1] = float("nan")
    result, before, after, _ = secure_round(cfg, ups)
    assert [r.status for r in result.rows] == ["failed"] * 3 and result.ok == []
    assert all("outside ±" in r.reason and "round refused" in r.reason for r in result.rows)
    assert sorted(r.reply.partition for r in result.rows) == [0, 1, 2]  # still charged (DP)
    for m in SHAPES:
        assert after[m] is before[m], "the previous global stays"


def test_apply_refuses_non_finite_and_out_of_range_means() -> None:
    from fedllm.privacy.secagg_server import SecureRound
    from fedllm.server.strategy import LoraStrategy

    cfg = secure_cfg("aggregator.weighting=uniform")
    lora = LoraStrategy(cfg, shapes=SHAPES)
    sr = SecureRound(lora, grid=None)
    c = cfg.privacy.secure_aggregation.clipping_range
    assert sr.bound([1, 1, 1]) == c  # uniform: a mean of entries clipped to ±c
    weighted = SecureRound(LoraStrategy(secure_cfg(), shapes=SHAPES), grid=None)
    assert weighted.bound([600, 600, 600]) == pytest.approx(c)
    assert weighted.bound([150, 300, 600]) == pytest.approx(3 * c / (0.25 + 0.5 + 1.0))
    assert weighted.bound() == pytest.approx(c * max_weight(cfg))
    zeros = [np.zeros((d, cfg.max_rank)) for _, (d, _) in sorted(SHAPES.items())]
    for bad, reason in [(np.nan, "non-finite"), (np.inf, "non-finite"), (2040.0, "outside")]:
        mean = [a.copy() for a in zeros]
        mean[1][0, 0] = bad
        before = dict(lora.global_)
        assert not sr.apply(1, mean, total_rank=6, weights=[1, 1, 1])
        assert reason in sr.failure and all(lora.global_[m] is before[m] for m in SHAPES)
    mean = [a.copy() for a in zeros]
    mean[0][0, 0] = c  # the largest honest entry
    assert sr.apply(1, mean, total_rank=6, weights=[1, 1, 1]) and sr.failure is None
    assert lora.global_["m1"].B[0, 0].item() == c


@pytest.mark.parametrize(
    ("weighting", "examples", "entries", "clipped"),
    [
        # uniform: ratio 1, so |s·B| > c is clipped
        ("uniform", 150, [0.5, 2.0, -2.0, 8.0], 3),
        # examples: the mod multiplies by w/max_weight = 150/600 first, so only |s·B|/4 > c is
        ("examples", 150, [0.5, 2.0, -2.0, 8.0], 1),
    ],
)
def test_a_client_reports_the_entries_quantisation_will_clip(
    weighting: str, examples: int, entries: list[float], clipped: int, caplog
) -> None:
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from fedllm.privacy.secagg_client import client_reply

    cfg = secure_cfg(f"aggregator.weighting={weighting}")
    c = cfg.privacy.secure_aggregation.clipping_range
    ups = updates(cfg)
    f = ups[0]["m1"]  # partition 0: rank 2, scaling 8
    for i, x in enumerate(entries):  # x·c after the scaling
        f.B[i, 0] = x * c / f.scaling
    train = fake_train(ups, {0: examples})
    with caplog.at_level(logging.WARNING, logger="fedllm.secagg"):
        reply = client_reply(cfg, fitins_content(cfg), context=node_context(0), train=train)
    res = compat.recorddict_to_fitres(reply, keep_input=True)
    assert res.metrics["secagg-clipped-entries"] == clipped
    assert f"{clipped} of " in caplog.text and "will be clipped" in caplog.text
    assert set(res.metrics) <= CLEAR and "train-loss" not in res.metrics
    assert res.num_examples == (1 if weighting == "uniform" else examples)
    assert np.isfinite(
        np.concatenate([a.ravel() for a in parameters_to_ndarrays(res.parameters)])
    ).all()


# -- end to end ------------------------------------------------------------------------------------
def oracle_client_app(cfg, folder: Path):
    """fedllm's ClientApp, writing each client's unmasked reply vectors before they are masked."""
    from flwr.clientapp import ClientApp
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from fedllm.client import app as client
    from fedllm.privacy import secagg_client
    from fedllm.privacy.secagg_common import FITINS

    app = ClientApp()

    @app.train(mods=[secagg_client.mod])
    def _train(msg, context):
        reply = client.train(cfg, msg, context=context)
        if FITINS in msg.content.config_records:
            res = compat.recorddict_to_fitres(reply.content, keep_input=True)
            stage = context.state.config_records["secaggplus_state"]["current_stage"]
            rnd = int(msg.content.config_records["fitins.config"]["server-round"])
            np.savez(
                folder / f"r{rnd}-p{int(res.metrics['partition-id'])}.npz",
                *parameters_to_ndarrays(res.parameters),
                rank=int(res.metrics["rank"]),
                weight=res.num_examples,
                stage=stage,
            )
        return reply

    @app.evaluate()
    def _evaluate(msg, context):
        return client.evaluate(cfg, msg, context=context)

    return app


def run_secure(tmp: Path, aggregator: str, rounds: int):
    import ray.cloudpickle
    from flwr.simulation import run_simulation

    from fedllm.launch import absolute_paths, prepare
    from fedllm.server.app import make_server_app

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the oracle, to workers
    cfg = absolute_paths(
        load_recipe(
            RECIPE,
            [
                ON,
                f"aggregator.name={aggregator}",
                f"output_dir={tmp}",
                f"name={aggregator}",
                f"federation.rounds={rounds}",
                "federation.local_steps=3",
            ],
        )
    )
    oracle = tmp / f"oracle-{aggregator}"
    oracle.mkdir()
    cfg.run_dir.mkdir(parents=True)
    prepare(cfg)
    run_simulation(
        server_app=make_server_app(cfg),
        client_app=oracle_client_app(cfg, oracle),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}},
    )
    return cfg, oracle


def clients(oracle: Path, rnd: int) -> list[dict]:
    out = []
    for p in range(3):
        z = np.load(oracle / f"r{rnd}-p{p}.npz")
        arrays = [z[f"arr_{i}"] for i in range(len([k for k in z.files if k.startswith("arr_")]))]
        out.append(
            {"arrays": arrays, "rank": int(z["rank"]), "w": int(z["weight"]), "stage": z["stage"]}
        )
    return out


def secure_global(run_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    from fedllm.server.checkpoint import load_checkpoint

    return load_checkpoint(run_dir)["strategy"]["global"]


def check_secure_run(run_dir: Path, oracle: Path, rounds: int, out: str) -> list[dict]:
    """The protocol ran (all four stages) and the server kept no individual update."""
    assert "Secure aggregation completed." in out
    assert out.count("[Stage 3] Received key shares from 3 clients") >= rounds
    rows = MetricsLog(run_dir).read()
    train = [r for r in rows if r["kind"] == "client"]
    assert len(train) == 3 * rounds
    assert all(r["status"] == "ok" and r["secure_aggregation"] == "secagg+" for r in train)
    assert {r["rank"] for r in train} == {2, 4, 8}
    assert not (run_dir / "client_adapters").exists(), "the server held individual updates"
    # every client's mod had done setup and key sharing before its vectors were taken
    assert {str(c["stage"]) for c in clients(oracle, rounds)} == {"share_keys"}
    return train


def tolerance(cfg_sa, weights: list[int], max_weight: float, scale: float) -> float:
    """Stochastic rounding moves each client's entry by < one step 2c/Q (of the weighted value);
    dividing by Σ(wᵢ/max_weight) gives the bound on the mean; plus float32 storage of the result."""
    step = 2 * cfg_sa.clipping_range / cfg_sa.quantization_range
    return len(weights) * step / sum(w / max_weight for w in weights) + 1e-6 * scale


@pytest.mark.slow
def test_secure_ffa_equals_plain_ffa_of_the_same_updates(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="flwr")  # the workflow's stage log
    cfg, oracle = run_secure(tmp_path, "ffa", rounds=2)
    run_dir = cfg.run_dir
    train = check_secure_run(run_dir, oracle, 2, caplog.text)
    secure = secure_global(run_dir)
    updates, weights = {}, []
    for c in clients(oracle, 2):
        r, s = c["rank"], cfg.client_scaling(c["rank"])
        weights.append(c["w"])
        for module, vec in zip(sorted(secure), c["arrays"], strict=True):
            assert vec.shape[1] == 8, "every rank is padded to the max rank"
            A0 = secure[module][1]  # frozen: the round-2 A is the shared A₀
            B = torch.from_numpy(vec[:, :r] / s)
            updates.setdefault(module, []).append(Factors(B, A0[:r].double(), s))
    worst = 0.0
    for module, ups in updates.items():
        plain = get("ffa")(ups, weights).global_
        B, A, scaling = secure[module]
        assert scaling == 1.0 and torch.equal(A.double(), plain.A)
        diff = (B.double() - plain.B).abs().max().item()
        top = plain.B.abs().max().item()
        tol = tolerance(cfg.privacy.secure_aggregation, weights, max_weight(cfg), top)
        assert diff <= tol, (module, diff, tol)
        worst = max(worst, diff)
    print(f"[secagg] ffa secure vs plain: max abs diff {worst:.3g}")
    by_rank = {r["rank"]: r["bytes_sent"] for r in train}
    assert len(set(by_rank.values())) == 1, "every client uploads the same padded size"
    print(f"[secagg] ffa bytes per client per round: {by_rank[2]}")


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["fedit", "svd"])
def test_secure_fedit_and_dense_svd_match_plain(tmp_path: Path, caplog, aggregator: str) -> None:
    caplog.set_level(logging.DEBUG, logger="flwr")
    cfg, oracle = run_secure(tmp_path, aggregator, rounds=1)
    run_dir = cfg.run_dir
    train = check_secure_run(run_dir, oracle, 1, caplog.text)
    secure = secure_global(run_dir)
    cs = clients(oracle, 1)
    weights = [c["w"] for c in cs]
    p = [w / sum(weights) for w in weights]
    worst = 0.0
    for i, module in enumerate(sorted(secure)):
        B, A, scaling = secure[module]
        if aggregator == "fedit":  # vectors sᵢ·pad(Bᵢ), pad(Aᵢ); the global factors are their means
            Bm = sum(pi * c["arrays"][2 * i] for pi, c in zip(p, cs, strict=True))
            Am = sum(pi * c["arrays"][2 * i + 1] for pi, c in zip(p, cs, strict=True))
            pairs = [(B.double(), torch.from_numpy(Bm)), (A.double(), torch.from_numpy(Am))]
            slack = 1.0
        else:  # dense ΔW = Σpᵢsᵢ·BᵢAᵢ (exact), then its rank Σrᵢ = 14 SVD
            assert B.shape[1] == 14
            want = sum(pi * c["arrays"][i] for pi, c in zip(p, cs, strict=True))
            pairs = [(scaling * B.double() @ A.double(), torch.from_numpy(want))]
            # quantization noise E on a rank-14 ΔW: the best rank-14 fit is within 2‖E‖₂ of ΔW,
            # and ‖E‖₂ ≤ ‖E‖_F ≤ √(dk)·max|E|
            slack = 2 * want.size**0.5
        for got, want in pairs:
            diff = (got - want).abs().max().item()
            top = want.abs().max().item()
            tol = slack * tolerance(cfg.privacy.secure_aggregation, weights, max_weight(cfg), top)
            assert diff <= tol, (module, diff, tol)
            worst = max(worst, diff)
    print(f"[secagg] {aggregator} secure vs plain: max abs diff {worst:.3g}")
    print(f"[secagg] {aggregator}: bytes per client per round {train[0]['bytes_sent']}")


@pytest.mark.slow
def test_dp_sgd_under_secagg_is_accounted_and_resumes(tmp_path: Path) -> None:
    """DP-SGD clients whose replies are masked: the server still charges each client's ε from the
    steps it ran, and a run stopped after round 2 resumes round 3 under SecAgg+ from the saved
    global adapter and ledger (fedllm.deploy.local_grid: the real round loop, ClientApp and
    mods)."""
    from fedllm.data.shards import raw_shard
    from fedllm.deploy.local_grid import run_local
    from fedllm.privacy.accounting import epsilon

    sigma, delta, local = 1.5, 1e-3, 2
    base = [
        ON,
        "aggregator.name=ffa",
        f"output_dir={tmp_path}",
        "name=dp-sec",
        "data.max_examples=240",
        "data.max_length=32",
        f"federation.local_steps={local}",
        "privacy.mode=sample",
        f"privacy.noise_multiplier={sigma}",
        f"privacy.delta={delta}",
    ]
    cfg = load_recipe(RECIPE, [*base, "federation.rounds=2"])
    q = {p: cfg.federation.batch_size / len(raw_shard(cfg, p).train) for p in range(3)}

    def eps(p: int, rounds: int) -> float:  # from the recipe's q and σ and the steps run
        return epsilon(noise_multiplier=sigma, sample_rate=q[p], steps=local * rounds, delta=delta)

    run_dir, _ = run_local(cfg)
    after_2 = secure_global(run_dir)
    run_local(load_recipe(RECIPE, [*base, "federation.rounds=3"]), resume=True)
    rows = MetricsLog(run_dir).read()
    train = [r for r in rows if r["kind"] == "client"]
    assert sorted((r["round"], r["partition"]) for r in train) == [
        (rnd, p) for rnd in (1, 2, 3) for p in range(3)
    ], "round 3 ran once, after the resume, with every client"
    for r in train:
        assert r["secure_aggregation"] == "secagg+" and r["status"] == "ok"
        assert r["epsilon"] == pytest.approx(eps(r["partition"], r["round"]), rel=1e-9)
    server = {r["round"]: r for r in rows if r["kind"] == "server"}
    assert server[3]["epsilon"] == pytest.approx(max(eps(p, 3) for p in q), rel=1e-9)
    final = secure_global(run_dir)
    for module, (B, A, _) in final.items():  # ffa: round 3 kept round 2's A and moved B
        assert torch.equal(A, after_2[module][1])
        assert not torch.equal(B, after_2[module][0])
    assert not (run_dir / "client_adapters").exists()


# -- deployment on loopback ------------------------------------------------------------------------
@pytest.mark.slow
def test_secure_rounds_on_a_loopback_deployment_survive_dropouts(tmp_path: Path) -> None:
    """TLS SuperLink + 4 authenticated SuperNodes (tests/test_deploy.py's harness), ffa under
    SecAgg+ with 3 shares and threshold 2, 2 rounds (a round with all four nodes is
    tests/test_deploy.py's and the simulated SecAgg+ tests').
    Round 1: SuperNode 2 is killed once every key share is out, before its masked vector: the
    others reveal its key shares and Flower removes its pairwise masks from their sum of 3.
    Round 2: SuperNode 3 is killed as soon as it has sent its public keys, so it is lost before
    its key shares go out (fedllm.privacy.secagg_server.Workflow forgets it): 2 are left, and
    the server halts rather than unmask a sum of two (the round is lost, the global stays)."""
    from test_deploy import Federation, fedllm_run, write_orgs

    def wait_count(name: str, text: str, n: int) -> None:
        while fed.log(name).count(text) < n:
            assert time.monotonic() < fed.deadline, f"timed out waiting for {text!r} x{n}"
            assert run.poll() is None, f"the run ended before {text!r} x{n}: {fed.log('run')}"
            time.sleep(0.05)

    union, files = write_orgs(tmp_path / "data", 4, words_each=2)
    args = [
        f"output_dir={tmp_path / 'runs'}",
        "name=sec",
        f"data.source={union}",
        "data.partitioner=iid",
        "data.max_examples=null",
        "data.num_clients=4",
        "aggregator.name=ffa",
        ON,
        "privacy.secure_aggregation.num_shares=3",
        "privacy.secure_aggregation.reconstruction_threshold=2",
        "privacy.secure_aggregation.max_weight=1000",
        "federation.rounds=2",
        "federation.local_steps=3",
        # the deadline of each stage for a live but slow node; a killed one is reported
        # unavailable sooner, 2 heartbeats of 10 s after its last (Federation's Flower timings)
        "federation.round_timeout=40",
    ]
    fed = Federation(tmp_path)
    try:
        fed.start_link(len(files))
        # submitted before the nodes register: its recipe preparation overlaps theirs, and its
        # ServerApp waits for all 4 nodes (up to round_timeout) before round 0
        run = fedllm_run(fed, "run", args)
        nodes = [fed.start(f"node{i}", cmd) for i, cmd in enumerate(fed.register_nodes(files))]
        # Each kill follows the server's own line that the stage is complete: the next stage's
        # messages go out only after it, and a node needs a poll and a process start (≥ 1 s)
        # to answer one, so the kill lands in between. (Nodes' own log lines can come late.)
        wait_count("run", "[Stage 1] Received encrypted key shares from 4 clients", 1)  # round 1
        fed.kill(nodes[2])
        wait_count("run", "[Stage 0] Received public keys from 3 clients", 1)  # round 2
        fed.kill(nodes[3])
        rc = fed.wait_exit(run)
        log = fed.log("run")
    finally:
        fed.stop()
    assert rc == 0, log[-3000:]
    run_dir = tmp_path / "runs" / "sec"
    rows = MetricsLog(run_dir).read()
    server = {x["round"]: x for x in rows if x["kind"] == "server"}
    ok = {
        rnd: {x["partition"] for x in rows if x.get("round") == rnd and x.get("status") == "ok"}
        for rnd in (1, 2)
    }
    assert ok == {1: {0, 1, 3}, 2: set()}, log[-3000:]
    assert server[1]["clients_sampled"] == 4
    assert server[1]["held_out_loss"] < server[0]["held_out_loss"]
    assert "[Stage 2] Received masked vectors from 3 clients" in log  # round 1: node 2 lost late
    assert "[Stage 2] Received masked vectors from 2 clients" in log  # round 2: node 3 forgotten
    assert "not unmasking a sum of fewer than 3" in log
    assert log.count("Secure aggregation completed.") == 1 and "halted" in log
    train = [x for x in rows if x["kind"] == "client" and x["status"] == "ok"]
    assert train and all(x["secure_aggregation"] == "secagg+" for x in train)
    assert "(masked)" in log
    assert not (run_dir / "client_adapters").exists()


# -- against a hostile server, and a hostile client's clear metrics -------------------------------
@pytest.mark.parametrize(
    ("n", "shares", "threshold", "ok"),
    [
        (3, 1.0, 0.67, True),  # the defaults at 3 clients: k = 3, t = 2
        (4, 1.0, 0.67, True),  # k = 4, t = 3
        (4, 1.0, 0.5, False),  # k = 4, t = 2: two disjoint halves of 2 shares each
        (5, 1.0, 0.5, False),  # k = 5, t = round(2.5) = 2
        (4, 3, 2, True),  # the loopback deployment's: k = 3, t = 2
    ],
)
def test_a_threshold_at_most_half_the_shares_is_refused(
    n: int, shares: float, threshold: float, ok: bool
) -> None:
    overrides = [
        ON,
        "aggregator.name=ffa",
        f"data.num_clients={n}",
        f"lora.ranks={[2] * n}".replace(" ", ""),
        f"privacy.secure_aggregation.num_shares={shares}",
        f"privacy.secure_aggregation.reconstruction_threshold={threshold}",
    ]
    if ok:
        load_recipe(RECIPE, overrides)
    else:
        with pytest.raises(ConfigError, match=r"threshold of 2; it must be above half the shares"):
            load_recipe(RECIPE, overrides)


def test_protocol_numbers_are_flowers() -> None:
    from fedllm.privacy.secagg_common import protocol_numbers

    # by hand from Flower's setup_stage: k = round(f·n) made odd below n, t = max(round(f·k), 2)
    assert protocol_numbers(shares=1.0, threshold=0.67, clients=4) == (4, 3)
    assert protocol_numbers(shares=0.5, threshold=0.67, clients=10) == (5, 3)
    assert protocol_numbers(shares=0.4, threshold=0.67, clients=10) == (
        5,
        3,
    )  # round(4.0) = 4, even and < 10: 5
    assert protocol_numbers(shares=0.1, threshold=0.67, clients=10) == (
        10,
        7,
    )  # k <= 2: every client
    assert protocol_numbers(shares=3, threshold=2, clients=4) == (3, 2)


def test_a_client_refuses_a_plain_training_message_under_secagg() -> None:
    """A server that skips the protocol would get the raw update; the node refuses instead."""
    from flwr.app import ConfigRecord, RecordDict

    from fedllm.privacy.secagg import SecureAggregation

    cfg = secure_cfg()
    plain = RecordDict({"config": ConfigRecord({"server-round": 1})})
    with pytest.raises(ValueError, match="plain training message; refusing"):
        SecureAggregation.wrap_train(
            cfg, plain, context=node_context(0), train=fake_train(updates(cfg))
        )
    # the protocol's own form without its stage record: the masking stage never ran, and the
    # reply would carry the raw vectors (found by an audit; Flower's mod never saw the message)
    skipped = fitins_content(cfg)
    with pytest.raises(ValueError, match=r"outside the SecAgg\+ protocol"):
        SecureAggregation.wrap_train(
            cfg, skipped, context=node_context(0), train=fake_train(updates(cfg))
        )


@pytest.mark.parametrize(
    ("key", "value"), [("secagg-uniform", True), ("secagg-mode", "dense"), ("secagg-width", 2)]
)
def test_a_client_sends_what_its_recipe_says_not_what_the_server_asks(key: str, value) -> None:
    """secagg-uniform=true would make a weighted client drop its weight from the mask and send
    its example count in the clear; the node's own recipe decides."""
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from fedllm.privacy.secagg_client import client_reply

    cfg = secure_cfg()
    content = fitins_content(cfg)
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = {**fitins.config, key: value}
    params = ndarrays_to_parameters([np.zeros((2, 5), np.float32)])
    asked = compat.fitins_to_recorddict(FitIns(params, config), keep_input=True)
    with pytest.raises(ValueError, match=r"the server asked for .* but this recipe gives"):
        client_reply(cfg, asked, context=node_context(0), train=fake_train(updates(cfg)))
    client_reply(
        cfg, content, context=node_context(0), train=fake_train(updates(cfg))
    )  # as asked: fine


def setup_configs(n: int, k: int, t: int):
    from flwr.app import ConfigRecord
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    values = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: k}
    return ConfigRecord({**values, Key.THRESHOLD: t, Key.CLIPPING_RANGE: 8.0})


@pytest.mark.parametrize(
    ("n", "k", "t", "ok"),
    [(3, 3, 2, True), (5, 5, 3, True), (2, 2, 2, False), (5, 2, 2, False), (5, 5, 2, False)],
)
def test_a_client_refuses_a_setup_with_which_the_server_could_unmask_it(n, k, t, ok) -> None:
    from fedllm.privacy.secagg_client import check_stage

    if ok:
        check_stage(setup_configs(n, k, t))
    else:
        with pytest.raises(ValueError, match="would let it unmask this client's update"):
            check_stage(setup_configs(n, k, t))


def test_a_client_refuses_to_send_both_shares_of_one_node() -> None:
    from flwr.app import ConfigRecord
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    from fedllm.privacy.secagg_client import check_stage

    def unmask(active: list[int], dead: list[int]) -> ConfigRecord:
        keys = {Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead}
        return ConfigRecord({Key.STAGE: Stage.UNMASK, **keys})

    check_stage(unmask([1, 2, 3], [4]))
    with pytest.raises(ValueError, match=r"named nodes \[3\] both alive and dropped"):
        check_stage(unmask([1, 2, 3], [3, 4]))
    # 3 clients, threshold 2 (the default 0.67 of 3 shares): one dropout, real or claimed,
    # would give the server the sum of two updates (found by an audit; Flower's mod allows it)
    everyone = ConfigRecord({"sample_num": 3, "share_num": 3})
    with pytest.raises(ValueError, match=r"would unmask a sum of 2 updates"):
        check_stage(unmask([1, 2], [3]), everyone)
    # 4 clients, 3 shares each: two live neighbours of 3, and the fourth client not one of them
    check_stage(unmask([1, 2], [3]), ConfigRecord({"sample_num": 4, "share_num": 3}))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m.pop("steps"), "lack 'steps'"),
        (lambda m: m.update({"partition-id": 99}), "outside the recipe's"),
        (lambda m: m.update({"partition-id": 0}), "claimed by nodes"),
        (lambda m: m.update({"dp-sample-rate": 5e-324}), None),  # no DP here: an ignored extra
        # no screen sees a SecAgg+ update: the next round's download was padded to this rank
        (lambda m: m.update({"rank": 10**13}), "above the recipe's largest"),
    ],
)
def test_a_malformed_clear_reply_refuses_the_round_and_never_ends_it(change, words) -> None:
    """Its vector is already in the masked sum, so the mean is refused (the global stays) and
    the round ends with a row per client; before, a missing key raised out of the workflow."""
    cfg = secure_cfg()
    ups = updates(cfg)
    honest = all_metrics

    def metrics_of(partition: int, rank: int, examples: int) -> dict:
        m = honest(partition, rank, examples)
        if partition == 2:
            change(m)
        return m

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys.modules[__name__], "all_metrics", metrics_of)
        result, before, after, _ = secure_round(cfg, ups)
    statuses = {r.node: r.status for r in result.rows}
    if words is None:
        assert sorted(statuses.values()) == ["ok"] * 3
        return
    bad = [r for r in result.rows if r.status == "rejected"]
    assert bad and all(words in r.reason for r in bad), [r.reason for r in result.rows]
    assert all(
        r.status == "failed" and "round refused" in r.reason for r in result.rows if r not in bad
    )
    assert all(after[m] is before[m] for m in SHAPES), "the previous global stays"


def test_an_aggregate_the_strategy_refuses_fails_the_secure_rounds_rows(monkeypatch) -> None:
    """`LoraStrategy.commit` refuses a non-finite aggregate; the SecAgg+ round says so per row."""
    from fedllm.server.strategy import LoraStrategy

    why = "aggregate refused (m1: NaN or Inf in the aggregate): the global adapter is unchanged"
    monkeypatch.setattr(LoraStrategy, "commit", lambda self, *args, **kwargs: why)
    cfg = secure_cfg()
    result, before, after, _ = secure_round(cfg, updates(cfg))
    assert [r.status for r in result.rows] == ["failed"] * 3
    assert all(r.reason == f"privacy.secure_aggregation: {why}" for r in result.rows)
    assert all(after[m] is before[m] for m in SHAPES)


def test_an_aggregator_that_raises_on_the_mean_is_counted_towards_the_runs_stop(
    monkeypatch,
) -> None:
    """Stop 46 left it: an aggregator raising on a checked mean failed as a protocol error, and
    so never reached the count that ends a run whose aggregator raises 3 rounds running."""
    from fedllm.errors import RunFailed
    from fedllm.server import strategy
    from fedllm.server.app import AGGREGATOR_FAILURES, aggregator_failures

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug in the aggregator")

    monkeypatch.setattr(strategy, "get", lambda name: broken)
    cfg = secure_cfg()
    result, before, after, _ = secure_round(cfg, updates(cfg))
    assert result.aggregator_error == "ZeroDivisionError: a bug in the aggregator"
    assert [r.status for r in result.rows] == ["failed"] * 3
    assert all("aggregate refused (ZeroDivisionError" in r.reason for r in result.rows)
    assert all("protocol" not in r.reason for r in result.rows)
    assert all(after[m] is before[m] for m in SHAPES), "the previous global stays"
    count = 0
    for rnd in range(1, AGGREGATOR_FAILURES):
        count = aggregator_failures(count, result, cfg=cfg, server_round=rnd)
    with pytest.raises(RunFailed, match="raised 3 rounds running"):
        aggregator_failures(count, result, cfg=cfg, server_round=AGGREGATOR_FAILURES)


def _set_weight(value):
    def change(content) -> None:  # the weight Flower's workflow reads in the clear
        from flwr.app import MetricRecord

        content["fitres.num_examples"] = MetricRecord({"num_examples": value})

    return change


def _drop_share(rec) -> None:
    rec[Key.NODE_ID_LIST] = [*list(rec[Key.NODE_ID_LIST])[:-1], 424242]


def _short_array(rec) -> None:
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes

    arrays = [bytes_to_ndarray(b) for b in rec[Key.MASKED_PARAMETERS]]
    rec[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a[:-1]) for a in arrays]


@pytest.mark.parametrize(
    ("stage", "change", "words"),
    [
        ("setup", lambda c: c[RECORD_KEY_CONFIGS].pop(Key.PUBLIC_KEY_1), "'pk1'"),
        (
            "collect_masked_vectors",
            lambda c: _short_array(c.config_records[RECORD_KEY_CONFIGS]),
            "could not be used",
        ),
        ("unmask", lambda c: _drop_share(c[RECORD_KEY_CONFIGS]), "424242"),
        # the weight the server's bound reads must be the one the client claimed and was checked
        ("collect_masked_vectors", _set_weight(1), "is not the claimed weight"),
        ("collect_masked_vectors", _set_weight(float("nan")), "is not the claimed weight"),
    ],
)
def test_a_hostile_protocol_reply_refuses_the_round_and_never_ends_the_run(
    stage: str, change, words: str
) -> None:
    """h93: each of these raised out of Flower's workflow and ended the run (a resume replayed
    the round, and the attack with it)."""
    cfg = secure_cfg()

    def tamper(at, node, reply):
        if node == 1001 and at == stage:
            change(reply.content)
        return reply

    result, before, after, _ = secure_round(cfg, updates(cfg), tamper=tamper)
    assert result.rows and all(r.status in ("failed", "rejected") for r in result.rows)
    assert any(words in (r.reason or "") for r in result.rows), [r.reason for r in result.rows]
    assert all(after[m] is before[m] for m in SHAPES), "the previous global stays"


def test_the_server_refuses_a_weight_above_max_weight() -> None:
    """h103: an honest client refuses to send a weight above max_weight, but the server only
    checked that the weight was the claim: a hostile client's 10⁹ claim weighted the mean."""
    from flwr.app import MetricRecord

    from fedllm.privacy.secagg_server import check_weight, parse_reply

    cfg = secure_cfg("privacy.secure_aggregation.max_weight=500")
    limit = max_weight(cfg)
    for claim, ok in ((500, True), (10**9, False)):
        reply = parse_reply(MetricRecord(all_metrics(0, 2, claim)))
        if ok:
            check_weight(claim, reply, uniform=False, limit=limit)
            continue
        with pytest.raises(ValueError, match=r"weight 1000000000 above .*max_weight=500"):
            check_weight(claim, reply, uniform=False, limit=limit)
    check_weight(1, reply, uniform=True, limit=1.0)  # uniform: every weight is 1


def test_secure_ffa_below_the_largest_rank_goes_on_after_its_first_round() -> None:
    """h105: with aggregator.global_rank below the largest client rank the global A had
    global_rank rows from round 2 on, the masked B the padded width, and the pseudo-client's
    factors did not pair: every round from the second raised, and the run stopped."""
    cfg = secure_cfg("aggregator.global_rank=2")
    assert cfg.max_rank > 2
    result, _, after, _ = secure_round(cfg, updates(cfg), rounds=2)
    assert result.aggregator_error is None
    assert [r.status for r in result.rows] == ["ok"] * cfg.data.num_clients
    assert all(f.rank == 2 for f in after.values())
