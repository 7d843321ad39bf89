"""Personal adapters (fedllm.features.personal): each client keeps the adapter it trained on its
own disk, never in its reply. fedsa keeps B on the clients, so there it is on by default."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedllm.aggregators import Factors, RoundSpec
from fedllm.cli import main
from fedllm.deploy.local_grid import LocalGrid, server_identity
from fedllm.features import registry
from fedllm.features.personal import PersonalAdapter, personal_adapter_dir, raw_update
from fedllm.features.types import ClientPlan, ClientRound, ClientUpdate
from fedllm.model.card import CARD_JSON, resolve_adapter_base
from fedllm.model.packing import unpack
from fedllm.model.wire import LOCAL_B, outgoing
from fedllm.model.wire import spec_config as wire_config
from fedllm.recipe import ConfigError, build_config, load_recipe
from fedllm.server.metrics import MetricsLog

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
BASE = {"data": {"num_clients": 2}, "lora": {"ranks": 2, "alpha": 4}}


def active(**sections) -> list[str]:
    return [c.name for c in registry.active(build_config({**BASE, **sections}))]


# ---------------------------------------------------------------- when it is on (no training)


def test_on_by_default_for_fedsa_and_opt_in_elsewhere() -> None:
    assert "personal_adapter" in active(aggregator={"name": "fedsa"})
    assert "personal_adapter" not in active(aggregator={"name": "svd"})
    assert "personal_adapter" in active(features={"personal_adapter": {}})
    off = {"personal_adapter": {"enabled": False}}
    assert "personal_adapter" not in active(aggregator={"name": "fedsa"}, features=off)


def test_refused_where_an_adapter_would_not_fit_the_plain_base() -> None:
    with pytest.raises(ConfigError, match=r"features\.personal_adapter: aggregator\.name='flora'"):
        build_config(
            {**BASE, "aggregator": {"name": "flora"}, "features": {"personal_adapter": {}}}
        )
    tiers = {
        "tiers": [
            {"name": "phone", "rank": 2, "clients": 1, "pruning": 0.5},
            {"name": "server", "rank": 2, "clients": 1},
        ]
    }
    with pytest.raises(ConfigError, match="client 0 trains on a pruned base"):
        build_config({**BASE, "lora": tiers, "features": {"personal_adapter": {}}})


def test_a_supernode_may_keep_it_in_its_own_folder(tmp_path: Path) -> None:
    cfg = build_config({**BASE, "output_dir": str(tmp_path), "name": "r"})
    assert personal_adapter_dir(cfg, 1) == tmp_path / "r" / "clients" / "1" / "personal_adapter"
    mine = {"personal-dir": str(tmp_path / "org1")}
    assert personal_adapter_dir(cfg, 1, node_config=mine) == tmp_path / "org1" / "personal_adapter"


@pytest.mark.parametrize(
    ("privacy", "raw"),
    [
        ({}, False),
        ({"mode": "sample", "noise_multiplier": 1.0}, False),  # the adapter is DP-trained
        ({"mode": "client", "noise_at": "client", "client_noise_multiplier": 1.0}, False),
        ({"mode": "client", "noise_at": "server", "client_noise_multiplier": 1.0}, True),
        ({"secure_aggregation": {"enabled": True}}, True),
    ],
)
def test_a_raw_update_is_never_written_into_the_run_directory(
    tmp_path: Path, privacy: dict, raw: bool
) -> None:
    """Where the adapter a client kept is its raw update, the server's run directory (a
    simulation's clients' folder) gets none; a node's own personal-dir still may."""
    cfg = build_config(
        {
            **BASE,
            "aggregator": {"name": "fedit", "weighting": "uniform"},
            "data": {"num_clients": 3},
            "privacy": privacy,
            "features": {"personal_adapter": {}},
            "output_dir": str(tmp_path),
            "name": "r",
        }
    )
    assert raw_update(cfg) is raw
    if not raw:
        return
    f = {"m": Factors(torch.ones(4, 2), torch.ones(2, 3), 2.0)}
    update = ClientUpdate(f, f, 2)
    plan = ClientPlan(0, 2, 0.0, None)
    rnd = ClientRound(cfg, 0, 1, RoundSpec(), ConfigRecord({}), {}, RecordDict(), 0, plan)
    assert PersonalAdapter(cfg).post_process(update, rnd) is update
    assert not (tmp_path / "r").exists(), "nothing written under the run directory"


