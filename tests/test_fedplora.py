"""fedplora: R one-rank modules, a seeded selection per client and target, the rest folded into
the base, and a module-wise mean over the clients that trained each module (hand-computed); the
client and server hooks; and (slow) one tiny federation of each 2026 method (fedplora, prelort,
sdflora)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from peft import LoraConfig, get_peft_model

from fedllm.aggregators import Factors, get, round_spec
from fedllm.aggregators.fedplora import (
    check_selection,
    draw,
    draw_digest,
    expand,
    module_alpha,
    select,
    split,
    target_seed,
    trainers_mean,
)
from fedllm.client import round as client_round_module
from fedllm.client.app import train_content
from fedllm.client.round import client_seed
from fedllm.features.fedplora_fold import METRIC, FedPLoRAFold, per_target
from fedllm.features.types import ClientPlan, ClientRound, Download, TrainReply
from fedllm.model import wire
from fedllm.model.adapters import from_record, to_record, write_factors
from fedllm.model.base import cached_base_model
from fedllm.recipe import ConfigError, RunConfig, load_recipe

TINY = Path(__file__).parents[1] / "recipes" / "tiny.yaml"


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# The global: three one-rank modules of a 1×1 module (b_j, a_j) = (1, 1), (2, 1), (3, 1).
GLOBAL = Factors(t([[1.0, 2.0, 3.0]]), t([[1.0], [1.0], [1.0]]), 1.0)
# Client 0 (rank 1, s = 2) trained module 2; client 1 (rank 2, s = 1) trained modules 0 and 2.
C0 = Factors(t([[5.0]]), t([[2.0]]), 2.0)
C1 = Factors(t([[4.0, 6.0]]), t([[3.0], [1.0]]), 1.0)


def test_expand_places_the_trained_modules_and_keeps_the_global_ones() -> None:
    e0 = expand(C0, [2], global_=GLOBAL)
    assert e0.scaling == 1.0
    assert torch.equal(e0.B, t([[1.0, 2.0, 10.0]])) and torch.equal(e0.A, t([[1.0], [1.0], [2.0]]))
    e1 = expand(C1, [0, 2], global_=GLOBAL)
    assert torch.equal(e1.B, t([[4.0, 2.0, 6.0]])) and torch.equal(e1.A, t([[3.0], [1.0], [1.0]]))
    # a client's whole PLoRA: 1·1 + 2·1 + 10·2 = 23 and 4·3 + 2·1 + 6·1 = 20
    assert e0.delta().item() == 23.0 and e1.delta().item() == 20.0


def test_hand_computed_module_wise_mean_over_each_modules_trainers() -> None:
    """The paper's aggregation: module j averaged over the clients that selected it."""
    selected = [[2], [0, 2]]
    expanded = [expand(C0, [2], global_=GLOBAL), expand(C1, [0, 2], global_=GLOBAL)]
    filled = trainers_mean(expanded, selected, [1.0, 3.0])
    # module 0: client 1 alone trained it, so client 0's copy becomes client 1's (4, 3)
    assert torch.equal(filled[0].B, t([[4.0, 2.0, 10.0]]))
    assert torch.equal(filled[0].A, t([[3.0], [1.0], [2.0]]))
    assert torch.equal(filled[1].B, expanded[1].B) and torch.equal(filled[1].A, expanded[1].A)
    assert torch.equal(expanded[0].B, t([[1.0, 2.0, 10.0]]))  # its inputs are not changed
    g = get("fedplora")(filled, [1.0, 3.0]).global_  # p = ¼, ¾
    # module 0: (4, 3) (its one trainer); module 1, trained by no one: the global (2, 1);
    # module 2, both: B = ¼·10 + ¾·6 = 7, A = ¼·2 + ¾·1 = 1.25
    assert torch.allclose(g.B, t([[4.0, 2.0, 7.0]])) and torch.allclose(
        g.A, t([[3.0], [1.0], [1.25]])
    )
    assert g.scaling == 1.0
    # ΔW = 4·3 + 2·1 + 7·1.25 = 22.75; every client's whole model averaged (the variant the grid
    # ran before stop 50) gave 18.875: module 0 diluted by client 0's global copy
    assert g.delta().item() == pytest.approx(22.75)
    # weight 0 for the only trainer of module 0: it is left as the clients hold it
    zero = trainers_mean(expanded, selected, [1.0, 0.0])
    assert torch.equal(zero[0].B, expanded[0].B) and torch.equal(zero[1].B, expanded[1].B)
    with pytest.raises(ValueError, match="2 updates, 1 selections"):
        trainers_mean(expanded, selected[:1], [1.0, 3.0])


