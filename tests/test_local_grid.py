"""Each round semantics end to end through run_server, LoraStrategy and the ClientApp on a
LocalGrid (Flower serialisation both ways, per-node Context): tiny model, 2 clients, 2 rounds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord
from peft import PeftModel

from fedllm.deploy.local_grid import run_local
from fedllm.model.adapters import initial_factors
from fedllm.model.base import base_model_dir, cached_base_model
from fedllm.model.wire import LOCAL_B
from fedllm.recipe import RunConfig, load_recipe
from fedllm.server.checkpoint import load_checkpoint

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
pytestmark = pytest.mark.slow  # every test here runs a federation


def tiny(tmp_path: Path, method: str, *extra: str, name: str | None = None) -> RunConfig:
    """The tiny recipe at 2 clients of ranks 2 and 4, 3 local steps, aggregated by `method`."""
    return load_recipe(
        RECIPE,
        [
            f"output_dir={tmp_path}",
            f"name={name or method}",
            f"aggregator.name={method}",
            "data.num_clients=2",
            "data.max_examples=160",
            "lora.ranks=[2,4]",
            "federation.local_steps=3",
            *extra,
        ],
    )


def run(tmp_path: Path, method: str) -> tuple:
    cfg = tiny(tmp_path, method)
    run_dir, grid = run_local(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in rows if r["kind"] == "client"]
    assert len(clients) == 4 and all(r["status"] == "ok" for r in clients)
    return cfg, run_dir, grid, clients


def test_flora_merges_into_a_clean_base_and_exports_a_peft_adapter(tmp_path: Path) -> None:
    cfg, run_dir, _, clients = run(tmp_path, "flora")
    received = {r["round"]: r["bytes_received"] for r in clients if r["rank"] == 2}
    assert received[2] > received[1]  # the merged delta grows by this round's stacked ranks
    base, _ = cached_base_model(cfg)
    fresh = type(base).from_pretrained(base_model_dir(cfg))
    for (name, w), (_, w0) in zip(
        base.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert torch.equal(w, w0), f"{name} of the cached base was left modified"
    merged = load_checkpoint(run_dir)["strategy"]["agg_state"]
    module = "model.layers.0.self_attn.q_proj"
    expected = merged[module]["merged_B"].double() @ merged[module]["merged_A"].double()
    loaded = PeftModel.from_pretrained(fresh, str(run_dir / "final_adapter"))
    layer = loaded.get_submodule("base_model.model." + module)
    got = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert expected.abs().max() > 0


def test_ffa_clients_keep_the_shared_seed_a(tmp_path: Path) -> None:
    cfg, run_dir, _, _ = run(tmp_path, "ffa")  # the ffa aggregator raises if any A moved
    shapes = {m: (b.shape[0], a.shape[1]) for m, (b, a, _) in _global(run_dir).items()}
    start = initial_factors(shapes, rank=4, scaling=cfg.client_scaling(4), seed=cfg.seed)
    for module, (b, a, _) in _global(run_dir).items():
        assert torch.equal(a, start[module].A) and b.abs().max() > 0


def test_fedsa_keeps_b_on_the_clients_and_sends_a_only(tmp_path: Path) -> None:
    _, run_dir, grid, clients = run(tmp_path, "fedsa")
    for pid, context in enumerate(grid.contexts.values()):
        kept = context.state[LOCAL_B]
        assert isinstance(kept, ArrayRecord)
        Bs = kept.to_torch_state_dict()
        assert {B.shape[1] for B in Bs.values()} == {[2, 4][pid]}
        assert all(B.abs().max() > 0 for B in Bs.values())
    assert all(not b.any() for b, _, _ in _global(run_dir).values())  # the server never had B
    sent = {r["rank"]: r["bytes_sent"] for r in clients if r["round"] == 1}
    # A only: rank·(64 + 64 + 64 + 64) floats over 2 layers × (q, v), plus the record's framing
    assert sent[4] - sent[2] == 2 * 2 * (64 + 64) * 4


@pytest.mark.parametrize("method", ["squeeze", "fedsa"])
def test_a_run_extended_by_resume_is_the_run_it_would_have_been(tmp_path: Path, method) -> None:
    """Two rounds, then resumed for a third, give the three-round run bit for bit: the server's
    state (squeeze's residual) and the clients' (fedsa's own B, from their folders) come back
    whole, and every round's sampling and data order depend on the seed and round only."""
    straight, _ = run_local(tiny(tmp_path, method, "federation.rounds=3", name="straight"))
    short = tiny(tmp_path, method, "federation.rounds=2", name="extended")
    run_local(short)
    extended, _ = run_local(
        tiny(tmp_path, method, "federation.rounds=3", name="extended"), resume=True
    )
    for module, (b, a, s) in _global(straight).items():
        again = _global(extended)[module]
        assert torch.equal(b, again[0]) and torch.equal(a, again[1]) and s == again[2]

    def losses(run_dir: Path) -> list[tuple]:
        rows = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
        keep = ("kind", "round", "partition", "train_loss", "held_out_loss")
        return sorted(
            tuple(r.get(k) for k in keep) for r in rows if r["kind"] in ("client", "eval")
        )

    assert losses(extended) == losses(straight)
    assert {r[1] for r in losses(straight)} == {0, 1, 2, 3}
    # the best round's adapter (output.best_by) is the same file, of the lowest held-out round;
    # fedsa keeps none: its server holds A only
    if method == "fedsa":
        assert not (straight / "best_adapter").exists()
        return
    weights = "best_adapter/adapter_model.safetensors"
    assert (straight / weights).read_bytes() == (extended / weights).read_bytes()
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    held_out = {r["round"]: r["held_out_loss"] for r in rows if r.get("phase") == "round"}
    card = json.loads((straight / "best_adapter" / "fedllm_adapter.json").read_text())
    assert len(held_out) == 3 and card["round"] == min(held_out, key=held_out.get)


def _global(run_dir: Path) -> dict:
    return load_checkpoint(run_dir)["strategy"]["global"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:  # a shared 2-core machine: avoid oversubscription
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
