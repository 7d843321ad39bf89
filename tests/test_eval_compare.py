"""`fedllm compare`: headline numbers picked from each run's report, one table, one figure."""

import json
from pathlib import Path

import pytest

from fedllm.cli import main
from fedllm.eval.compare import summarize


def attack(auc: float) -> dict:
    """A pooled attack entry; its TPR@FPR<1% is auc / 10, with an interval, and too few
    non-members (10) for that FPR, as `roc.attack_metrics` marks it."""
    tpr = {"value": auc / 10, "interval": [auc / 20, auc / 5], "enough_non_members": False}
    return {"auc": auc, "members": 10, "non_members": 10, "tpr@fpr<0.01": tpr}


def report(name: str, *, loss: float, aucs: dict, exposures: list[tuple[str, int, float]]) -> dict:
    return {
        "run": name,
        "quality": {
            "base": {"global": {"held_out": {"loss": 3.0}}},
            "global": {
                "global": {
                    "held_out": {"loss": loss, "perplexity": 2.0},
                    "define": {"rouge_l": 0.25},
                    "choose": {"accuracy": 0.5},
                }
            },
        },
        "leakage": {
            "mia": {"global": {"pooled": {k: attack(v) for k, v in aucs.items()}}},
            "exposure": [
                {"view": v, "repeats": k, "exposure_skewnormal": e} for v, k, e in exposures
            ],
            "extraction": {  # 6 of 64, 4 of 8, and a client with nothing to decode (rate NaN)
                "global": {
                    "0": {"members": {"examples": 64, "exact": 6 / 64}},
                    "1": {"members": {"examples": 8, "exact": 0.5}},
                    "2": {"members": {"examples": 0, "exact": None}},
                }
            },
        },
    }


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    a = report(
        "plain",
        loss=2.0,
        aucs={"loss": 0.7, "min_k": 0.8},
        exposures=[
            ("global", 1, 2.0),
            ("global", 16, 10.0),
            ("global", 16, 12.0),
            ("client", 16, 20.0),
        ],
    )
    b = report("dp", loss=2.5, aucs={"loss": 0.52}, exposures=[("global", 16, 1.0)])
    choose = a["quality"]["global"]["global"]["choose"]
    choose["accuracy_low"], choose["accuracy_high"] = 0.4, 0.6  # b: a report from before
    dirs = []
    for r, mode in ((a, "none"), (b, "sample")):
        d = tmp_path / r["run"]
        (d / "eval").mkdir(parents=True)
        (d / "eval" / "report.json").write_text(json.dumps(r))
        (d / "recipe.yaml").write_text(f"name: {r['run']}\nprivacy:\n  mode: {mode}\n")
        dirs.append(d)
    return dirs


def test_summary_picks_best_auc_mean_exposure_and_extraction(runs: list[Path]) -> None:
    row = summarize(json.loads((runs[0] / "eval" / "report.json").read_text()))
    assert row["mia_auc_global"] == 0.8 and row["mia_loss_auc_global"] == 0.7
    assert row["exposure_global"] == {1: 2.0, 16: 11.0}
    assert row["exposure_client"] == {16: 20.0}
    # pooled: (6 + 4) / (64 + 8), not the mean of the rates (0.297) nor NaN from client 2
    assert row["extraction_global"] == pytest.approx(10 / 72)
    assert row["mia_auc_client"] is None and row["base_loss"] == 3.0