def test_the_error_is_second_order_in_what_the_trainers_changed() -> None:
    """aggregate − Σⱼ Σ_{i∈Tⱼ} qᵢⱼ·Bⱼ⁽ⁱ⁾Aⱼ⁽ⁱ⁾ (q: p renormalised over module j's trainers Tⱼ) =
    −Σⱼ Σ_{i<k∈Tⱼ} qᵢⱼqₖⱼ(Bⱼ⁽ⁱ⁾−Bⱼ⁽ᵏ⁾)(Aⱼ⁽ⁱ⁾−Aⱼ⁽ᵏ⁾), for random tensors."""
    g = torch.Generator().manual_seed(3)
    R, d, k = 4, 5, 3
    glob = Factors(
        torch.randn(d, R, generator=g, dtype=torch.float64),
        torch.randn(R, k, generator=g, dtype=torch.float64),
        0.5,
    )
    picks = [[1], [0, 1, 3], [2, 3]]
    ups = [
        Factors(
            torch.randn(d, len(s), generator=g, dtype=torch.float64),
            torch.randn(len(s), k, generator=g, dtype=torch.float64),
            4.0 / len(s),
        )
        for s in picks
    ]
    full = [expand(u, s, global_=glob) for u, s in zip(ups, picks, strict=True)]
    w = [1.0, 2.0, 5.0]
    agg = get("fedplora")(trainers_mean(full, picks, w), w).global_
    ideal = torch.zeros(d, k, dtype=torch.float64)
    error = torch.zeros(d, k, dtype=torch.float64)
    for j in range(R):
        owners = [i for i in range(3) if j in picks[i]]
        q = {i: w[i] / sum(w[o] for o in owners) for i in owners}
        for i in owners:
            ideal += q[i] * torch.outer(full[i].B[:, j], full[i].A[j])
            for m in owners:
                if m > i:
                    dB = full[i].B[:, j] - full[m].B[:, j]
                    dA = full[i].A[j] - full[m].A[j]
                    error -= q[i] * q[m] * torch.outer(dB, dA)
    torch.testing.assert_close(agg.delta() - ideal, error)


def test_the_aggregator_refuses_unexpanded_updates_and_a_global_rank() -> None:
    with pytest.raises(ValueError, match="global rank R"):
        get("fedplora")([C0, C1], [1.0, 1.0])
    e = expand(C0, [2], global_=GLOBAL)
    with pytest.raises(ValueError, match="global_rank"):
        get("fedplora")([e, e], [1.0, 1.0], global_rank=2)
    spec = dataclasses.replace(round_spec("fedplora"), client_options=(), client_defaults={})
    assert spec == round_spec("svd")  # adapter-state rounds (its one option is the clients')


def test_selection_is_seeded_sorted_and_covers_every_module() -> None:
    assert select(3, 3, seed=1) == [0, 1, 2] and select(3, 8, seed=1) == [0, 1, 2]
    draws = [select(8, 3, seed=s) for s in range(40)]
    assert draws[5] == select(8, 3, seed=5)
    assert all(len(set(d)) == 3 and d == sorted(d) and 0 <= min(d) and max(d) < 8 for d in draws)
    assert len({tuple(d) for d in draws}) > 10
    assert set().union(*draws) == set(range(8))
    with pytest.raises(ValueError, match="ranks must be >= 1, got rank 0 of global rank 4"):
        select(4, 0, seed=0)


def test_each_target_draws_its_own_modules_unless_one_draw_per_client() -> None:
    """The paper draws "independently for each target module": per target by default, the same
    on client and server (a hash of seed and name); `module_draw: client` shares one draw."""
    targets = [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")]
    drawn = draw(targets, global_rank=8, rank=3, seed=5)
    assert drawn == draw(reversed(targets), global_rank=8, rank=3, seed=5)  # order-free
    assert drawn[targets[0]] == select(8, 3, seed=target_seed(5, targets[0]))
    assert len({tuple(c) for c in drawn.values()}) > 1
    assert drawn != draw(targets, global_rank=8, rank=3, seed=6)
    shared = draw(targets, global_rank=8, rank=3, seed=5, per_target=False)
    assert all(c == select(8, 3, seed=5) for c in shared.values())
    # the checksum follows every index of every target, and not the order they were listed in
    assert draw_digest(drawn) == draw_digest(dict(reversed(list(drawn.items()))))
    assert draw_digest(drawn) != draw_digest({**drawn, targets[3]: [0, 1, 2]})
    assert 0 <= draw_digest(drawn) < 2**52
    assert per_target(recipe()) and not per_target(
        recipe("aggregator.options={module_draw: client}")
    )
    with pytest.raises(ConfigError, match=r"module_draw: must be one of \['target', 'client'\]"):
        recipe("aggregator.options={module_draw: layer}")


@pytest.mark.parametrize(
    "bad",
    [[0, 0], [0, 3], [0], [0.5, 1], "01", [-1, 1]],
    ids=["dup", "range", "short", "frac", "str", "neg"],
)
def test_bad_module_indices_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="module indices"):
        check_selection(bad, rank=2, global_rank=3)


