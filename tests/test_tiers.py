"""Device tiers (`fedllm.constrained.tiers`): the precision a tier's client evaluates on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import fedllm.model.base as model_base
from fedllm.aggregators import Factors, round_spec
from fedllm.client.app import evaluate
from fedllm.constrained.tiers import Tiers
from fedllm.data.shards import ProcessCache
from fedllm.deploy.local_grid import server_identity
from fedllm.features.types import ClientPlan, ClientRound
from fedllm.model import wire
from fedllm.model.adapters import to_record
from fedllm.model.base import adapter_shapes
from fedllm.recipe import RunConfig, load_recipe

TINY = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
TIERS = (
    "lora.tiers=[{name: gpu, rank: 4, clients: 1}, {name: laptop, rank: 2, clients: 1, "
    "quantization: 4bit}, {name: full, rank: 2, clients: 1, quantization: none}, "
    "{name: phone, rank: 2, clients: 1, pruning: 0.5, quantization: 4bit}]"
)


def recipe(*overrides: str) -> RunConfig:
    return load_recipe(TINY, ["lora.ranks=null", TIERS, *overrides])


def at(cfg: RunConfig, partition: int) -> ClientRound:
    plan = ClientPlan(partition, 2, 0.0, None)
    return ClientRound(
        cfg, partition, 1, round_spec("svd"), ConfigRecord(), {}, RecordDict(), 0, plan
    )


def test_a_tier_evaluates_at_the_precision_it_trains_at() -> None:
    """gpu (no precision of its own): the recipe's; laptop: its 4bit; full: 'none' over a 4-bit
    recipe is the full-precision base (None); phone (pruned, 4-bit): the full base it loads to
    prune (h103: its unpruned 4-bit base would be a second load every round)."""
    for model, expected in (
        ("none", [None, "4bit", None, None]),
        ("8bit", ["8bit", "4bit", None, None]),
    ):
        tiers = Tiers(recipe("data.num_clients=4", f"model.quantization={model}"))
        given = None if model == "none" else model
        assert [tiers.eval_precision(given, at(tiers.cfg, p)) for p in range(4)] == expected


def test_under_a_bandit_a_tier_evaluates_at_the_recipes_precision() -> None:
    """The bandit sets each round's precision; evaluation keeps the recipe's (constrained.md)."""
    tiers = Tiers(recipe("data.num_clients=4", "adaptive={ranks: [2], quantization: [4bit, none]}"))
    assert [tiers.eval_precision(None, at(tiers.cfg, p)) for p in range(4)] == [None] * 4


def test_a_4bit_tiers_client_evaluates_on_a_4bit_base_and_loads_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The laptop evaluates two rounds on the 4-bit base it trains on, loaded once, never the
    recipe's full-precision one (it reloaded and re-quantized every round before stop 48), and
    personal tuning after the last round's evaluation tunes on that base too; the gpu client,
    with no precision of its own, evaluates at the recipe's."""
    pytest.importorskip("bitsandbytes")
    tuning = "features={personal_tuning: {steps: 1}}"  # at the last round, on the same base
    unpruned = TIERS.split(", {name: phone")[0] + "]"  # tuning refuses pruned tiers
    cfg = recipe(f"output_dir={tmp_path}", "data.max_examples=200", unpruned, tuning)
    loaded: list[str | None] = []
    real = model_base.load_base_model

    def load_base_model(folder, **kw):
        loaded.append(kw.get("quantization"))
        return real(folder, **kw)

    monkeypatch.setattr(model_base, "load_base_model", load_base_model)
    g = torch.Generator().manual_seed(0)
    scaling = cfg.client_scaling(2)
    glob = {
        m: Factors(torch.randn(d, 2, generator=g) * 0.05, torch.randn(2, k, generator=g), scaling)
        for m, (d, k) in adapter_shapes(cfg).items()
    }
    spec = round_spec(cfg.aggregator.name)
    cache = ProcessCache()

    def held_out_loss(partition: int, server_round: int) -> float:
        config = {"server-round": server_round, "global-scaling": scaling}
        config |= {"recipe-hash": cfg.fingerprint(), **wire.spec_config(spec)}
        content = RecordDict({"global": to_record(glob), "config": ConfigRecord(config)})
        with server_identity(1):
            msg = Message(content, dst_node_id=1, message_type=MessageType.EVALUATE)
        context = Context(0, 1, {"partition-id": partition}, RecordDict(), {})
        reply = evaluate(cfg, msg, context=context, cache=cache)
        return float(reply.content["metrics"]["held-out-loss"])

    losses = [held_out_loss(1, r) for r in (1, 2)]
    assert loaded == ["4bit"] and all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(losses[1])  # the same global scored on the same base
    held_out_loss(0, 2)
    assert loaded == ["4bit", None]