def test_compare_writes_one_table_and_a_figure(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "| plain | none | 3.000 → 2.000 |" in md and "| 0.139 |" in md
    assert "| 0.50 [0.40, 0.60] |" in md  # choose accuracy with its interval (one run has it)
    assert "| 0.50 |" in md  # a report from before the interval: the bare value
    assert "| dp | sample | 3.000 → 2.500 |" in md
    assert "exposure k=16 (global/client)" in md and "11.0 / 20.0" in md
    # the best-AUC score's (min_k, 0.8) TPR@FPR<1%, starred: 10 non-members cannot make 1%
    assert "| 0.080 [0.040, 0.160]* / — / — |" in md and "0.070" not in md
    assert (out / "compare.png").stat().st_size > 10_000
    assert "Not like for like" not in md  # the recipes differ in privacy only: the point
    assert main(["compare", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_compare_says_what_differs_besides_training(tmp_path: Path) -> None:
    """Other eval sizes, tasks or data move the numbers too: said above the table. Two runs of
    one recipe (runs/seed0/tiny, runs/seed1/tiny) are told apart by their paths' ends."""
    runs = []
    for seed, examples, clients in ((0, 4, 2), (1, 64, 4)):
        rep = report("tiny", loss=2.0, aucs={"loss": 0.6}, exposures=[])
        rep["settings"] = {"max_examples": examples, "batch_size": examples, "leakage": True}
        rep["tasks"] = {"held_out": {}, **({"define": {}} if examples > 4 else {})}
        run = tmp_path / f"seed{seed}" / "tiny"
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "report.json").write_text(json.dumps(rep))
        (run / "recipe.yaml").write_text(f"name: tiny\ndata:\n  num_clients: {clients}\n")
        runs.append(run)
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    warning = md[md.index("**Not like for like.**") : md.index("| run |")]
    a, b = "tiny (seed0/tiny)", "tiny (seed1/tiny)"
    assert f"- `eval max_examples`: 4 ({a}); 64 ({b})" in warning
    assert f'- `eval tasks`: ["held_out"] ({a}); ["define", "held_out"] ({b})' in warning
    assert f"- `data.num_clients`: 2 ({a}); 4 ({b})" in warning
    assert "batch_size" not in warning and "leakage" not in warning  # equal, or speed only
    assert f"| {a} | none |" in md and f"| {b} | none |" in md
    # a report.json given directly: its run's recipe is found, nothing else differs
    same = [runs[1], runs[1] / "eval" / "report.json"]
    assert main(["compare", *map(str, same), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "Not like for like" not in md and "| tiny (tiny) #1 | none |" in md


def with_scores(rep: dict, members: list[float], non: list[float], ids: str = "x") -> dict:
    table = {
        "members": {
            "ids": [f"{ids}m{i}" for i in range(len(members))],
            "client": [i % 2 for i in range(len(members))],
            "loss": members,
        },
        "non_members": {
            "ids": [f"{ids}n{i}" for i in range(len(non))],
            "client": [i % 2 for i in range(len(non))],
            "loss": non,
        },
    }
    rep["leakage"]["mia"]["global"]["scores"] = table
    rep["settings"] = {"bootstrap": 200, "confidence": 0.95}
    return rep


def test_runs_on_the_same_examples_compare_paired(tmp_path: Path) -> None:
    from fedllm.eval.compare import paired_differences
    from fedllm.eval.roc import roc_auc

    non = [float(v) for v in range(20)]
    leaky = with_scores(
        report("a", loss=2.0, aucs={"loss": 0.7}, exposures=[]), [v - 3.0 for v in non], non
    )
    private = with_scores(report("b", loss=2.5, aucs={"loss": 0.5}, exposures=[]), list(non), non)
    d = paired_differences(private, leaky)["global"]
    assert d["difference"] == pytest.approx(roc_auc(non, non) - roc_auc([v - 3 for v in non], non))
    assert d["interval"][0] <= d["difference"] <= d["interval"][1] < 0
    assert paired_differences(leaky, leaky)["global"]["interval"] == [0.0, 0.0]
    other = with_scores(report("c", loss=2.5, aucs={"loss": 0.5}, exposures=[]), non, non, "y")
    assert paired_differences(other, leaky) == {}  # different examples: no pairing
    dirs = []
    for r in (leaky, private):
        d = tmp_path / r["run"]
        (d / "eval").mkdir(parents=True)
        (d / "eval" / "report.json").write_text(json.dumps(r))
        dirs.append(d)
    assert main(["compare", *map(str, dirs), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "Paired against `a`" in md and "| b | -0." in md


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"run": "a", "quality": {"glo', "report.json is not valid JSON"),
        ('{"run": "a", "quality": {}}', "is not a fedllm eval report: no ['leakage']"),
    ],
)
def test_a_damaged_report_is_named(tmp_path: Path, capsys, text: str, message: str) -> None:
    (tmp_path / "a" / "eval").mkdir(parents=True)
    (tmp_path / "a" / "eval" / "report.json").write_text(text)
    assert main(["compare", str(tmp_path / "a"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "a" / "eval" / "report.json") in err and message in err


def test_the_paired_interval_takes_the_reports_settings(tmp_path: Path) -> None:
    """Its resamples, confidence and seed are the ones the eval recorded; --bootstrap 0 gives
    the difference with no interval, not 1,000 resamples it never asked for."""
    from fedllm.eval.compare import paired_differences, paired_table_md
    from fedllm.eval.roc import paired_auc_difference

    non = [float(v) for v in range(20)]
    members = [v - 3.0 for v in non]
    leaky = with_scores(report("a", loss=2.0, aucs={"loss": 0.7}, exposures=[]), members, non)
    private = with_scores(report("b", loss=2.5, aucs={"loss": 0.5}, exposures=[]), non, non)
    private["settings"] = {"bootstrap": 150, "confidence": 0.8}
    recorded = {"resamples": 150, "confidence": 0.8, "seed": 7}
    private["leakage"]["mia"]["global"]["pooled"]["loss"]["interval"] = recorded
    clients = [i % 2 for i in range(20)]
    strata = {"member_strata": clients, "non_member_strata": clients}
    want = paired_auc_difference(
        non, non, base_members=members, base_non_members=non, **recorded, **strata
    )
    got = paired_differences(private, leaky)["global"]
    assert got == {**want, "confidence": 0.8}
    seed0 = paired_auc_difference(
        non, non, base_members=members, base_non_members=non, **{**recorded, "seed": 0}, **strata
    )
    assert seed0["interval"] != want["interval"]  # the seed matters: it is the report's
    assert "the difference's 80% interval" in paired_table_md([leaky, private])
    private["settings"]["bootstrap"] = 0
    none = paired_differences(private, leaky)["global"]
    # AUC 0.5 against (60 + 187 + 17/2) / 400 for members shifted by 3: pairs i-3 < j, ties ½
    assert none == {
        "difference": pytest.approx(0.5 - 255.5 / 400),
        "interval": None,
        "confidence": None,
    }
    md = paired_table_md([leaky, private])
    assert "no interval where the eval ran with --bootstrap 0" in md and "| b | -0.139 | — |" in md


def test_recorded_matched_sets_are_resampled_whole(tmp_path: Path) -> None:
    """report.json's members carry their matched set: the paired interval resamples sets, and
    two reports whose same examples were matched otherwise do not pair."""
    from fedllm.eval.compare import paired_differences
    from fedllm.eval.roc import paired_auc_difference

    non = [float(v) for v in range(20)]
    members = [v - 3.0 for v in non]
    leaky = with_scores(report("a", loss=2.0, aucs={"loss": 0.7}, exposures=[]), members, non)
    private = with_scores(report("b", loss=2.5, aucs={"loss": 0.5}, exposures=[]), non, non)
    sets = list(range(20))  # member i with non-member i: both of client i % 2
    for rep in (leaky, private):
        rep["leakage"]["mia"]["global"]["scores"]["members"]["set"] = sets
    clients = [i % 2 for i in range(20)]
    want = paired_auc_difference(
        non,
        non,
        base_members=members,
        base_non_members=non,
        resamples=200,
        member_strata=clients,
        non_member_strata=clients,
        member_sets=sets,
    )
    assert paired_differences(private, leaky)["global"] == {**want, "confidence": 0.95}
    private["leakage"]["mia"]["global"]["scores"]["members"]["set"] = sets[::-1]
    assert paired_differences(private, leaky) == {}


def test_a_run_folder_that_does_not_exist_is_named(tmp_path: Path, capsys) -> None:
    # h111: `fedllm compare runs/nope` said "run `fedllm eval runs/nope` first"
    gone = tmp_path / "nope"
    assert main(["compare", str(gone), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"{gone} does not exist" in err and "fedllm eval" in err and "first" not in err
