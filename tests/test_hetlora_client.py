"""HetLoRA's client-side rank self-pruning: tail penalty, prune rule, options, and an end-to-end
run through the Flower simulation engine in which clients' ranks shrink."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedllm.aggregators import Factors, get, round_spec
from fedllm.cli import main
from fedllm.client.train import train_local
from fedllm.features import hetlora_prune as hc
from fedllm.model import wire as rounds
from fedllm.model.adapters import attach_lora
from fedllm.model.loading import load_base_model
from fedllm.model.tiny import build_tiny_model
from fedllm.recipe import ConfigError, build_config

# module m1: rank 4, γ = 0.5 → tail = last 2 components
B1 = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 4.0]])  # tail [[3, 0], [0, 4]]: ‖·‖ = 5
A1 = torch.tensor(
    [[9.0, 9.0, 9.0], [9.0, 9.0, 9.0], [1.0, 2.0, 2.0], [0.0, 0.0, 0.0]]
)  # tail rows [[1, 2, 2], [0, 0, 0]]: ‖·‖ = 3
# module m2: rank 4 too (one client, one rank), tail [[0, 0], [1, 0]] / [[0, 6, 8], [0, 0, 0]]
B2 = torch.tensor([[7.0, 7.0, 0.0, 0.0], [7.0, 7.0, 1.0, 0.0]])  # tail ‖·‖ = 1
A2 = torch.tensor([[5.0, 5.0, 5.0], [5.0, 5.0, 5.0], [0.0, 6.0, 8.0], [0.0, 0.0, 0.0]])  # 10


# the tail of factors() halved then pruned 4 → 2 at scaling 8/r (B × 1/4), t = 1 at rank 2
PRUNED_TAIL = 4.5 * 3**0.5 + 8.75 * 6**0.5


def factors(scaling: float = 2.0) -> dict[str, Factors]:
    return {
        "m1": Factors(B1.clone(), A1.clone(), scaling),
        "m2": Factors(B2.clone(), A2.clone(), scaling),
    }


def test_tail_size_floors_gamma_r_keeps_at_least_one_and_one_head() -> None:
    assert hc.tail_size(4, 0.5) == 2
    assert hc.tail_size(30, 0.1) == 3
    assert hc.tail_size(8, 0.1) == 1  # ⌊0.8⌋ = 0 → at least one component
    assert hc.tail_size(2, 0.9) == 1  # never the whole adapter
    assert hc.tail_size(1, 0.5) == 0
    assert hc.tail_size(100, 0.29) == 29  # 0.29·100 = 28.999… in floating point


def test_penalty_on_known_factors() -> None:
    # 5·3 + 1·10 = 25
    assert float(hc.tail_penalty(factors(), 0.5)) == pytest.approx(25.0)
    # γ = 0.25: tail = last component only: m1 ‖[0, 4]‖·‖0‖ = 0, m2 ‖[0, 0]‖·‖0‖ = 0
    assert float(hc.tail_penalty(factors(), 0.25)) == 0.0
    # (B, A) pairs work too; rank 1 has no tail
    assert float(hc.tail_penalty({"x": (torch.ones(2, 1), torch.ones(1, 3))}, 0.5)) == 0.0


def test_gradient_flows_only_into_the_tail() -> None:
    B = B1.clone().requires_grad_(True)
    A = A1.clone().requires_grad_(True)
    hc.tail_penalty({"m1": (B, A)}, 0.5).backward()
    # d(‖Bt‖‖At‖)/dBt = ‖At‖·Bt/‖Bt‖ = 3/5·Bt; d/dAt = 5/3·At; the head gets nothing
    expected_B = torch.zeros_like(B1)
    expected_B[:, 2:] = 0.6 * B1[:, 2:]
    expected_A = torch.zeros_like(A1)
    expected_A[2:] = (5 / 3) * A1[2:]
    torch.testing.assert_close(B.grad, expected_B)
    torch.testing.assert_close(A.grad, expected_A)


def test_prune_rule() -> None:
    # the tail value is 25 (γ = 0.5); prune to 4 − 2 = 2 only if it is below the previous one
    first = hc.maybe_prune(factors(), None, gamma=0.5, min_rank=1)
    assert (first.rank, first.pruned, first.value) == (4, False, pytest.approx(25.0))
    assert not hc.maybe_prune(factors(), 25.0, gamma=0.5, min_rank=1).pruned  # equal: keep
    assert not hc.maybe_prune(factors(), 24.0, gamma=0.5, min_rank=1).pruned  # grew: keep
    cut = hc.maybe_prune(factors(), 30.0, gamma=0.5, min_rank=1, scaling=lambda r: 8.0 / r)
    assert cut.pruned and cut.rank == 2
    for m, f in cut.factors.items():
        assert f.rank == 2 and f.scaling == 4.0
        # the kept components' ΔW is unchanged: B rescaled by 2/4
        torch.testing.assert_close(f.delta(), factors()[m].truncate(2).delta())
    torch.testing.assert_close(cut.factors["m1"].B, 0.5 * B1[:, :2])
    torch.testing.assert_close(cut.factors["m1"].A, A1[:2])
    # never below min_rank
    assert hc.maybe_prune(factors(), 30.0, gamma=0.5, min_rank=3).rank == 3
    assert not hc.maybe_prune(factors(), 30.0, gamma=0.5, min_rank=4).pruned
    with pytest.raises(ValueError, match="share one rank"):
        hc.maybe_prune(
            {"a": Factors(torch.ones(2, 2), torch.ones(2, 3), 1.0), **factors()},
            1.0,
            gamma=0.5,
            min_rank=1,
        )


def test_state_persists_rank_and_lowers_the_plan() -> None:
    from fedllm.features.types import ClientPlan

    state = RecordDict()
    opts = hc.PruneOptions(prune_lambda=1.0, prune_gamma=0.5, min_rank=1)
    start = factors()
    _, _, rank, metrics = hc.prune_reply(
        factors(), start, opts=opts, state=state, rank=4, scaling=lambda r: 8.0 / r
    )
    assert rank == 4 and metrics == {"hetlora-tail": pytest.approx(25.0)}  # first round: record
    assert hc.remembered(state) == (4, pytest.approx(25.0))
    smaller = {m: Factors(f.B * 0.5, f.A, f.scaling) for m, f in factors().items()}  # value 12.5
    out, start2, rank, _ = hc.prune_reply(
        smaller, start, opts=opts, state=state, rank=4, scaling=lambda r: 8.0 / r
    )
    assert rank == 2 and all(f.rank == 2 for f in (*out.values(), *start2.values()))
    # recorded: the pruned factors' own tail at rank 2 (t = 1, B halved by the prune and by
    # 8/2 over 8/4): ‖B1[:,1]‖/4·‖A1[1]‖ + ‖B2[:,1]‖/4·‖A2[1]‖ = 4.5√3 + 8.75√6
    assert hc.remembered(state) == (2, pytest.approx(PRUNED_TAIL))
    plan = ClientPlan(partition=0, rank=4, pruning=0.0, quantization=None)
    assert hc.planned(plan, state).rank == 2
    assert hc.planned(plan, RecordDict()).rank == 4
    # off: unchanged, nothing remembered
    fresh = RecordDict()
    assert (
        hc.prune_reply(
            factors(), start, opts=hc.PruneOptions(), state=fresh, rank=4, scaling=float
        )[2]
        == 4
    )
    assert hc.STATE not in fresh


def test_after_a_prune_the_next_round_compares_tails_at_the_new_rank() -> None:
    """Stop 48: the value kept after a prune was the rank-4 tail (12.5), compared next round
    with a rank-2 tail of other components at another scaling: a rank-2 tail that shrank from
    29.2 to 23.4 did not prune again (23.4 > 12.5). A value kept at another rank than the
    round's (the server lowered it) only records."""
    opts = hc.PruneOptions(prune_lambda=1.0, prune_gamma=0.5, min_rank=1)
    state = RecordDict({hc.STATE: ConfigRecord({"rank": 2, "tail": PRUNED_TAIL, "tail-rank": 2})})
    at2 = {m: f.truncate(2, 4.0) for m, f in factors().items()}
    shrunk = {m: Factors(f.B * 0.4, f.A, f.scaling) for m, f in at2.items()}  # tail 29.2 → 23.4
    assert float(hc.tail_penalty(shrunk, 0.5)) == pytest.approx(0.8 * PRUNED_TAIL)
    _, _, rank, _ = hc.prune_reply(
        shrunk, shrunk, opts=opts, state=state, rank=2, scaling=lambda r: 8 / r
    )
    assert rank == 1
    other = RecordDict({hc.STATE: ConfigRecord({"rank": 4, "tail": 1e9})})
    _, _, rank, _ = hc.prune_reply(
        shrunk, shrunk, opts=opts, state=other, rank=2, scaling=lambda r: 8 / r
    )
    assert rank == 2 and hc.remembered(other) == (2, pytest.approx(0.8 * PRUNED_TAIL))
    # a node's state from before stop 48 kept the pre-prune tail beside the pruned rank, with
    # no "tail-rank": its value is not the rank's and only records (h103)
    old = RecordDict({hc.STATE: ConfigRecord({"rank": 2, "tail": 1e9})})
    assert hc.remembered(old) == (2, None)
    _, _, rank, _ = hc.prune_reply(
        shrunk, shrunk, opts=opts, state=old, rank=2, scaling=lambda r: 8 / r
    )
    assert rank == 2 and hc.remembered(old) == (2, pytest.approx(0.8 * PRUNED_TAIL))


