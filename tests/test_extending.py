"""docs/extending.md's package, installed as written (its modules on sys.path beside a
dist-info with its entry points, as `pip install -e .` leaves them): found, option-checked, and
run in a federation."""

from __future__ import annotations

import json
import math
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedllm.aggregators import Factors, available, get, registry
from fedllm.eval.registry import available_tasks
from fedllm.features import registry as features
from fedllm.recipe import ConfigError, build_config, load_recipe

DOC = Path(__file__).parents[1] / "docs" / "extending.md"
RECIPE = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
BLOCK = re.compile(r"```(python|toml)\n(.*?)```", re.DOTALL)


def install(site: Path) -> dict[str, str]:
    """Write the page's modules and a dist-info for its entry points into `site`."""
    blocks = BLOCK.findall(DOC.read_text())
    files = {
        body.splitlines()[0].removeprefix("# "): body
        for lang, body in blocks
        if lang == "python" and body.startswith("# myfed/")
    }
    assert set(files) == {"myfed/clipped.py", "myfed/anchor.py", "myfed/tasks.py"}
    (site / "myfed").mkdir(parents=True)
    (site / "myfed" / "__init__.py").write_text("")
    for name, body in files.items():
        (site / name).write_text(body)
    project = tomllib.loads(next(body for lang, body in blocks if lang == "toml"))["project"]
    info = site / f"{project['name']}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Name: {project['name']}\nVersion: {project['version']}\n")
    points = "".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items())
        for group, entries in project["entry-points"].items()
    )
    (info / "entry_points.txt").write_text(points)
    return files


@pytest.fixture
def myfed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The package installed; fedllm's registries as copies, dropped (with myfed) afterwards."""
    available()  # the built-in methods and features first, into copies the test may change
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ROUNDS", dict(registry._ROUNDS))
    monkeypatch.setattr(registry, "_discovery", "pending")
    monkeypatch.setattr(features, "_FEATURES", dict(features.discover()))
    install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield
    for name in [m for m in sys.modules if m == "myfed" or m.startswith("myfed.")]:
        del sys.modules[name]


def rank1(u: list[float], v: list[float], scaling: float = 1.0) -> Factors:
    return Factors(torch.tensor([u]).T, torch.tensor([v]), scaling)


@pytest.mark.usefixtures("myfed")
def test_the_pages_aggregator_clips_each_update_by_hand() -> None:
    assert "clipped_svd" in available()
    a = rank1([3.0, 0.0], [0.0, 4.0])  # ‖ΔW‖ = 12: clipped to 6 at max_norm 6
    b = rank1([1.0, 0.0], [1.0, 0.0], scaling=2.0)  # ‖ΔW‖ = 2: kept
    result = get("clipped_svd")([a, b], [1.0, 3.0], max_norm=6.0).global_
    expected = 0.25 * 0.5 * a.delta() + 0.75 * b.delta()
    assert torch.allclose(result.delta(), expected, atol=1e-5)
    registry.check_options("clipped_svd", {"max_norm": 0.5})
    with pytest.raises(ValueError, match="max_norm: 'clipped_svd' expects a value greater than 0"):
        registry.check_options("clipped_svd", {"max_norm": -1})


@pytest.mark.usefixtures("myfed")
def test_the_pages_feature_and_task_are_found_and_their_options_checked() -> None:
    base = {"data": {"num_clients": 2}, "lora": {"ranks": 2, "alpha": 4}}
    cfg = build_config(
        {**base, "aggregator": {"name": "clipped_svd"}, "features": {"b_anchor": {"mu": 0.5}}}
    )
    assert [f.name for f in features.build(cfg) if f.name == "b_anchor"] == ["b_anchor"]
    with pytest.raises(ConfigError, match=r"features\.b_anchor\.muu: unknown option"):
        build_config({**base, "features": {"b_anchor": {"muu": 0.5}}})
    with pytest.raises(ConfigError, match="'b_anchor' add\\(s\\) to the plain local steps"):
        build_config(
            {
                **base,
                "features": {"b_anchor": {}},
                "privacy": {"mode": "sample", "target_epsilon": 8.0},
            }
        )
    # its check: a pull towards the round's start, with clients that start from a merged delta
    with pytest.raises(ConfigError, match=r"features\.b_anchor needs clients that start from"):
        build_config({**base, "aggregator": {"name": "flora"}, "features": {"b_anchor": {}}})
    assert "response_chars" in available_tasks()


@pytest.mark.slow
@pytest.mark.usefixtures("myfed")
def test_the_pages_package_runs_a_federation(tmp_path: Path) -> None:
    from fedllm.deploy.local_grid import run_local

    cfg = load_recipe(
        RECIPE,
        [
            f"output_dir={tmp_path}",
            "name=plugin",
            "federation.rounds=2",
            "federation.local_steps=2",
            "aggregator={name: clipped_svd, options: {max_norm: 0.5}}",
            "features.b_anchor={mu: 0.5}",
        ],
    )
    run_dir, _ = run_local(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in rows if r["kind"] == "client"]
    assert clients and all(r["status"] == "ok" for r in clients)
    second = [r["b_anchor_last"] for r in clients if r["round"] == 2]
    assert second and all(math.isfinite(x) and x > 0 for x in second)  # B moved from its start
    assert (run_dir / "final_adapter" / "adapter_config.json").is_file()
