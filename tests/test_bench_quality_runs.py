"""bench/_quality_runs.py: a grid cell resumes only a checkpoint its own settings made."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

from fedllm.recipe import load_recipe
from fedllm.server.app import Run
from fedllm.server.checkpoint import load_checkpoint, save_checkpoint

_spec = importlib.util.spec_from_file_location(
    "bench_quality_runs", Path(__file__).parents[1] / "bench" / "_quality_runs.py"
)
Q = importlib.util.module_from_spec(_spec)
sys.modules["bench_quality_runs"] = Q
_spec.loader.exec_module(Q)

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def test_a_cell_restarts_when_its_rounds_ran_other_aggregator_options(tmp_path: Path) -> None:
    """The grid relabelled 'squeeze' when gauge's default changed: a finished cell of the old
    default must not be resumed as the new one (the recipe fingerprint leaves options out)."""
    base = [f"output_dir={tmp_path}", "name=cell", "aggregator.name=squeeze"]
    old = load_recipe(TINY, [*base, "aggregator.options.gauge=balanced"])
    old.run_dir.mkdir(parents=True)
    assert Q._stale_checkpoint(old) == "no readable checkpoint"
    Run.save(SimpleNamespace(cfg=old, features=[], strategy=SimpleNamespace(state_dict=dict)), 2)
    assert Q._stale_checkpoint(old) is None
    assert Q._stale_checkpoint(load_recipe(TINY, base)) == (
        "its rounds ran with other settings (aggregator.options.gauge)"
    )
    other_seed = load_recipe(TINY, [*base, "aggregator.options.gauge=balanced", "seed=5"])
    assert "another recipe" in Q._stale_checkpoint(other_seed)


def test_a_cell_resumes_a_version_1_record_of_the_same_settings(tmp_path: Path) -> None:
    """A checkpoint of an older record version (no constrained sections) is resumed, not
    restarted, when what it recorded is what the cell runs; one without a record restarts."""
    cfg = load_recipe(TINY, [f"output_dir={tmp_path}", "name=cell", "aggregator.name=squeeze"])
    cfg.run_dir.mkdir(parents=True)
    Run.save(SimpleNamespace(cfg=cfg, features=[], strategy=SimpleNamespace(state_dict=dict)), 2)
    state = load_checkpoint(cfg.run_dir)
    v1 = {k: v for k, v in state["settings"].items() if not k.startswith(("pruning.", "compr"))}
    del v1["version"]
    save_checkpoint(cfg.run_dir, state | {"settings": v1})
    assert Q._stale_checkpoint(cfg) is None
    save_checkpoint(cfg.run_dir, {k: v for k, v in state.items() if k != "settings"})
    assert "predates the settings record" in Q._stale_checkpoint(cfg)