def prune_round(cfg, state: RecordDict, trained, *, server_round: int, node_config=None):
    """HetLoRAPrune's hooks for client 0 in `server_round` (γ = 0.5): its plan, then its reply."""
    from fedllm.features.types import ClientPlan, ClientRound, ClientUpdate

    spec = round_spec("hetlora")
    options = {"prune_lambda": 1.0, "prune_gamma": 0.5}
    config = {"server-round": server_round, **rounds.options_config(spec, options)}
    plan = ClientPlan(partition=0, rank=4, pruning=0.0, quantization=None)
    rnd = ClientRound(
        cfg, 0, server_round, spec, ConfigRecord(config), node_config or {}, state, 0, plan
    )
    feature = hc.HetLoRAPrune(cfg)
    rnd.plan = feature.plan(rnd.plan, rnd)
    cut = {m: f.truncate(rnd.plan.rank) for m, f in trained.items()}
    return rnd.plan, feature.post_process(ClientUpdate(cut, cut, rnd.plan.rank), rnd)


def hetlora_recipe(tmp_path: Path):
    on = {"name": "hetlora", "options": {"prune_lambda": 1.0, "prune_gamma": 0.5}}
    return build_config(
        {
            "data": {"num_clients": 2},
            "lora": {"ranks": 4, "alpha": 8},
            "aggregator": on,
            "output_dir": str(tmp_path),
            "name": "r",
        }
    )


