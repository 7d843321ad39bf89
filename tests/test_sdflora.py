"""sdflora: the global modules stacked exactly and recompressed by SVD (hand-computed), the split of
each client's adapter into a global and a private local module, and client-level DP noise landing
on the global module only, and a client evaluating its own model (global + local)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedllm.aggregators import Factors, get, round_spec
from fedllm.aggregators.sdflora import split_ranks
from fedllm.client.app import evaluate
from fedllm.deploy.local_grid import server_identity
from fedllm.features import registry
from fedllm.features.sdflora_local import (
    STATE,
    SDFLoRALocal,
    keep,
    split_update,
    stored,
    with_local,
)
from fedllm.features.types import ClientPlan, ClientRound, ClientUpdate
from fedllm.model import wire
from fedllm.model.adapters import to_record
from fedllm.model.base import cached_base_model
from fedllm.recipe import ConfigError, RunConfig, load_recipe

TINY = Path(__file__).parents[1] / "recipes" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe's relative output_dir (where a client writes its local module) under tmp_path."""
    monkeypatch.chdir(tmp_path)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# two rank-1 global modules in orthogonal directions: ½·2·e₁e₁ᵀ + ½·1·e₂e₂ᵀ = diag(1, ½)
C0 = Factors(t([[1.0], [0.0]]), t([[1.0, 0.0]]), 2.0)
C1 = Factors(t([[0.0], [1.0]]), t([[0.0, 1.0]]), 1.0)


def test_hand_computed_stack_then_svd() -> None:
    exact = get("sdflora")([C0, C1], [1.0, 1.0], global_rank=2, method="exact").global_
    torch.testing.assert_close(exact.delta(), t([[1.0, 0.0], [0.0, 0.5]]))
    assert exact.scaling == 1.0
    # default rank: the largest global-module rank (1), the best rank-1 part of diag(1, ½)
    one = get("sdflora")([C0, C1], [1.0, 1.0], method="exact").global_
    assert one.rank == 1
    torch.testing.assert_close(one.delta(), t([[1.0, 0.0], [0.0, 0.0]]))
    # a heavier second client flips which direction survives: diag(2/4, 3/4)
    flip = get("sdflora")([C0, C1], [1.0, 3.0], method="exact").global_
    torch.testing.assert_close(flip.delta(), t([[0.0, 0.0], [0.0, 0.75]]))
    assert round_spec("sdflora").client_options == ("local_fraction",)


@pytest.mark.parametrize(
    "rank, fraction, ranks",
    [
        (4, 0.5, (2, 2)),
        (3, 0.5, (2, 1)),
        (1, 0.5, (1, 0)),
        (5, 0.25, (4, 1)),
        (2, 0.99, (1, 1)),
        (8, 0.0, (8, 0)),
    ],
)
def test_split_ranks(rank: int, fraction: float, ranks: tuple[int, int]) -> None:
    assert split_ranks(rank, fraction) == ranks


def test_start_and_split_keep_each_modules_delta() -> None:
    received = {"q": Factors(t([[2.0, 4.0]]), t([[1.0], [1.0]]), 1.0)}  # global at rank 2
    local = {"q": (t([[0.5]]), t([[3.0]]))}
    start = with_local(received, local, ranks=(1, 1), scaling=2.0, seed=0)["q"]
    # global cut to 1 at scaling 2: B = 2/2; the local module as kept
    torch.testing.assert_close(start.B, t([[1.0, 0.5]]))
    torch.testing.assert_close(start.A, t([[1.0], [3.0]]))
    assert start.scaling == 2.0
    trained = {"q": Factors(t([[1.5, 0.5]]), t([[1.0], [2.0]]), 2.0)}
    shared, kept = split_update(trained, global_rank=1, global_scaling=4.0)
    # the global module at its own scaling 4: B = 1.5·2/4, ΔW = 4·0.75·1 = 2·1.5·1
    torch.testing.assert_close(shared["q"].B, t([[0.75]]))
    assert shared["q"].scaling == 4.0 and shared["q"].delta().item() == 3.0
    torch.testing.assert_close(kept["q"][0], t([[0.5]]))
    torch.testing.assert_close(kept["q"][1], t([[2.0]]))


