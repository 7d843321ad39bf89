"""What a finished run leaves in its folder: the global adapter in PEFT format, each client's
latest update as the server saw it, the held-out plot and the base-vs-federated table."""

from __future__ import annotations

import json
from pathlib import Path

from fedllm.model.adapters import save_peft_adapter
from fedllm.model.base import base_model_dir
from fedllm.recipe.schema import RunConfig
from fedllm.server.exchange import say
from fedllm.server.metrics import MetricsLog, final_table, plot_held_out, table_markdown
from fedllm.server.strategy import LoraStrategy


def save_client_adapters(cfg: RunConfig, strategy: LoraStrategy) -> None:
    """Each client's latest accepted update as a PEFT adapter: what an honest-but-curious server
    holds (`client_adapters/<partition>/`, with the round of each in `index.json`)."""
    folder = cfg.run_dir / "client_adapters"
    index = {}
    for pid, (rnd, factors) in sorted(strategy.client_updates.items()):
        save_peft_adapter(
            folder / str(pid),
            factors,
            base_model=str(base_model_dir(cfg)),
            target_modules=cfg.lora.target_modules,
            dropout=cfg.lora.dropout,
        )
        index[str(pid)] = {"round": rnd, "rank": max(f.rank for f in factors.values())}
    if index:
        (folder / "index.json").write_text(json.dumps(index, indent=2))


def finish(cfg: RunConfig, strategy: LoraStrategy, metrics: MetricsLog) -> Path:
    """Save the global adapter in PEFT format, the plot, and the base-vs-federated table."""
    run_dir = cfg.run_dir
    save_peft_adapter(
        run_dir / "final_adapter",
        strategy.global_,
        base_model=str(base_model_dir(cfg)),
        target_modules=cfg.lora.target_modules,
        dropout=cfg.lora.dropout,
    )
    save_client_adapters(cfg, strategy)
    rows = metrics.read()
    plot_held_out(rows, run_dir / "held_out_loss.png", title=f"{cfg.name}: held-out loss")
    last = max((r["round"] for r in rows if r.get("kind") == "server"), default=0)
    table = final_table(rows, last)  # a privacy budget may have stopped the run early
    (run_dir / "final_eval.json").write_text(json.dumps(table, indent=2))
    md = table_markdown(table)
    (run_dir / "final_eval.md").write_text(f"# {cfg.name}: base vs federated adapter\n\n{md}\n")
    say(f"finished: adapter in {run_dir / 'final_adapter'}\n{md}")
    return run_dir
