"""`fedllm recipes` as a user types it: list the shipped recipes, copy one, name one instead of a
path. The shipped recipes are the checkout's `recipes/` folder, installed as `fedllm.recipes`."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.cli import main
from fedllm.recipe.shipped import shipped_folder, summary

RECIPES = Path(__file__).parents[1] / "recipes"
NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml"))


def test_shipped_recipes_are_the_checkout_folder() -> None:
    assert shipped_folder().resolve() == RECIPES.resolve()  # editable install: the same files
    assert {"quickstart", "tiny", "svd"} <= set(NAMES)


@pytest.mark.parametrize("argv", [["recipes"], ["recipes", "ls"]])
def test_recipes_lists_every_recipe_with_its_header(argv: list[str], capsys) -> None:
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == NAMES
    width = max(map(len, NAMES))  # names padded to one column
    by_name = {line[:width].strip(): line[width + 2 :] for line in lines}
    # the first sentence of each header comment, cut to 80 characters
    assert by_name["fedit"] == (
        "FedIT: per-factor weighted mean of B and A, zero-padded to the largest rank (bi…"
    )
    assert by_name["pruned"] == "Constrained devices: SmolLM2-135M-Instruct with three tiers."
    assert len(by_name["tiny"]) == 80 and by_name["tiny"].startswith("A one-minute federation")


def test_summary_stops_at_the_header(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("# Short one. More text.\n# Run: fedllm run r.yaml\nname: r\n")
    assert summary(path) == "Short one."
    path.write_text("# A header that runs\n# over two lines.\n\n# not this\nname: r\n")
    assert summary(path) == "A header that runs over two lines."
    path.write_text("name: r\n")
    assert summary(path) == ""


def test_recipes_cp_copies_a_recipe_that_then_runs_by_path(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "cp", "tiny"]) == 0  # default: ./tiny.yaml
    assert (tmp_path / "tiny.yaml").read_bytes() == (RECIPES / "tiny.yaml").read_bytes()
    assert "fedllm run tiny.yaml" in capsys.readouterr().out
    assert main(["recipes", "cp", "svd", "mine.yaml"]) == 0
    assert (tmp_path / "mine.yaml").read_bytes() == (RECIPES / "svd.yaml").read_bytes()
    (tmp_path / "sub").mkdir()
    assert main(["recipes", "cp", "recipes/ffa.yaml", "sub"]) == 0  # a folder: keeps the name
    assert (tmp_path / "sub" / "ffa.yaml").is_file()
    capsys.readouterr()
    assert main(["validate", "mine.yaml", "federation.rounds=7"]) == 0
    assert capsys.readouterr().out.startswith("ok  mine.yaml: svd,")


def test_recipes_cp_refuses_to_overwrite_or_guess(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text("# my edits\n")
    assert main(["recipes", "cp", "tiny"]) == 2
    assert "tiny.yaml already exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "tiny.yaml").read_text() == "# my edits\n"
    assert main(["recipes", "cp", "tiny", "--force"]) == 0
    assert (tmp_path / "tiny.yaml").read_bytes() == (RECIPES / "tiny.yaml").read_bytes()
    assert main(["recipes", "cp", "quikstart"]) == 2
    err = capsys.readouterr().err
    assert "no shipped recipe named 'quikstart'" in err and "quickstart" in err
    assert main(["recipes", "cp", "tiny", "nowhere/tiny.yaml"]) == 2
    assert "folder nowhere does not exist" in capsys.readouterr().err


def test_a_recipe_name_works_where_a_path_is_expected(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: names resolve to the shipped ones
    assert main(["validate", "quickstart", "tiny.yaml", "recipes/svd.yaml"]) == 0
    out = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("    ")]
    assert out == [
        "ok  quickstart: quickstart, 4 clients, aggregator svd",
        "ok  tiny.yaml: tiny, 3 clients, aggregator svd",
        "ok  recipes/svd.yaml: svd, 4 clients, aggregator svd",
    ]
    assert main(["validate", "nope"]) == 2
    assert "recipe file nope not found, and it is not a shipped recipe" in capsys.readouterr().err
    (tmp_path / "quickstart").write_text("name: local\nmodel: {name: tiny}\n")
    assert main(["validate", "quickstart"]) == 0  # an existing file wins over a name
    assert capsys.readouterr().out.startswith("ok  quickstart: local,")