def recipe(*overrides: str) -> RunConfig:
    return load_recipe(TINY, ["aggregator.name=sdflora", "lora.ranks=[4,4,4]", *overrides])


def client_round(cfg: RunConfig, state: RecordDict, *, server_round: int = 1) -> ClientRound:
    return ClientRound(
        cfg=cfg,
        partition=1,
        server_round=server_round,
        spec=round_spec("sdflora"),
        config=ConfigRecord({"server-round": server_round, "option.local_fraction": 0.5}),
        node_config={},
        state=state,
        seed=3,
        plan=ClientPlan(partition=1, rank=4),
    )


def received(seed: int, rank: int = 4) -> dict[str, Factors]:
    g = torch.Generator().manual_seed(seed)
    return {"q": Factors(torch.randn(6, rank, generator=g), torch.randn(rank, 5, generator=g), 1.0)}


def test_the_local_module_starts_fresh_then_persists_in_the_node_state() -> None:
    cfg = recipe()
    s = cfg.client_scaling(4)  # α/4 = 4
    state = RecordDict()
    f1, rnd = SDFLoRALocal(cfg), client_round(cfg, state)
    start = f1.start(received(0), rnd)["q"]
    assert start.rank == 4 and start.scaling == s
    torch.testing.assert_close(start.B[:, :2] * s, received(0)["q"].B[:, :2])  # global cut to 2
    assert not start.B[:, 2:].any() and 0 < start.A[2:].abs().max() <= 1 / 5**0.5  # fresh local
    again = SDFLoRALocal(cfg).start(received(0), client_round(cfg, RecordDict()))["q"]
    assert torch.equal(again.A[2:], start.A[2:])  # seeded by the run's seed and the partition
    g = torch.Generator().manual_seed(1)
    trained = {"q": Factors(torch.randn(6, 4, generator=g), torch.randn(4, 5, generator=g), s)}
    reply = f1.post_process(ClientUpdate(trained, {"q": start}, 4), rnd)
    assert reply.rank == 2 and reply.factors["q"].scaling == cfg.client_scaling(2)
    torch.testing.assert_close(
        reply.factors["q"].delta(), Factors(trained["q"].B[:, :2], trained["q"].A[:2], s).delta()
    )
    assert reply.start["q"].rank == 2
    kept = stored(state)["q"]
    assert torch.equal(kept[0], trained["q"].B[:, 2:]) and torch.equal(kept[1], trained["q"].A[2:])
    # next round: a new global (rank 2 now), the same local module
    nxt = SDFLoRALocal(cfg).start(received(5, rank=2), client_round(cfg, state, server_round=2))
    assert torch.equal(nxt["q"].B[:, 2:], kept[0]) and torch.equal(nxt["q"].A[2:], kept[1])


def test_client_level_dp_noises_the_global_module_only() -> None:
    cfg = recipe(
        "privacy.mode=client",
        "privacy.noise_at=client",
        "privacy.client_noise_multiplier=1.0",
        "aggregator.weighting=uniform",
        "privacy.delta=1e-3",
    )
    features = registry.build(cfg)
    assert [f.name for f in features if f.name in ("sdflora_local", "client_dp")] == [
        "sdflora_local",
        "client_dp",
    ]
    state = RecordDict()
    rnd = client_round(cfg, state)
    start = features[[f.name for f in features].index("sdflora_local")].start(received(0), rnd)
    g = torch.Generator().manual_seed(2)
    trained = {
        m: Factors(f.B + 0.01 * torch.randn(f.B.shape, generator=g), f.A, f.scaling)
        for m, f in start.items()
    }
    update = ClientUpdate(trained, start, 4)
    for f in features:
        update = f.post_process(update, rnd)
    assert update.rank == 2
    clean, local = split_update(trained, global_rank=2, global_scaling=cfg.client_scaling(2))
    # the reply (global module) carries noise; the local module is kept exactly as trained
    assert not torch.allclose(update.factors["q"].B, clean["q"].B, atol=1e-3)
    kept = stored(state)["q"]
    assert torch.equal(kept[0], local["q"][0]) and torch.equal(kept[1], local["q"][1])
    assert STATE in state