def test_split_then_fold_is_the_global_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    glob = Factors(torch.randn(4, 3, generator=g), torch.randn(3, 5, generator=g), 0.25)
    trained, folded = split(glob, [0, 2])
    assert trained.rank == 2 and folded is not None and folded.rank == 1
    torch.testing.assert_close(trained.delta() + folded.delta(), glob.delta())
    assert split(glob, [0, 1, 2])[1] is None
    both = wire.stacked({"q": trained}, {"q": folded}, {"v": folded})
    torch.testing.assert_close(both["q"].delta(), glob.delta())
    assert both["v"] is folded


# -- the client and server hooks -----------------------------------------------------------------


def recipe(*overrides: str) -> RunConfig:
    return load_recipe(TINY, ["aggregator.name=fedplora", "lora.ranks=[2,3,3]", *overrides])


def client_round(cfg: RunConfig, *, rank: int, seed: int = 11) -> ClientRound:
    return ClientRound(
        cfg=cfg,
        partition=0,
        server_round=2,
        spec=round_spec("fedplora"),
        config=ConfigRecord({"server-round": 2}),
        node_config={},
        state=RecordDict(),
        seed=seed,
        plan=ClientPlan(partition=0, rank=rank),
    )


class OneLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(5, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x)


def test_the_client_starts_from_the_global_model_exactly() -> None:
    """Fold (merged into the base) + the selected modules (as a rank-2 LoRA) = base + global."""
    cfg = recipe()
    torch.manual_seed(0)
    base = OneLinear()
    g = torch.Generator().manual_seed(1)
    glob = {"q": Factors(torch.randn(4, 3, generator=g), torch.randn(3, 5, generator=g), 1.0)}
    x = torch.randn(7, 5, generator=g)
    want = base(x) + x @ glob["q"].delta().float().T
    feature, rnd = FedPLoRAFold(cfg), client_round(cfg, rank=2)
    folded = feature.fold(glob, rnd)
    start = feature.start(glob, rnd)
    chosen = feature.selected["q"]
    assert chosen == select(3, 2, seed=target_seed(rnd.seed, "q")) and folded["q"].rank == 1
    assert feature.metrics() == {METRIC: draw_digest({"q": chosen})}
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=cfg.lora.alpha, target_modules=["q"]))
    scaling = cfg.client_scaling(2)
    write_factors(model, {m: f.truncate(2, scaling) for m, f in start.items()})
    with wire.merged_into(model.base_model.model, wire.stacked(folded)):
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model(x), want, atol=1e-3)  # the fold is undone after the block


def test_modules_train_at_the_rank_R_scaling_by_default() -> None:
    """A rank-rᵢ client's modules keep the rank-R LoRA's scaling α/R (lora_alpha α·rᵢ/R), so a
    module's step does not grow as a client selects fewer; `client` keeps the client's α/rᵢ."""
    assert module_alpha(16.0, rank=4, global_rank=32, module_scaling="global") == 2.0  # 2/4 = 16/32
    assert module_alpha(16.0, rank=4, global_rank=32, module_scaling="client") == 16.0
    with pytest.raises(ValueError, match=r"aggregator.options.module_scaling: must be one of"):
        module_alpha(16.0, rank=4, global_rank=32, module_scaling="rank")
    cfg = recipe()  # R = 3, α = 16
    plan = FedPLoRAFold(cfg).plan(ClientPlan(partition=0, rank=2), client_round(cfg, rank=2))
    assert plan.lora_alpha == pytest.approx(16 * 2 / 3) and plan.rank == 2
    own = recipe("aggregator.options={module_scaling: client}")
    assert FedPLoRAFold(own).plan(ClientPlan(0, 2), client_round(own, rank=2)).lora_alpha == 16
    with pytest.raises(ConfigError, match="module_scaling"):
        recipe("aggregator.options={module_scaling: rank}")


