"""fedllm/server/settings_record.py: what a checkpoint keeps beside the fingerprint, and a
resume that names each setting changed since its finished rounds."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fedllm.aggregators import available
from fedllm.features import registry
from fedllm.files import keep_recipe, keep_resume_recipe
from fedllm.launch import check_resumable
from fedllm.recipe import ConfigError, load_recipe
from fedllm.server.app import Run
from fedllm.server.checkpoint import load_checkpoint, plain
from fedllm.server.outputs import resume_note
from fedllm.server.settings_record import (
    aggregator_changed,
    changed_settings,
    describe_changes,
    settings_record,
    stable,
)

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def _cfg(tmp_path: Path, *extra: str):
    return load_recipe(TINY, [f"output_dir={tmp_path}", "name=r", "federation.rounds=5", *extra])


def _run(cfg, written: list[dict] | None = None) -> SimpleNamespace:
    """What Run.save and Run.resume use of a Run, without a model or a grid; metrics rows the
    resume writes go to `written`."""
    sink = written if written is not None else []
    return SimpleNamespace(
        cfg=cfg,
        features=registry.build(cfg),
        strategy=SimpleNamespace(state_dict=dict, load_state_dict=lambda state: None),
        metrics=SimpleNamespace(
            truncate_after=lambda last: None,
            catch_up=lambda last: [],
            write=lambda rows, publish: sink.extend(rows),
            read=lambda: [],
        ),
        save=lambda *args, **kw: None,
    )


def test_the_record_has_every_default_the_run_trains_with(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "aggregator.name=squeeze", "features.fedprox={}")
    record = settings_record(cfg, registry.build(cfg))
    assert record["aggregator.name"] == "squeeze"
    assert record["aggregator.options.gauge"] == "rows"  # a default the recipe never names
    assert record["aggregator.options.lam"] == 0.01
    assert record["features.fedprox.mu"] == 0.01
    assert record["federation.lr"] == cfg.federation.lr
    assert "federation.rounds" not in record  # a resume may extend the budget


def test_a_resume_says_each_changed_setting_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """squeeze's gauge default changed between versions: a run whose rounds ran `balanced`
    resumed under `rows` must say so (the recipe's `options: {}` alone cannot show it)."""
    old = _cfg(tmp_path, "aggregator.name=squeeze", "aggregator.options.gauge=balanced")
    old.run_dir.mkdir(parents=True)
    Run.save(_run(old), 3)
    assert load_checkpoint(old.run_dir)["settings"]["aggregator.options.gauge"] == "balanced"
    capsys.readouterr()
    assert Run.resume(_run(old)) == 4 and "was" not in capsys.readouterr().out  # same settings
    new = _cfg(tmp_path, "aggregator.name=squeeze", "federation.lr=0.002")
    written: list[dict] = []
    assert Run.resume(_run(new, written)) == 4
    assert written == [  # on disk: the next checkpoint keeps only today's settings
        {
            "kind": "resume",
            "round": 3,
            "changed": {
                "aggregator.options.gauge": ["balanced", "rows"],
                "federation.lr": [0.005, 0.002],
            },
        }
    ]
    out = capsys.readouterr().out
    assert (
        "[fedllm] resume: aggregator.options.gauge was 'balanced' in the last attempt (up to "
        "round 3) and is 'rows' now (the recipe or a default changed)" in out
    )
    assert "resume: federation.lr was 0.005 in the last attempt (up to round 3) and is 0.002" in out
    assert "resuming r after round 3" in out


def test_a_resume_under_another_aggregator_is_refused(tmp_path: Path) -> None:
    """The checkpoint holds the saved aggregator's state (squeeze's residual, flora's merged
    delta) and its round semantics: another aggregator would misread it (squeeze -> flora raised
    after every round's training), so the resume is refused by name before any round."""
    old = _cfg(tmp_path, "aggregator.name=squeeze")
    old.run_dir.mkdir(parents=True)
    Run.save(_run(old), 2)
    with pytest.raises(ValueError, match=r"aggregator\.name is 'flora', but the checkpoint's"):
        Run.resume(_run(_cfg(tmp_path, "aggregator.name=flora")))
    assert Run.resume(_run(old)) == 3  # the same aggregator goes on
    assert aggregator_changed(None, old) is None  # a checkpoint from before the record
    saved = load_checkpoint(old.run_dir)["settings"]
    why = aggregator_changed(saved, _cfg(tmp_path, "aggregator.name=svd"))
    assert why is not None and "resume with aggregator.name=squeeze" in why


def test_a_resume_with_fewer_rounds_than_ran_is_refused(tmp_path: Path) -> None:
    # h92: "resuming after round 4 of 2", then a final card saying "round 4 of 2"
    cfg = _cfg(tmp_path)
    cfg.run_dir.mkdir(parents=True)
    Run.save(_run(cfg), 4)
    fewer = _cfg(tmp_path, "federation.rounds=2")
    with pytest.raises(ValueError, match=r"after round 4, but federation\.rounds is 2"):
        Run.resume(_run(fewer))
    with pytest.raises(ConfigError, match=r"after round 4, but federation\.rounds is 2"):
        check_resumable(cfg.run_dir, fewer)


def test_a_resume_keeps_the_recipe_the_run_began_with(tmp_path: Path) -> None:
    # h92: recipe.yaml and the cards said lr 0.01 for rounds that ran at 0.005
    cfg = _cfg(tmp_path)
    keep_recipe(cfg.run_dir, cfg.to_yaml(), resume=False)
    first = (cfg.run_dir / "recipe.yaml").read_text()
    keep_resume_recipe(cfg.run_dir, cfg.to_yaml())  # nothing changed: nothing added
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["recipe.yaml"]
    for lr in ("0.002", "0.002", "0.004"):
        keep_resume_recipe(cfg.run_dir, _cfg(tmp_path, f"federation.lr={lr}").to_yaml())
    assert (cfg.run_dir / "recipe.yaml").read_text() == first
    names = sorted(p.name for p in cfg.run_dir.iterdir())
    assert names == ["recipe.resume-1.yaml", "recipe.resume-2.yaml", "recipe.yaml"]
    assert "lr: 0.004" in (cfg.run_dir / "recipe.resume-2.yaml").read_text()
    (cfg.run_dir / "recipe.resume-1.yaml").unlink()  # numbered past the highest, not the count
    keep_resume_recipe(cfg.run_dir, _cfg(tmp_path, "federation.lr=0.003").to_yaml())
    assert (cfg.run_dir / "recipe.resume-3.yaml").exists()


def test_a_refused_resume_leaves_no_recipe_of_its_own(tmp_path: Path) -> None:
    # h96: the resume file was written before the server's checks, which may refuse
    cfg = _cfg(tmp_path)
    cfg.run_dir.mkdir(parents=True)
    keep_recipe(cfg.run_dir, cfg.to_yaml(), resume=False)
    Run.save(_run(cfg), 4)
    with pytest.raises(ValueError, match="federation"):
        Run.resume(_run(_cfg(tmp_path, "federation.rounds=2")))
    assert not list(cfg.run_dir.glob("recipe.resume-*"))
    assert Run.resume(_run(_cfg(tmp_path, "federation.lr=0.002"))) == 5
    assert (cfg.run_dir / "recipe.resume-1.yaml").exists()


def test_changes_name_added_and_removed_settings() -> None:
    saved = {"aggregator.name": "squeeze", "features.fedprox.mu": 0.01}
    now = {"aggregator.name": "svd"}
    changes = changed_settings(saved, now, saved_round=2)
    assert changes == {
        "aggregator.name": ["squeeze", "svd"],
        "features.fedprox.mu": [0.01, "(not set)"],
    }
    assert describe_changes(changes, saved_round=2)[0] == (
        "resume: aggregator.name was 'squeeze' in the last attempt (up to round 2) and is 'svd' "
        "now (the recipe or a default changed); the run goes on with today's value (set it in "
        "the recipe to keep the old one; metrics.jsonl's resume rows keep each change)"
    )
    assert changed_settings(None, now, saved_round=2) == {}  # a checkpoint before the record
    assert changed_settings(saved, now, saved_round=0) == {}  # nothing aggregated yet
    assert changed_settings(now, dict(now), saved_round=2) == {}


@pytest.mark.parametrize("name", available())
def test_every_aggregators_record_reads_back_equal(name: str, tmp_path: Path) -> None:
    """Saved with the checkpoint and read with weights_only, the record must compare equal, or
    every resume would report a change."""
    cfg = _cfg(tmp_path, f"aggregator.name={name}")
    record = settings_record(cfg, [])
    torch.save(plain(record), tmp_path / "r.pt")
    assert torch.load(tmp_path / "r.pt", weights_only=True) == record


def test_stable_values_survive_another_process() -> None:
    class Knob:
        pass

    assert stable(float("nan")) == "nan" and stable(0.5) == 0.5 and stable(None) is None
    assert stable(frozenset({"b", "a"})) == "['a', 'b']"  # not hash order
    assert stable(Knob()) == "Knob"  # not <Knob object at 0x...>
    assert stable((1, 2)) == "(1, 2)"


def test_constrained_sections_and_devices_are_recorded(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "pruning.importance=magnitude", "compression.dtype=bfloat16")
    record = settings_record(cfg, [])
    assert record["pruning.importance"] == "magnitude"
    assert record["compression.dtype"] == "bfloat16" and record["compression.topk"] is None
    assert not any(k.startswith("adaptive.") for k in record) and "devices" not in record
    assert record["version"] == 2
    now = settings_record(_cfg(tmp_path, "pruning.importance=wanda"), [])
    changes = changed_settings(record, now, saved_round=1)
    assert changes == {
        "pruning.importance": ["magnitude", "wanda"],
        "compression.dtype": ["bfloat16", "float32"],
    }


def test_a_version_1_record_is_compared_on_what_it_kept(tmp_path: Path) -> None:
    """A checkpoint from before version 2 kept neither the constrained sections nor the client
    options' defaults: a resume must not report those as changed, only what both recorded."""
    now = settings_record(_cfg(tmp_path, "aggregator.name=prelort"), [])
    assert now["aggregator.options.nested"] is True  # the client's default, declared
    old = {k: v for k, v in now.items() if not k.startswith(("pruning.", "compression."))}
    old = old | {"aggregator.options.nested": None, "federation.lr": 0.5}
    del old["version"]
    assert changed_settings(old, now, saved_round=2) == {
        "federation.lr": [0.5, now["federation.lr"]]
    }


def test_a_version_1_record_still_reports_real_changes(tmp_path: Path) -> None:
    """Version 1 kept an unset client option as None: read as the declared default, so a
    switch away from it is a change; a server option it kept as None compares as it is."""
    cfg = _cfg(tmp_path, "aggregator.name=prelort", "aggregator.options.nested=false")
    now = settings_record(cfg, [])
    old = {k: v for k, v in now.items() if not k.startswith(("pruning.", "compression."))}
    old = old | {"aggregator.options.nested": None}
    del old["version"]
    changes = changed_settings(old, now, saved_round=2)
    assert changes == {"aggregator.options.nested": [True, False]}
    cfg = _cfg(tmp_path, "aggregator.name=squeeze", "aggregator.options.residual_rank=4")
    now = settings_record(cfg, [])
    old = {k: v for k, v in now.items() if k != "version"}
    old["aggregator.options.residual_rank"] = None
    changes = changed_settings(old, now, saved_round=2)
    assert changes == {"aggregator.options.residual_rank": [None, 4]}


def test_a_card_after_a_resume_that_changed_settings_says_so() -> None:
    # h92: the final card named lr 0.01 for an adapter whose rounds 1-3 ran at 0.005
    rows = [
        {"kind": "server", "round": 3},
        {"kind": "resume", "round": 3, "changed": {"federation.lr": [0.005, 0.01]}},
    ]
    assert resume_note(rows, 3) == ""  # the adapter of round 3 ran before the change
    note = resume_note(rows, 5)
    assert "after round 3: federation.lr 0.005 -> 0.01" in note and "last one's" in note
    assert resume_note([{"kind": "resume", "round": 2, "changed": {}}], 4) == ""
