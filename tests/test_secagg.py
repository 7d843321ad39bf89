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

from fedllm.aggregators import Factors, get
from fedllm.privacy.secagg import max_weight
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
    # a resolved recipe (recipe.yaml) loads back; the fingerprint ignores the option
    plain = load_recipe(RECIPE, ["aggregator.name=ffa"])
    assert cfg.fingerprint() == plain.fingerprint()


def test_vectors_have_one_shape_for_every_rank() -> None:
    from fedllm.privacy.secagg import vectors

    d, k = 6, 5
    for r in (1, 3):
        u = {"m": Factors(torch.randn(d, r), torch.randn(r, k), 16.0 / r)}
        ffa, (B, A), (W,) = vectors(u, "ffa", 3), vectors(u, "fedit", 3), vectors(u, "dense", 3)
        assert ffa[0].shape == B.shape == (d, 3) and A.shape == (3, k) and W.shape == (d, k)
        np.testing.assert_allclose(B[:, :r], (u["m"].B * u["m"].scaling).double().numpy())
        assert not B[:, r:].any() and not A[r:].any()
        np.testing.assert_allclose(W, u["m"].delta().double().numpy(), rtol=1e-5, atol=1e-6)


# -- end to end ------------------------------------------------------------------------------------
def oracle_client_app(cfg, folder: Path):
    """fedllm's ClientApp, writing each client's unmasked reply vectors before they are masked."""
    from flwr.clientapp import ClientApp
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from fedllm.client import app as client
    from fedllm.privacy import secagg

    app = ClientApp()

    @app.train(mods=[secagg.mod])
    def _train(msg, context):
        reply = client.train(cfg, msg, context)
        if secagg.FITINS in msg.content.config_records:
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
        return client.evaluate(cfg, msg, context)

    return app


def run_secure(tmp: Path, aggregator: str, rounds: int):
    import ray.cloudpickle
    from flwr.simulation import run_simulation

    from fedllm.cli import absolute_paths, prepare
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
    SecAgg+ with 3 shares and threshold 2, 3 rounds.
    Round 2: SuperNode 3 is killed as soon as it has sent its public keys, so it is lost before
    its key shares go out (fedllm.privacy.secagg.Workflow forgets it).
    Round 3: SuperNode 2 is killed once every key share is out, before its masked vector: the
    others reveal its key shares and Flower removes its pairwise masks from their sum."""
    from test_deploy import Federation, fedllm_run, write_orgs

    def wait_count(name: str, text: str, n: int) -> None:
        while fed.log(name).count(text) < n:
            assert time.monotonic() < fed.deadline, f"timed out waiting for {text!r} x{n}"
            assert run.poll() is None, f"the run ended before {text!r} x{n}: {fed.log('run')}"
            time.sleep(0.2)

    union, files = write_orgs(tmp_path / "data", 4, words_each=2)
    fed = Federation(tmp_path)
    try:
        nodes = [fed.start(f"node{i}", cmd) for i, cmd in enumerate(fed.secure_link(files))]
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
            "federation.rounds=3",
            "federation.local_steps=3",
            "federation.round_timeout=40",
        ]
        run = fedllm_run(fed, "run", args)
        fed.wait_for("run", "round 2/3 train: SecAgg+")
        wait_count("node3", "stage 0 completes", 2)  # round 2: its public keys are sent
        fed.kill(nodes[3])
        fed.wait_for("run", "round 3/3 train: SecAgg+")
        wait_count("node2", "stage 1 completes", 3)  # round 3: its key shares are sent
        wait_count("run", "[Stage 1] Received encrypted key shares from 3 clients", 2)
        fed.kill(nodes[2])
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
        for rnd in (1, 2, 3)
    }
    assert ok == {1: {0, 1, 2, 3}, 2: {0, 1, 2}, 3: {0, 1}}, log[-3000:]
    assert server[2]["clients_sampled"] == 4
    assert server[3]["held_out_loss"] < server[0]["held_out_loss"]
    assert "[Stage 0] Received public keys from 3 clients" in log  # round 2: node 3 lost early
    assert "[Stage 2] Received masked vectors from 2 clients" in log  # round 3: node 2 lost late
    assert log.count("Secure aggregation completed.") >= 3 and "halted" not in log
    train = [x for x in rows if x["kind"] == "client"]
    assert all(x["secure_aggregation"] == "secagg+" for x in train)
    assert "(masked)" in log
    assert not (run_dir / "client_adapters").exists()
