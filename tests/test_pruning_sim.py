"""A tiny federation with a pruned tier through Flower's real simulation engine (one round)."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedllm.cli import main

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
pytestmark = pytest.mark.slow


def test_pruned_tier_with_compressed_messages_runs_end_to_end(tmp_path: Path) -> None:
    tiers = (
        "lora.tiers=[{name: full, rank: 4, clients: 2}, "
        "{name: phone, rank: 2, clients: 1, pruning: 0.5}]"
    )
    code = main(
        [
            "run", RECIPE, f"output_dir={tmp_path}", "name=p", "federation.rounds=1",
            "federation.local_steps=4", "lora.ranks=null", tiers,
            "compression.dtype=bfloat16", "compression.topk=0.5",
        ]
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    clients = {r["partition"]: r for r in rows if r["kind"] == "client"}
    assert all(r["status"] == "ok" for r in clients.values())
    assert clients[2]["pruning"] == 0.5 and clients[0]["pruning"] == 0.0
    # the phone sends half of its q_proj rows (1 of 2 heads per kv group) at half the rank, plus
    # its kept-index map; Flower's per-array headers (~130 B) dominate at this tiny size
    assert clients[2]["bytes_sent"] < 0.75 * clients[0]["bytes_sent"]
    server = [r for r in rows if r["kind"] == "server"]
    assert server[-1]["held_out_loss"] < server[0]["held_out_loss"]
    adapter = load_file(str(tmp_path / "p" / "final_adapter" / "adapter_model.safetensors"))
    q = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert q.shape[0] == 64, "the global adapter keeps the full q_proj shape"
