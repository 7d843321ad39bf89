"""Rounds whose cost follows the clients that take part: a seeded evaluation panel
(`federation.evaluate_clients`), the server's own test set (`data.test_set`), and server state
only for the clients that trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord

from fedllm.aggregators.base import Factors
from fedllm.client.app import make_client_app
from fedllm.client.train import evaluate_nll
from fedllm.data import partition, tokenize_all
from fedllm.data import shards as shards_module
from fedllm.data.shards import global_test_set
from fedllm.deploy.local_grid import LocalGrid, run_local, server_identity
from fedllm.model.adapters import initial_factors
from fedllm.model.base import adapter_shapes, base_model_dir, cached_base_model
from fedllm.recipe import ConfigError, load_recipe
from fedllm.server.checkpoint import load_checkpoint
from fedllm.server.evaluation import TestSetEvaluator, evaluation_panel, panel_size
from fedllm.server.strategy import LoraStrategy

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")


def test_panel_size_by_hand() -> None:
    assert [panel_size(s, 30) for s in ("all", "none", 7, 40, 0.1, 0.01, 1.0)] == [
        30,
        0,
        7,
        30,
        3,  # 0.1 · 30 = 3.0000000000000004 rounds to 3, not up to 4
        1,  # at least one
        30,
    ]
    assert panel_size(0.25, 10) == 3 and panel_size(0.5, 0) == 0  # 2.5 rounds half up


def test_the_panel_is_k_seeded_nodes_the_same_every_round() -> None:
    nodes = list(range(1001, 1101))
    panel = evaluation_panel(nodes, spec=20, seed=0)
    assert len(panel) == 20 and panel == sorted(panel) and set(panel) <= set(nodes)
    assert evaluation_panel(reversed(nodes), spec=20, seed=0) == panel  # order does not matter
    assert evaluation_panel(nodes, spec=20, seed=1) != panel  # the seed chooses
    assert evaluation_panel(nodes, spec="all", seed=0) == nodes
    assert evaluation_panel(nodes, spec="none", seed=0) == []
    # a node leaving frees one seat only: the rest of the panel stays
    gone = [n for n in nodes if n != panel[0]]
    assert set(panel[1:]) <= set(evaluation_panel(gone, spec=20, seed=0))
    # a bigger panel contains the smaller one (the k smallest hashes)
    assert set(panel) <= set(evaluation_panel(nodes, spec=0.3, seed=0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    cfg = load_recipe(
        RECIPE,
        [
            f"output_dir={out}",
            "data.max_examples=400",
            "data.num_clients=40",
            "data.partitioner=iid",
            "federation.evaluate_clients=5",
            "data.test_set={fraction: 0.1, labels: [noun.plant], max_examples: 60}",
        ],
    )
    return cfg, adapter_shapes(cfg)


def test_configure_evaluate_asks_the_panel_only(tiny) -> None:
    cfg, shapes = tiny
    grid = LocalGrid(make_client_app(cfg), cfg.data.num_clients)  # nothing runs until a push
    strategy = LoraStrategy(cfg, shapes=shapes)
    record, cfg_ = strategy.global_record(), ConfigRecord()
    with server_identity(grid.run.run_id):  # a Message needs the ServerApp's run id
        asked = [
            [m.metadata.dst_node_id for m in strategy.configure_evaluate(r, record, cfg_, grid)]
            for r in (0, 1, 2)
        ]
    seated = {n: (0, n - 1001) for n in range(1001, 1041)}  # each node answered its partition
    panel = evaluation_panel(range(1001, 1041), spec=5, seed=0, seats=seated)
    assert asked[0] == asked[1] == asked[2] == panel
    assert len(asked[0]) == 5


def test_the_server_evaluates_its_test_set_as_a_merged_model_would(tiny) -> None:
    cfg, shapes = tiny
    evaluator = TestSetEvaluator(cfg)
    assert len(evaluator.raw) == 60 and evaluator.raw == global_test_set(cfg)
    base, tok = cached_base_model(cfg)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    examples = tokenize_all(
        evaluator.raw, tok, prompt_format=cfg.data.prompt_format, max_length=cfg.data.max_length
    )

    def reference(model) -> float:
        nll, tokens = evaluate_nll(model, examples, batch_size=7, pad_id=tok.pad_token_id)
        return nll / tokens

    start = initial_factors(shapes, rank=8, scaling=2.0, seed=0)  # B = 0: the base model
    loss, tokens = evaluator.evaluate(start)
    assert tokens > 0 and loss == pytest.approx(reference(base), rel=1e-5)
    gen = torch.Generator().manual_seed(1)
    moved = {
        m: Factors(torch.randn(f.B.shape, generator=gen) * 0.3, f.A, f.scaling)
        for m, f in start.items()
    }
    merged = type(base).from_pretrained(base_model_dir(cfg))
    with torch.no_grad():
        for module, f in moved.items():
            merged.get_submodule(module).weight += f.scaling * f.B @ f.A
    loss_moved, _ = evaluator.evaluate(moved)
    assert loss_moved == pytest.approx(reference(merged), rel=1e-5)
    assert abs(loss_moved - loss) > 1e-3
    after = base.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], w) for k, w in before.items()), "the base was left modified"


def test_evaluate_clients_is_checked_against_the_clients() -> None:
    with pytest.raises(ConfigError, match=r"federation\.evaluate_clients \(5\) exceeds"):
        load_recipe(RECIPE, ["federation.evaluate_clients=5"])
    with pytest.raises(ConfigError, match="evaluates nothing"):
        load_recipe(RECIPE, ["federation.evaluate_clients=none"])
    with pytest.raises(ConfigError, match=r"federation\.evaluate_clients: must be 'all'"):
        load_recipe(RECIPE, ["federation.evaluate_clients=0"])


@pytest.mark.slow
def test_a_round_of_2_clients_among_12(tmp_path: Path, monkeypatch) -> None:
    """Panel of 3 the same in rounds 0 and 1, the test set every round, state for the 2 that
    trained, and the partition computed once: run_local's server and ClientApp share a cache."""
    calls = []
    monkeypatch.setattr(
        shards_module, "partition", lambda *a, **k: calls.append(1) or partition(*a, **k)
    )
    cfg = load_recipe(
        RECIPE,
        [
            f"output_dir={tmp_path}",
            "data.max_examples=240",
            "data.num_clients=12",
            "data.partitioner=iid",
            "lora.ranks=[2,4]",
            "federation.rounds=1",
            "federation.local_steps=2",
            "federation.clients_per_round=2",
            "federation.evaluate_clients=3",
            "data.test_set={fraction: 0.1, max_examples: 20}",
        ],
    )
    run_dir, _ = run_local(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {
        rnd: sorted(r["partition"] for r in rows if r["kind"] == "eval" and r["round"] == rnd)
        for rnd in (0, 1)
    }
    assert len(evals[0]) == 3 and evals[0] == evals[1]
    server = [r for r in rows if r["kind"] == "server"]
    assert [r["eval_clients"] for r in server] == [3, 3]
    assert all(r["test_tokens"] > 0 for r in server) and "seconds" in server[0]
    assert server[1]["test_loss"] != server[0]["test_loss"]  # the new global, evaluated
    assert len([r for r in rows if r["kind"] == "client"]) == 2
    state = load_checkpoint(run_dir)["strategy"]
    assert len(state["node_ranks"]) == len(state["node_partitions"]) == 2
    table = json.loads((run_dir / "final_eval.json").read_text())
    assert [r["who"] for r in table][-1] == "test set"
    assert len(calls) == 1  # 8 messages and the server's test set: one split
