"""`data.seed` fixes the data (subset, partition, held-out splits) while the run's seed varies."""

from __future__ import annotations

import json
from pathlib import Path

from fedllm.data.shards import raw_shard
from fedllm.recipe import build_config


def _cfg(source: Path, *, seed: int, data_seed: int | None):
    data = {"source": str(source), "partitioner": "iid", "num_clients": 2, "held_out": 0.25}
    return build_config({"seed": seed, "data": {**data, "seed": data_seed}})


def _texts(cfg) -> tuple[list[str], list[str]]:
    shard = raw_shard(cfg, 0)
    return [e["prompt"] for e in shard.train], [e["prompt"] for e in shard.held_out]


def test_the_data_follows_data_seed_not_the_run_seed(tmp_path: Path) -> None:
    source = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(40)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pinned = [_texts(_cfg(source, seed=s, data_seed=0)) for s in (0, 1, 2)]
    assert pinned[0] == pinned[1] == pinned[2]
    free = [_texts(_cfg(source, seed=s, data_seed=None)) for s in (0, 1)]
    assert free[0] != free[1]  # without it the run's seed redraws the data, as before
    assert free[0] == pinned[0]  # data.seed=0 is what seed=0 gave
    assert _cfg(source, seed=3, data_seed=None).data_seed == 3
