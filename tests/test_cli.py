"""`fedllm validate`: every shipped recipe passes, option typos fail early, overrides as for run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from fedllm.cli import main, split_recipes

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(str(p) for p in RECIPES.glob("*.yaml"))
TINY = str(RECIPES / "tiny.yaml")  # 3 clients, aggregator svd
SVD = str(RECIPES / "svd.yaml")  # 4 clients, aggregator svd


def ok_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("ok  ")]


def test_every_shipped_recipe_validates(capsys: pytest.CaptureFixture[str]) -> None:
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
    ],
)
def test_a_bad_override_is_named_in_the_error(
    override: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", TINY, override]) == 2
    assert named in capsys.readouterr().err


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