def test_a_client_round_trains_at_alpha_over_R_and_replies_at_alpha_over_r(
    tmp_path: Path, monkeypatch
) -> None:
    """The adapter is attached at the plan's lora_alpha and the reply converted back to the
    recipe's α/rᵢ, which the server reads: at a vanishing lr the placed reply is the global's
    selected modules to float rounding (read at the wrong scaling they would be off by R/rᵢ)."""
    cfg = recipe(f"output_dir={tmp_path}", "data.max_examples=120", "federation.lr=1e-12")
    base, _ = cached_base_model(cfg)
    shapes = {
        f"model.layers.{i}.self_attn.{p}": tuple(
            getattr(base.model.layers[i].self_attn, p).weight.shape
        )
        for i in range(2)
        for p in ("q_proj", "v_proj")
    }
    g = torch.Generator().manual_seed(3)
    glob = {
        m: Factors(torch.randn(d, 3, generator=g) * 0.05, torch.randn(3, k, generator=g), 1.0)
        for m, (d, k) in shapes.items()
    }
    alphas = []
    real = client_round_module.attach_lora
    monkeypatch.setattr(
        client_round_module,
        "attach_lora",
        lambda base, **kw: alphas.append(kw["alpha"]) or real(base, **kw),
    )
    config = {"server-round": 1, "global-scaling": 1.0, "recipe-hash": cfg.fingerprint()}
    content = RecordDict({"global": to_record(glob), "config": ConfigRecord(config)})
    context = Context(0, 0, {"partition-id": 0}, RecordDict(), {})  # partition 0: rank 2
    out = train_content(cfg, content, context=context)
    assert alphas == [pytest.approx(16 * 2 / 3)]
    seed = client_seed(cfg, server_round=1, partition=0)
    drawn = draw(glob, global_rank=3, rank=2, seed=seed)
    assert len({tuple(c) for c in drawn.values()}) > 1  # this seed's targets draw differently
    assert out["metrics"][METRIC] == draw_digest(drawn)
    assert out["metrics"]["scaling"] == cfg.client_scaling(2) == 8.0
    update = from_record(out["update"], cfg.client_scaling(2))
    assert update.keys() == glob.keys()
    for m, f in update.items():
        placed = expand(f, drawn[m], global_=glob[m])
        torch.testing.assert_close(placed.delta(), glob[m].delta(), atol=1e-6, rtol=1e-4)


def test_the_server_sends_everything_and_places_the_modules() -> None:
    cfg = recipe()
    feature = FedPLoRAFold(cfg)
    # round 4 (run seed 0): in target q partition 0 at rank 2 draws modules [0, 2], partition 1
    # at rank 1 [2]; round 9: partition 0 draws [0, 1]
    assert feature.before_round(4, partitions=[0, 1], sampled=2) is None
    down = feature.download(7, Download(2, {"q": GLOBAL}, {"x": 1}))
    assert down.rank is None and down.config == {"x": 1}
    glob = {"q": Factors(t([[1.0, 2.0, 3.0]]), t([[1.0], [1.0], [1.0]]), 1.0)}
    metrics = {
        "partition-id": 0,
        "rank": 2,
        "num-examples": 4,
        "steps": 1,
        "bytes-sent": 1,
        "bytes-received": 1,
        METRIC: draw_digest({"q": [0, 2]}),
    }
    reply = TrainReply.parse(metrics)
    factors = {"q": C1}
    assert (
        feature.receive(7, RecordDict(), factors=factors, reply=reply, shapes={"q": (1, 1)})
        is factors
    )
    inputs, weights = feature.release([7], [factors], weights=[3.0], global_=glob)
    assert weights == [3.0] and torch.equal(inputs[0]["q"].B, t([[4.0, 2.0, 6.0]]))
    # two nodes: node 8 (C0, module 2 only) holds node 7's module 0, the one trainer's
    for node, (f, chosen) in {7: (C1, [0, 2]), 8: (C0, [2])}.items():
        one = TrainReply.parse(
            {
                **metrics,
                "partition-id": node - 7,
                "rank": len(chosen),
                METRIC: draw_digest({"q": chosen}),
            }
        )
        feature.receive(node, RecordDict(), factors={"q": f}, reply=one, shapes={"q": (1, 1)})
    inputs, _ = feature.release([7, 8], [{"q": C1}, {"q": C0}], weights=[3.0, 1.0], global_=glob)
    assert torch.equal(inputs[1]["q"].B, t([[4.0, 2.0, 10.0]]))
    assert torch.equal(inputs[1]["q"].A, t([[3.0], [1.0], [2.0]]))
    for bad in ([0, 2], -1, 1.5):  # the indices themselves, a negative or fractional checksum
        with pytest.raises(ValueError, match=METRIC):
            feature.receive(
                7,
                RecordDict(),
                factors=factors,
                reply=TrainReply.parse({**metrics, METRIC: bad}),
                shapes={},
            )
    # another draw's checksum: a hostile client choosing the module it sets alone (or one whose
    # draw differs) is refused, not placed where it did not train
    other = draw_digest({"q": [0, 1]})
    with pytest.raises(ValueError, match=rf"{other} is not the checksum of partition 0's seeded"):
        feature.receive(
            7,
            RecordDict(),
            factors=factors,
            reply=TrainReply.parse({**metrics, METRIC: other}),
            shapes={},
        )
    feature.before_round(9, partitions=[0, 1], sampled=2)  # another round, another draw ([0, 1])
    with pytest.raises(ValueError, match=rf"in round 9 \({other}\)"):
        feature.receive(7, RecordDict(), factors=factors, reply=reply, shapes={"q": (1, 1)})
    missing = TrainReply.parse({k: v for k, v in metrics.items() if k != METRIC})
    with pytest.raises(ValueError, match=METRIC):
        feature.receive(7, RecordDict(), factors=factors, reply=missing, shapes={})


