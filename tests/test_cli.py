"""`fedllm validate`: every shipped recipe passes, option typos fail early, overrides as for run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from fedllm.cli import main, split_recipes
from fedllm.model.loading import EMBEDDED, resolve_model_dir
from fedllm.recipe import ConfigError, RunConfig, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(str(p) for p in RECIPES.glob("*.yaml"))
TINY = str(RECIPES / "tiny.yaml")  # 3 clients, aggregator svd
SVD = str(RECIPES / "svd.yaml")  # 4 clients, aggregator svd


def ok_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("ok  ")]


def test_every_shipped_recipe_validates(capsys: pytest.CaptureFixture[str]) -> None:
    # Converted once, as any machine has after its first run: unconverted, each recipe on the
    # embedded base reads the GGUF's metadata and tokenizer again (+6 s a recipe on 2 cores;
    # the unconverted path's own test is test_preflight's)
    resolve_model_dir(EMBEDDED)
    assert len(SHIPPED) >= 10
    assert main(["validate", *SHIPPED]) == 0
    captured = capsys.readouterr()
    assert len(ok_lines(captured.out)) == len(SHIPPED)
    assert "error" not in captured.err


def test_a_typo_in_aggregator_options_fails_validation_with_a_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = yaml.safe_load((RECIPES / "squeeze.yaml").read_text())
    data["aggregator"]["options"] = {"oversampel": 4}
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "aggregator.options.oversampel: unknown option of 'squeeze'" in err
    assert "(did you mean 'oversample'?)" in err


def test_a_wrongly_typed_option_fails_validation(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", SVD, "aggregator.options.oversample=many"]) == 2
    assert "aggregator.options.oversample: 'svd' expects an int" in capsys.readouterr().err


def test_positional_overrides_apply_to_every_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", TINY, SVD, "name=renamed", "aggregator.name=fedit"]) == 0
    assert ok_lines(capsys.readouterr().out) == [
        f"ok  {TINY}: renamed, 3 clients, aggregator fedit",
        f"ok  {SVD}: renamed, 4 clients, aggregator fedit",
    ]


def test_set_is_kept_as_an_alias(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", TINY, "name=renamed", "--set", "aggregator.name=ffa"]) == 0
    assert ok_lines(capsys.readouterr().out) == [f"ok  {TINY}: renamed, 3 clients, aggregator ffa"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("federation.rounds=many", "federation.rounds: Input should be a valid integer"),
        ("federation.rondus=2", "federation.rondus: unknown key (did you mean 'rounds'?)"),
        ("aggregator.options.power_iter=1", "aggregator.options.power_iter: unknown option"),
        ("aggregator.name=sdv", "aggregator.name: unknown value 'sdv' (did you mean 'svd'?)"),
        ("aggregator.name=FedAvg", "'FedAvg' is not an aggregator: FedAvg of the LoRA factors is "
         "'fedit'"),
        ("federation.rounds.x=3", "federation.rounds is a value (2 in the recipe), not a section "
         "with keys (x); override it as federation.rounds=<value>"),
    ],
)  # fmt: skip
def test_a_bad_override_is_named_in_the_error(
    override: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", TINY, override]) == 2
    assert named in capsys.readouterr().err


def test_a_key_without_its_value_is_refused_before_any_recipe_is_called_ok(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["validate", TINY, "federation.rounds"]) == 2
    captured = capsys.readouterr()
    assert "'federation.rounds' is neither a recipe file nor key=value" in captured.err
    assert "ok  " not in captured.out
    assert main(["validate", TINY, "federation.rounds:4"]) == 2  # YAML's colon: its own value
    assert "(e.g. federation.rounds=4)" in capsys.readouterr().err
    assert main(["validate", "quikstart"]) == 2
    assert "(did you mean 'quickstart'?)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"if it is an override, write key=value \(e\.g\. f"):
        load_recipe("federation.rounds")  # `fedllm run federation.rounds`


def test_every_features_refusal_is_reported_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    """Client-level DP on pruned tiers: fixing the weighting (the first refusal) would only
    uncover the one that no change but dropping either can fix."""
    pruned = str(Path(TINY).with_name("pruned.yaml"))
    assert main(["validate", "--config-only", pruned, "privacy.mode=client",
                 "privacy.target_epsilon=8", "aggregator.weighting=examples"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "privacy.mode='client' needs aggregator.weighting='uniform'" in err
    assert "privacy.mode='client' with pruned clients is not supported" in err


def test_every_bad_recipe_is_reported_and_good_ones_still_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing.yaml")
    assert main(["validate", missing, TINY]) == 2
    captured = capsys.readouterr()
    assert f"recipe file {missing} not found" in captured.err
    assert ok_lines(captured.out) == [f"ok  {TINY}: tiny, 3 clients, aggregator svd"]


def test_an_existing_file_with_an_equals_sign_is_a_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = tmp_path / "rounds=2.yaml"
    shutil.copy(TINY, odd)
    assert split_recipes([str(odd), "a.b=1", TINY]) == ([str(odd), TINY], ["a.b=1"])
    assert main(["validate", str(odd)]) == 0
    assert ok_lines(capsys.readouterr().out) == [f"ok  {odd}: tiny, 3 clients, aggregator svd"]


def test_overrides_without_a_recipe_are_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "federation.rounds=2"]) == 2
    assert "at least one recipe" in capsys.readouterr().err


# -- `fedllm run`: --resume and --overwrite on the run directory ----------------------------------


class PrepareReached(Exception):
    """Raised by a stand-in for `prepare`: cmd_run got past its run-directory checks."""


@pytest.fixture
def no_prepare(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop `fedllm run` right after its run-directory checks (no model, no simulation)."""

    def stop(cfg: object) -> None:
        raise PrepareReached

    monkeypatch.setattr("fedllm.launch.prepare", stop)