def test_a_resumed_node_takes_its_pruned_rank_back_from_its_own_folder(tmp_path: Path) -> None:
    """A resumed simulation's nodes are new processes with empty state: the pruned rank (and the
    tail value the next prune compares with) come back from the file the client wrote."""
    cfg = hetlora_recipe(tmp_path)
    state = RecordDict()
    prune_round(cfg, state, factors(), server_round=1)  # records the tail (25)
    smaller = {m: Factors(f.B * 0.5, f.A, f.scaling) for m, f in factors().items()}  # 12.5
    _, update = prune_round(cfg, state, smaller, server_round=2)
    assert update.rank == 2 and hc.remembered(state) == (2, pytest.approx(PRUNED_TAIL))
    written = tmp_path / "r" / "clients" / "0" / "node_state" / f"{hc.STATE}.json"
    assert written.is_file()
    fresh = RecordDict()  # the same partition on a new node
    plan, _ = prune_round(cfg, fresh, factors(), server_round=3)
    assert plan.rank == 2, "it trains at the rank it pruned to, not the recipe's 4"
    live = RecordDict({hc.STATE: ConfigRecord({"rank": 4, "tail": 99.0})})
    plan, _ = prune_round(cfg, live, factors(), server_round=3)
    assert plan.rank == 4, "a live node's own state wins"


def test_options_travel_to_clients_not_to_the_aggregation() -> None:
    spec = round_spec("hetlora")
    assert set(spec.client_options) == set(hc.OPTIONS)
    assert rounds.spec_of(ConfigRecord(rounds.spec_config(spec))) == spec
    options = {"prune_lambda": 0.5, "prune_gamma": 0.2, "min_rank": 2}
    config = ConfigRecord({**rounds.spec_config(spec), **rounds.options_config(spec, options)})
    assert hc.options_of(config) == hc.PruneOptions(0.5, 0.2, 2)
    assert hc.options_of(ConfigRecord({})) == hc.PruneOptions()  # off by default
    assert rounds.server_options(spec, options) == {}
    f = Factors(torch.ones(3, 2), torch.ones(2, 4), 1.0)
    get("hetlora")([f], [1.0], **rounds.server_options(spec, options))  # no unexpected options


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"prune_lambda": -1.0}, r"prune_lambda: must be >= 0"),
        ({"prune_gamma": 1.0}, r"prune_gamma: must be in \(0, 1\)"),
        ({"prune_gamma": 0}, r"prune_gamma"),
        ({"min_rank": 0}, r"min_rank: must be an integer >= 1"),
        ({"min_rank": 1.5}, r"min_rank"),
        ({"prune_lamda": 0.1}, r"prune_lamda: unknown option.*did you mean 'prune_lambda'"),
    ],
)
def test_bad_options_are_named_at_load(options, match) -> None:
    with pytest.raises(ConfigError, match=match):
        build_config({"aggregator": {"name": "hetlora", "options": options}})