@pytest.mark.parametrize(
    "override, key",
    [
        ("compression.topk=0.1", "compression.topk"),
        ("aggregator.global_rank=3", "aggregator.global_rank"),
        ("model.quantization=4bit", "model.quantization"),
        ("privacy.secure_aggregation.enabled=true", "privacy.secure_aggregation"),
        # h98: it saved the r trained modules of R, not the client's whole model
        ("features.personal_adapter={}", "features.personal_adapter"),
    ],
)
def test_combinations_it_cannot_run_are_refused_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        recipe(override)


# -- the three 2026 methods, one tiny federation each ---------------------------------------------


@pytest.mark.slow
def test_fedplora_prelort_and_sdflora_federate(tmp_path: Path) -> None:
    from fedllm.deploy.local_grid import run_local
    from fedllm.server.checkpoint import load_checkpoint
    from fedllm.server.metrics import MetricsLog

    ranks = {}
    for name, extra in [
        ("fedplora", []),
        ("prelort", []),
        ("sdflora", ["aggregator.options={local_fraction: 0.5}"]),
    ]:
        cfg = load_recipe(
            TINY,
            [
                f"output_dir={tmp_path}",
                f"name={name}",
                f"aggregator.name={name}",
                "data.num_clients=2",
                "data.max_examples=160",
                "lora.ranks=[2,4]",
                "federation.rounds=2",
                "federation.local_steps=3",
                *extra,
            ],
        )
        run_dir, grid = run_local(cfg)
        rows = MetricsLog(run_dir).read()
        clients = [r for r in rows if r["kind"] == "client"]
        assert len(clients) == 4 and all(r["status"] == "ok" for r in clients), clients
        server = [r for r in rows if r["kind"] == "server" and r["round"] == 2]
        assert server and all(torch.isfinite(torch.tensor(r["held_out_loss"])) for r in server)
        state = load_checkpoint(run_dir)["strategy"]["global"]
        ranks[name] = ({r["rank"] for r in clients}, {b.shape[1] for b, _, _ in state.values()})
        if name == "sdflora":  # each node kept its local module: rank ⌊½·r⌋, B no longer zero
            kept = [c.state["sdflora-local"].to_torch_state_dict() for c in grid.contexts.values()]
            local_ranks = {v.shape[0] for s in kept for k, v in s.items() if k.endswith("lora_A")}
            assert local_ranks == {1, 2}
            assert all(any(v.any() for k, v in s.items() if k.endswith("lora_B")) for s in kept)
    assert ranks["fedplora"] == ({2, 4}, {4})  # clients train r_i modules; the global keeps R = 4
    assert ranks["prelort"] == ({2, 4}, {4})
    assert ranks["sdflora"] == ({1, 2}, {2})  # only the global modules (r_g = r − ⌊r/2⌋) travel


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:  # a shared 2-core machine: avoid oversubscription
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