def test_a_fedsa_node_with_empty_state_takes_its_B_back_from_its_personal_adapter(
    tmp_path: Path,
) -> None:
    """A resumed simulation's nodes start with empty state: B comes back from the adapter the
    node wrote in an earlier round (else fedsa's personal model would restart from B = 0)."""
    from fedllm.model.adapters import save_peft_adapter

    cfg = build_config(
        {**BASE, "aggregator": {"name": "fedsa"}, "output_dir": str(tmp_path), "name": "r"}
    )
    module = "model.layers.0.self_attn.q_proj"
    B = torch.arange(8.0).reshape(4, 2)
    folder = personal_adapter_dir(cfg, 1)
    save_peft_adapter(
        folder,
        {module: Factors(B, torch.ones(2, 3), 2.0)},
        base_model="tiny",
        target_modules=["q_proj"],
    )
    plan = ClientPlan(1, 2, 0.0, None)
    state = RecordDict()
    spec = RoundSpec(local_B=True)
    rnd = ClientRound(cfg, 1, 3, spec, ConfigRecord({}), {}, state, 0, plan)
    feature = PersonalAdapter(cfg)
    card = folder / "fedllm_adapter.json"
    card.write_text(json.dumps({"fingerprint": "0" * 12}))  # another recipe's, in a shared dir
    feature.start({}, rnd)
    assert LOCAL_B not in state  # another run's B stays out (audit h90)
    card.write_text(json.dumps({"fingerprint": cfg.fingerprint()}))
    assert feature.start({}, rnd) == {}
    assert torch.equal(state[LOCAL_B].to_torch_state_dict()[module], B)
    state[LOCAL_B] = ArrayRecord({module: torch.zeros(4, 2)})  # a live node's state wins
    feature.start({}, rnd)
    assert not state[LOCAL_B].to_torch_state_dict()[module].any()


def test_a_fedsa_round_lost_to_a_crash_starts_again_from_the_B_before_it(tmp_path: Path) -> None:
    """Each round's B is also kept by round in the node state: a resumed round 3 (its first
    attempt trained, then the server died) starts from round 2's B, not the lost attempt's."""
    cfg = build_config(
        {**BASE, "aggregator": {"name": "fedsa"}, "output_dir": str(tmp_path), "name": "r"}
    )
    module, A = "model.layers.0.self_attn.q_proj", torch.ones(2, 3)
    feature = PersonalAdapter(cfg)

    def at(server_round: int) -> ClientRound:  # partition 1 of a fresh node, rank 2
        plan = ClientPlan(1, 2, 0.0, None)
        spec, config = RoundSpec(local_B=True), ConfigRecord({})
        return ClientRound(cfg, 1, server_round, spec, config, {}, RecordDict(), 0, plan)

    def trained(server_round: int, value: float) -> None:
        B = torch.full((4, 2), value)
        update = ClientUpdate({module: Factors(B, A, 2.0)}, {module: Factors(B, A, 2.0)}, 2)
        feature.post_process(update, at(server_round))

    def start(server_round: int) -> float:
        rnd = at(server_round)
        feature.start({}, rnd)
        return float(rnd.state[LOCAL_B].to_torch_state_dict()[module][0, 0])

    trained(2, 2.0)
    trained(3, 3.0)  # the lost attempt at round 3
    assert start(3) == 2.0 and start(4) == 3.0


def test_a_resumed_fedsa_node_evaluates_with_its_own_B_before_it_trains(tmp_path: Path) -> None:
    """The ClientApp's evaluate on a node with empty state (a resumed run asks it to evaluate
    before it trains) = the same evaluation on a live node holding the B it wrote, not B = 0."""
    from fedllm.client.app import evaluate
    from fedllm.model.adapters import save_peft_adapter
    from fedllm.model.base import cached_base_model

    cfg = load_recipe(
        RECIPE,
        [
            f"output_dir={tmp_path}",
            "aggregator.name=fedsa",
            "lora.ranks=[2,2]",
            "data.max_examples=120",
        ],
    )
    base, _ = cached_base_model(cfg)
    g = torch.Generator().manual_seed(0)
    mine = {}
    for i, layer in enumerate(base.model.layers):
        for p in ("q_proj", "v_proj"):
            d, k = getattr(layer.self_attn, p).weight.shape
            B, A = torch.randn(d, 2, generator=g) * 0.1, torch.randn(2, k, generator=g)
            mine[f"model.layers.{i}.self_attn.{p}"] = Factors(B, A, cfg.client_scaling(2))
    folder = personal_adapter_dir(cfg, 1)
    save_peft_adapter(folder, mine, base_model="tiny", target_modules=["q_proj", "v_proj"])
    (folder / "fedllm_adapter.json").write_text(json.dumps({"fingerprint": cfg.fingerprint()}))
    spec = RoundSpec(local_B=True)
    config = {"server-round": 3, "global-scaling": cfg.client_scaling(2)}
    config |= {"recipe-hash": cfg.fingerprint(), **wire_config(spec)}

    def held_out_loss(state: RecordDict) -> float:
        content = RecordDict({"global": outgoing(mine, spec), "config": ConfigRecord(config)})
        with server_identity(1):  # a message is made by a run's server
            msg = Message(content, dst_node_id=1, message_type=MessageType.EVALUATE)
        context = Context(0, 1, {"partition-id": 1}, state, {})
        return float(evaluate(cfg, msg, context=context).content["metrics"]["held-out-loss"])

    live = RecordDict({LOCAL_B: ArrayRecord({m: f.B for m, f in mine.items()})})
    zero = RecordDict({LOCAL_B: ArrayRecord({m: f.B * 0 for m, f in mine.items()})})
    resumed = RecordDict()
    assert held_out_loss(resumed) == pytest.approx(held_out_loss(live), rel=1e-6)
    assert LOCAL_B in resumed, "the node keeps the B it took back"
    assert abs(held_out_loss(live) - held_out_loss(zero)) > 1e-3, "B counts"