def test_combinations_it_cannot_run_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.mode='sample'.*privacy\.mode='client'"):
        recipe("privacy.mode=sample", "privacy.noise_multiplier=1.0")
    with pytest.raises(ConfigError, match=r"features\.personal_adapter"):
        recipe("features.personal_adapter={}")
    recipe("features.personal_adapter={enabled: false}")
    with pytest.raises(ConfigError, match=r"aggregator\.options\.local_fraction"):
        recipe("aggregator.options={local_fraction: 1.0}")
    with pytest.raises(ConfigError, match=r"compression\.topk"):
        recipe("compression.topk=0.1")
    with pytest.raises(ConfigError, match=r"adaptive: not supported"):  # h98
        recipe("adaptive={ranks: [2, 4]}")


def test_personalise_is_the_global_cut_plus_the_kept_local_module() -> None:
    cfg = recipe()
    g = torch.Generator().manual_seed(0)  # fixed values: float32 tolerances, any test order
    s4, s2 = cfg.client_scaling(4), cfg.client_scaling(2)
    glob = {
        "q": Factors(torch.randn(6, 2, generator=g) * 0.1, torch.randn(2, 5, generator=g), s2)
    }  # a node's r_g = 2 cut
    fresh = SDFLoRALocal(cfg).personalise(glob, client_round(cfg, RecordDict()))["q"]
    assert (fresh.rank, fresh.scaling) == (4, s4)
    torch.testing.assert_close(fresh.delta(), glob["q"].delta())  # B_l = 0 before round one
    state = RecordDict()
    local = (torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g))
    keep(state, {"q": local})
    own = SDFLoRALocal(cfg).personalise(glob, client_round(cfg, state))["q"]
    expected = glob["q"].delta() + s4 * local[0] @ local[1]
    torch.testing.assert_close(own.delta(), expected)