def run_args(out: Path, name: str, *flags: str) -> list[str]:
    return ["run", TINY, f"output_dir={out}", f"name={name}", *flags]


@pytest.mark.parametrize("exists", [False, True])
def test_resume_without_a_checkpoint_is_an_error_naming_the_run_dir(
    tmp_path: Path, exists: bool, no_prepare: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "fresh"
    if exists:  # a run that died before its first checkpoint
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text("")
    assert main(run_args(tmp_path, "fresh", "--resume")) == 2
    err = capsys.readouterr().err
    assert f"no checkpoint.pt in {run_dir}" in err and "drop --resume" in err
    assert run_dir.exists() == exists


def test_resume_with_an_unreadable_checkpoint_suggests_overwrite(
    tmp_path: Path, no_prepare: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "broken"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    assert main(run_args(tmp_path, "broken", "--resume")) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'checkpoint.pt'} is not a readable checkpoint" in err
    assert "--overwrite" in err and "Traceback" not in err


def test_resume_with_a_checkpoint_goes_on(tmp_path: Path, no_prepare: None) -> None:
    from fedllm.server.checkpoint import save_checkpoint

    (tmp_path / "ok").mkdir()
    save_checkpoint(tmp_path / "ok", {"round": 1})
    with pytest.raises(PrepareReached):
        main(run_args(tmp_path, "ok", "--resume"))


@pytest.mark.parametrize(
    ("write", "arg", "message"),
    [
        (
            lambda p: p.write_text(Path(TINY).read_text() + "federation:\n  lr: 0.01\n"),
            "r.yaml",
            r"r\.yaml is not valid YAML: key 'federation' appears twice \(lines \d+ and \d+\)",
        ),
        (
            lambda p: p.write_bytes(b"name: caf\xe9\n"),
            "r.yaml",
            r"r\.yaml is not UTF-8 text \(byte 0xe9 at position 9\); save it as UTF-8",
        ),
        (lambda p: p.write_text("a: [1\n"), "r.yaml", r"in \".*r\.yaml\", line 1"),
        (lambda p: p.mkdir(), "r.yaml", r"r\.yaml is a folder; give a YAML file"),
        (lambda p: p.write_text("# only a comment\n"), "r.yaml", r"r\.yaml is empty; give at"),
        (
            lambda p: None,
            "federation.rounds",
            r"'federation\.rounds' is neither a recipe file nor key=value \(e\.g\. "
            r"federation\.rounds=2\)",
        ),
    ],
)
def test_a_recipe_that_cannot_be_read_is_named_with_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], write, arg: str, message: str
) -> None:
    write(tmp_path / "r.yaml")
    target = str(tmp_path / arg) if arg.endswith(".yaml") else arg
    assert main(["validate", target]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def checkpointed(out: Path, name: str, **state: object) -> tuple[Path, RunConfig]:
    """A run folder `name` in `out` holding a checkpoint of tiny.yaml (its fingerprint, and
    `state`), as `fedllm run ... --resume` finds it; (run dir, the recipe as the run resolves
    it)."""
    from fedllm.launch import absolute_paths
    from fedllm.server.checkpoint import save_checkpoint

    cfg = absolute_paths(load_recipe(TINY, [f"output_dir={out}", f"name={name}"]))
    cfg.run_dir.mkdir()
    save_checkpoint(cfg.run_dir, {"fingerprint": cfg.fingerprint(budget=False), **state})
    return cfg.run_dir, cfg


def test_resume_with_another_recipe_names_what_changed_and_writes_nothing(
    tmp_path: Path, no_prepare: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, cfg = checkpointed(tmp_path, "ok", round=1)
    (run_dir / "recipe.yaml").write_text(saved := cfg.to_yaml())
    assert main(run_args(tmp_path, "ok", "lora.ranks=[4]", "seed=7", "--resume")) == 2
    err = capsys.readouterr().err
    assert "was made by another recipe: seed is 0 there and 7 now; lora.ranks is [2, 4, 8] " in err
    assert "there and [4] now; resume with" in err and "name=<new name> or --overwrite" in err
    assert (run_dir / "recipe.yaml").read_text() == saved, "the run's recipe is left as it was"
    with pytest.raises(PrepareReached):  # the same recipe goes on
        main(run_args(tmp_path, "ok", "--resume"))


def test_resume_with_another_aggregator_is_refused_before_anything_is_prepared(
    tmp_path: Path, no_prepare: None, capsys: pytest.CaptureFixture[str]
) -> None:
    _, cfg = checkpointed(tmp_path, "agg", round=2, settings={"aggregator.name": "flora"})
    assert main(run_args(tmp_path, "agg", "--resume")) == 2
    err = capsys.readouterr().err
    assert f"aggregator.name is {cfg.aggregator.name!r}, but the checkpoint's rounds ran " in err
    assert "resume with aggregator.name=flora" in err and "Traceback" not in err
    with pytest.raises(PrepareReached):
        main(run_args(tmp_path, "agg", "aggregator.name=flora", "--resume"))


@pytest.mark.parametrize("name", [".", "..", "..."])
def test_a_run_name_of_only_dots_is_refused(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", TINY, f"name='{name}'"]) == 2  # quoted: `...` alone ends YAML
    err = capsys.readouterr().err
    assert f"name: {name!r} is not a run name" in err and "letters, digits" in err


def test_overwrite_with_name_dot_dot_deletes_nothing(
    tmp_path: Path, no_prepare: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"x")  # output_dir/.. looks like a run
    (tmp_path / "precious.txt").write_text("keep me")
    (tmp_path / "runs").mkdir()
    assert main(run_args(tmp_path / "runs", "..", "--overwrite")) == 2
    assert "name: '..' is not a run name" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_overwrite_refuses_a_run_dir_linking_outside_output_dir(
    tmp_path: Path, no_prepare: None, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "checkpoint.pt").write_bytes(b"x")
    (elsewhere / "precious.txt").write_text("keep me")
    out = tmp_path / "runs"
    out.mkdir()
    (out / "link").symlink_to(elsewhere, target_is_directory=True)
    assert main(run_args(out, "link", "--overwrite")) == 2
    err = capsys.readouterr().err
    assert f"refusing to delete {out / 'link'}" in err and "symbolic link" in err
    assert (elsewhere / "precious.txt").read_text() == "keep me"


def test_overwrite_deletes_a_run_inside_output_dir(tmp_path: Path, no_prepare: None) -> None:
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "checkpoint.prev.pt").write_bytes(b"x")  # only the previous copy survived
    (run_dir / "stale.txt").write_text("from the old run")
    with pytest.raises(PrepareReached):
        main(run_args(tmp_path, "old", "--overwrite"))
    assert run_dir.is_dir() and not (run_dir / "stale.txt").exists()


def test_an_existing_previous_checkpoint_alone_still_needs_a_flag(
    tmp_path: Path, no_prepare: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoint.prev.pt").write_bytes(b"x")
    assert main(run_args(tmp_path, "old")) == 2
    assert "pass --resume to continue it, --overwrite" in capsys.readouterr().err


def test_remove_run_dir_deletes_only_run_folders_inside_output_dir(tmp_path: Path) -> None:
    from fedllm.launch import remove_run_dir
    from fedllm.recipe import ConfigError

    out = tmp_path / "runs"
    notes = out / "notes"
    notes.mkdir(parents=True)
    (notes / "todo.txt").write_text("not a run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "recipe.yaml").write_text("name: other\n")
    (out / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match="does not look like a fedllm run"):
        remove_run_dir(notes, out)
    with pytest.raises(ConfigError, match="not a folder inside output_dir"):
        remove_run_dir(out / ".." / "other", out)
    with pytest.raises(ConfigError, match="not a folder inside output_dir"):
        remove_run_dir(out, out)
    assert (notes / "todo.txt").exists() and (tmp_path / "other" / "recipe.yaml").exists()
    (notes / "metrics.jsonl").write_text("")
    remove_run_dir(notes, out)
    assert not notes.exists() and out.is_dir()


def test_overrides_may_come_after_a_flag() -> None:
    """`fedllm run R name=x --overwrite data.max_examples=10`: both overrides reach the recipe."""
    from fedllm.cli import parse

    args = parse(["run", "recipes/tiny.yaml", "name=x", "--overwrite", "data.max_examples=10"])
    assert args.overwrite and args.overrides == ["name=x", "data.max_examples=10"]
    args = parse(["validate", "recipes/tiny.yaml", "--set", "seed=1", "federation.rounds=2"])
    assert args.overrides == ["seed=1", "federation.rounds=2"]


def test_a_stray_flag_is_still_an_error() -> None:
    from fedllm.cli import parse

    with pytest.raises(SystemExit):
        parse(["run", "recipes/tiny.yaml", "--bogus"])


@pytest.mark.parametrize("which", ["output_dir", "name"])
def test_a_file_where_the_run_folder_goes_is_named_before_anything_is_written(
    tmp_path: Path, which: str, no_prepare: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # h110: `output_dir=<a file>` ended in a NotADirectoryError traceback
    blocker = tmp_path / "taken"
    blocker.write_text("mine")
    out, name = (blocker, "x") if which == "output_dir" else (tmp_path, "taken")
    assert main(run_args(out, name)) == 2
    assert f"{which}: {blocker} is a file, not a folder" in capsys.readouterr().err
    assert blocker.read_text() == "mine"
    assert main(["validate", TINY, f"output_dir={out}", f"name={name}"]) == 2
    assert f"{which}: {blocker} is a file" in capsys.readouterr().err


def test_an_os_error_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(args: object) -> int:
        raise PermissionError(13, "Permission denied", "/srv/runs/x")

    monkeypatch.setattr("fedllm.cli.cmd_validate", refuse)
    assert main(["validate", TINY]) == 2
    assert capsys.readouterr().err == "fedllm: error: [Errno 13] Permission denied: '/srv/runs/x'\n"


def test_resume_and_overwrite_together_are_refused(tmp_path: Path, no_prepare: None, capsys):
    assert main(run_args(tmp_path, "both", "--resume", "--overwrite")) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_an_unknown_federation_connection_fails_before_the_run_folder_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_prepare: None, capsys
) -> None:
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "prod"\n\n[superlink.prod]\naddress = "127.0.0.1:9093"\n'
    )
    monkeypatch.setenv("FLWR_HOME", str(home))
    assert main(run_args(tmp_path, "fed", "--federation", "prd")) == 2
    err = capsys.readouterr().err
    assert "--federation 'prd': no such SuperLink connection" in err
    assert "(did you mean 'prod'?); known: prod" in err
    assert not (tmp_path / "fed").exists()


def test_eval_with_a_missing_recipe_names_the_recipe(tmp_path: Path, capsys) -> None:
    assert main(["eval", str(tmp_path), "--recipe", str(tmp_path / "nosuch.yaml")]) == 2
    assert f"--recipe {tmp_path / 'nosuch.yaml'} not found" in capsys.readouterr().err


def test_ffa_with_pruned_clients_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # h97: the coverage rescaling rebuilt updates from the clients' own A (a hostile pruned
    # client's A went in unchecked) and column-pruned modules refused every round
    pruned = str(Path(TINY).with_name("pruned.yaml"))
    assert main(["validate", "--config-only", pruned, "aggregator.name=ffa"]) == 2
    assert "'ffa' (frozen shared A) with pruned clients is not supported" in capsys.readouterr().err