# ---------------------------------------------------------------- a fedsa federation


class RecordingGrid(LocalGrid):
    """A LocalGrid that keeps every reply the server pulls (what left the clients)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies = []

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.replies += replies
        return replies


@pytest.fixture(scope="module")
def fedsa_run(tmp_path_factory):
    from fedllm.client.app import make_client_app
    from fedllm.server.app import run_server

    out = tmp_path_factory.mktemp("personal")
    overrides = [
        f"output_dir={out}",
        "name=fedsa",
        "aggregator.name=fedsa",
        "data.num_clients=2",
        "data.max_examples=120",
        "lora.ranks=[2,4]",
        "federation.rounds=2",
        "federation.local_steps=3",
        "output.snapshot_every=1",
    ]
    if HAVE_TENSORBOARD:  # the dev extra may leave the trackers out
        overrides.append("output.trackers=[tensorboard]")
    cfg = load_recipe(RECIPE, overrides)
    grid = RecordingGrid(make_client_app(cfg), cfg.data.num_clients)
    with server_identity(grid.run.run_id):
        run_dir = run_server(grid, cfg)
    return cfg, run_dir, grid


@pytest.mark.slow
def test_each_client_keeps_its_personal_adapter_and_it_loads_on_the_base(fedsa_run) -> None:
    cfg, run_dir, grid = fedsa_run
    for node, context in grid.contexts.items():
        pid = int(context.node_config["partition-id"])
        folder = run_dir / "clients" / str(pid) / "personal_adapter"
        card = json.loads((folder / CARD_JSON).read_text())
        assert (card["what"], card["partition"], card["round"]) == ("personal", pid, 2)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == cfg.client_rank(pid) and config["base_model_name_or_path"] == "tiny"
        assert resolve_adapter_base(folder) == run_dir / "tiny_base"
        base = AutoModelForCausalLM.from_pretrained(run_dir / "tiny_base")
        model = PeftModel.from_pretrained(base, str(folder))
        kept = context.state[LOCAL_B].to_torch_state_dict()  # the B this node trains on with
        assert kept, f"node {node} kept no B"
        for module, B in kept.items():
            layer = model.get_submodule("base_model.model." + module)
            torch.testing.assert_close(layer.lora_B["default"].weight, B)
            assert B.abs().max() > 0, "a trained B, not the zero start"
    readme = (run_dir / "final_adapter" / "README.md").read_text()
    assert "personal adapter (`clients/<partition>/personal_adapter/`)" in readme


@pytest.mark.slow
def test_no_personal_B_is_in_any_reply_to_the_server(fedsa_run) -> None:
    _, _, grid = fedsa_run
    kept = [
        B for c in grid.contexts.values() for B in c.state[LOCAL_B].to_torch_state_dict().values()
    ]
    train = [c for r in grid.replies if "update" in (c := unpack(r.content))]
    assert len(train) == 4, "2 clients x 2 rounds"
    for content in train:
        arrays = [v for v in content.values() if isinstance(v, ArrayRecord)]
        for record in arrays:
            tensors = record.to_torch_state_dict()
            assert tensors and all(k.endswith(".lora_A") for k in tensors), sorted(tensors)[:3]
            for t in tensors.values():
                assert not any(t.shape == B.shape and torch.equal(t, B) for B in kept)


@pytest.mark.slow
def test_the_run_leaves_snapshots_tracker_events_and_a_mergeable_personal_model(
    fedsa_run, tmp_path
) -> None:
    _, run_dir, _ = fedsa_run
    rows = MetricsLog(run_dir).read()
    loss = {r["round"]: r["held_out_loss"] for r in rows if r["kind"] == "server"}
    for rnd in (1, 2):  # output.snapshot_every=1
        card = json.loads((run_dir / "snapshots" / f"round_{rnd}" / CARD_JSON).read_text())
        assert (card["what"], card["round"]) == ("snapshot", rnd)
        assert card["metrics"]["held_out_loss"] == loss[rnd]
    if HAVE_TENSORBOARD:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        scalars = events.Scalars("server/held_out_loss")
        assert [e.step for e in scalars] == [0, 1, 2]
        assert [e.value for e in scalars] == pytest.approx([loss[r] for r in (0, 1, 2)])
    out = tmp_path / "client1"
    assert main(["export", str(run_dir), str(out), "--client", "1", "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(run_dir / "tiny_base")
    personal = PeftModel.from_pretrained(base, str(run_dir / "clients/1/personal_adapter"))
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, personal(ids).logits, rtol=1e-4, atol=1e-4)
    assert json.loads((out / CARD_JSON).read_text())["partition"] == 1