def test_unsupported_combinations_are_refused() -> None:
    on = {"name": "hetlora", "options": {"prune_lambda": 0.1}}
    with pytest.raises(ConfigError, match=r"privacy\.mode='sample'"):
        build_config({"aggregator": on, "privacy": {"mode": "sample", "noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match=r"compression\.topk"):
        build_config({"aggregator": on, "compression": {"topk": 0.1}})
    build_config({"aggregator": {"name": "hetlora", "options": {"prune_lambda": 0.0}}})
    # client-level DP: the kept rank is read from the update, raw unless the client noised it
    client = {"mode": "client", "client_noise_multiplier": 1.0}
    uniform = {**on, "weighting": "uniform"}
    with pytest.raises(ConfigError, match=r"noise_at='server': the rank a client keeps"):
        build_config({"aggregator": uniform, "privacy": client})
    build_config({"aggregator": uniform, "privacy": {**client, "noise_at": "client"}})


def test_train_local_adds_the_regulariser(tmp_path: Path) -> None:
    texts = [f"word {i} means the thing number {i} in a list" for i in range(60)]
    tiny = build_tiny_model(tmp_path / "tiny", texts=texts, vocab_size=300)
    base, tok = load_base_model(tiny)
    examples = [{"input_ids": ids, "labels": ids} for ids in (tok(t).input_ids for t in texts[:16])]
    tails = {}
    for lam in (0.0, 50.0):
        model = attach_lora(base, rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj"])
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a nonzero B, so the tail has a norm (and a gradient)
            for B, _ in hc.lora_pairs(model).values():
                B.copy_(torch.randn(B.shape, generator=g) * 0.1)
        calls = []

        def reg(model=model, lam=lam, calls=calls) -> torch.Tensor:
            calls.append(1)
            return lam * hc.tail_penalty(model, 0.25)

        train_local(
            model,
            examples,
            steps=5,
            batch_size=4,
            pad_id=tok.pad_token_id,
            optimizer="sgd",
            lr=0.01,
            max_grad_norm=None,
            regularizer=reg,
        )
        assert len(calls) == 5
        tails[lam] = float(hc.tail_penalty(model, 0.25))
        model.unload()
    assert tails[50.0] < 0.5 * tails[0.0]


@pytest.mark.slow
def test_ranks_shrink_through_the_simulation_engine(tmp_path: Path) -> None:
    recipe = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
    code = main(
        [
            "run",
            str(recipe),
            f"output_dir={tmp_path}",
            "name=prune",
            "federation.rounds=3",
            "federation.local_steps=5",
            "lora.ranks=[4,8,8]",
            "aggregator.name=hetlora",
            "aggregator.options={prune_lambda: 5.0, prune_gamma: 0.5, min_rank: 2}",
        ]
    )
    assert code == 0
    rows = [json.loads(x) for x in (tmp_path / "prune" / "metrics.jsonl").read_text().splitlines()]
    clients = [x for x in rows if x["kind"] == "client"]
    ranks = {(x["round"], x["partition"]): x["rank"] for x in clients}
    print("ranks per (round, partition):", sorted(ranks.items()))
    print("tail values:", [(x["round"], x["partition"], x["hetlora_tail"]) for x in clients])
    assert all(x["status"] == "ok" for x in clients)
    assert {ranks[(1, p)] for p in range(3)} == {4, 8}  # round 1 only records the tail value
    assert all("hetlora_tail" in x for x in clients)
    for p in range(3):  # never grows, never below min_rank
        seq = [ranks[(r, p)] for r in (1, 2, 3)]
        assert seq == sorted(seq, reverse=True) and min(seq) >= 2
    assert any(ranks[(3, p)] < ranks[(1, p)] for p in range(3)), "some client must prune"
    server = {x["round"]: x for x in rows if x["kind"] == "server"}
    assert set(server) == {0, 1, 2, 3}  # the server kept aggregating the smaller ranks