def test_a_client_evaluates_its_own_model_not_the_global_module_alone(tmp_path: Path) -> None:
    """The ClientApp's evaluate under sdflora = a plain evaluation of [global cut | local]."""
    cfg = recipe(f"output_dir={tmp_path}", "data.max_examples=200")
    base, _ = cached_base_model(cfg)
    layers = base.model.layers
    shapes = {
        f"model.layers.{i}.self_attn.{p}": tuple(getattr(layers[i].self_attn, p).weight.shape)
        for i in range(len(layers))
        for p in ("q_proj", "v_proj")
    }
    g = torch.Generator().manual_seed(4)
    s2, s4 = cfg.client_scaling(2), cfg.client_scaling(4)

    def pair(d: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(d, 2, generator=g) * 0.05, torch.randn(2, k, generator=g) * 0.5

    glob = {m: Factors(*pair(d, k), s2) for m, (d, k) in shapes.items()}  # server cut to r_g = 2
    local = {m: pair(d, k) for m, (d, k) in shapes.items()}
    joined = {  # by hand: [B_g·s₂/s₄ | B_l], [A_g; A_l] at the rank-4 scaling
        m: Factors(torch.cat([f.B * (s2 / s4), local[m][0]], 1), torch.cat([f.A, local[m][1]]), s4)
        for m, f in glob.items()
    }

    def held_out_loss(run: RunConfig, factors, scaling: float, state: RecordDict) -> float:
        spec = round_spec(run.aggregator.name)
        config = {"server-round": 2, "global-scaling": scaling, "recipe-hash": run.fingerprint()}
        config |= wire.spec_config(spec) | wire.options_config(spec, run.aggregator.options)
        content = RecordDict({"global": to_record(factors), "config": ConfigRecord(config)})
        with server_identity(1):  # a message is made by a run's server
            msg = Message(content, dst_node_id=1, message_type=MessageType.EVALUATE)
        context = Context(0, 1, {"partition-id": 1}, state, {})
        return float(evaluate(run, msg, context=context).content["metrics"]["held-out-loss"])

    kept = RecordDict()
    keep(kept, local)
    own = held_out_loss(cfg, glob, s2, kept)
    plain = cfg.model_copy(update={"aggregator": cfg.aggregator.model_copy(update={"name": "svd"})})
    assert own == pytest.approx(held_out_loss(plain, joined, s4, RecordDict()), rel=1e-6)
    assert abs(own - held_out_loss(plain, glob, s2, RecordDict())) > 1e-3  # the local part counts


def test_a_resumed_node_takes_its_local_module_back_from_its_own_folder(tmp_path: Path) -> None:
    """A resumed simulation's nodes are new processes with empty state: the local module comes
    back from the file the client wrote in its own folder; a live node's state wins."""
    cfg = recipe(f"output_dir={tmp_path}")
    s = cfg.client_scaling(4)
    state = RecordDict()
    feature, rnd = SDFLoRALocal(cfg), client_round(cfg, state)
    start = feature.start(received(0), rnd)
    g = torch.Generator().manual_seed(1)
    trained = {"q": Factors(torch.randn(6, 4, generator=g), torch.randn(4, 5, generator=g), s)}
    feature.post_process(ClientUpdate(trained, start, 4), rnd)
    written = tmp_path / "tiny" / "clients" / "1" / "node_state" / f"{STATE}.safetensors"
    assert written.is_file()
    kept = stored(state)["q"]
    fresh = RecordDict()  # the same partition on a new node
    nxt = SDFLoRALocal(cfg).start(received(5, rank=2), client_round(cfg, fresh, server_round=2))
    assert torch.equal(stored(fresh)["q"][0], kept[0]) and torch.equal(
        stored(fresh)["q"][1], kept[1]
    )
    assert torch.equal(nxt["q"].B[:, 2:], kept[0]) and torch.equal(nxt["q"].A[2:], kept[1])
    evaluating = RecordDict()  # a resumed node asked to evaluate before it trains
    glob = {"q": received(5, rank=2)["q"]}
    SDFLoRALocal(cfg).personalise(glob, client_round(cfg, evaluating, server_round=2))
    assert torch.equal(stored(evaluating)["q"][0], kept[0])
    live = RecordDict()
    keep(live, {"q": (torch.zeros(6, 2), torch.ones(2, 5))})
    SDFLoRALocal(cfg).start(received(5, rank=2), client_round(cfg, live, server_round=2))
    assert not stored(live)["q"][0].any(), "a live node's own local module wins"


def test_in_a_private_run_the_local_module_stays_out_of_the_run_directory(tmp_path: Path) -> None:
    """Trained without noise and never sent, the local module of a private run is written only
    into a node's own personal-dir, never into the run directory (the server's, in a simulation)."""
    cfg = recipe(
        f"output_dir={tmp_path}",
        "privacy.mode=client",
        "privacy.noise_at=client",
        "privacy.client_noise_multiplier=1.0",
        "aggregator.weighting=uniform",
        "privacy.delta=1e-3",
    )
    s = cfg.client_scaling(4)
    trained = {"q": Factors(torch.ones(6, 4), torch.ones(4, 5), s)}

    def one_round(rnd: ClientRound) -> None:
        feature = SDFLoRALocal(cfg)
        feature.post_process(ClientUpdate(trained, feature.start(received(0), rnd), 4), rnd)

    state = RecordDict()
    one_round(client_round(cfg, state))
    assert STATE in state and not (tmp_path / "tiny").exists()
    mine = {"personal-dir": str(tmp_path / "org1")}
    one_round(dataclasses.replace(client_round(cfg, RecordDict()), node_config=mine))
    assert (tmp_path / "org1" / "node_state" / f"{STATE}.safetensors").is_file()
    fresh = dataclasses.replace(client_round(cfg, RecordDict(), server_round=2), node_config=mine)
    SDFLoRALocal(cfg).start(received(5, rank=2), fresh)
    assert torch.equal(stored(fresh.state)["q"][0], torch.ones(6, 2))
    assert not (tmp_path / "tiny").exists()
