"""`fedllm eval` end to end on a small finished run made without Flower: a real tiny base, real
locally trained client adapters saved as the server saves them, an SVD-aggregated global one."""

import json
import re
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from fedllm.aggregators import get
from fedllm.cli import main
from fedllm.client.train import train_local
from fedllm.data.shards import load_shard, raw_shard
from fedllm.eval.harness import evaluate_run
from fedllm.eval.settings import EvalSettings
from fedllm.eval.tasks.held_out import HeldOutLoss
from fedllm.model.adapters import attach_lora, read_factors, save_peft_adapter
from fedllm.model.base import base_model_dir, prepare_base_model
from fedllm.model.card import CARD_JSON
from fedllm.model.loading import load_base_model
from fedllm.recipe import build_config, dump_yaml, load_recipe, load_yaml

TINY = {
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 1,
    "num_heads": 2,
    "num_kv_heads": 1,
}
ARGS = ["--max-examples", "8", "--batch-size", "8", "--max-new-tokens", "4", "--references", "10"]
ARGS += ["--precision", "fp32"]  # exact comparisons below; bf16 has its own test


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = build_config(
        {
            "name": "h",
            "output_dir": str(tmp_path_factory.mktemp("runs")),
            "model": {"name": "tiny", "tiny": TINY},
            "lora": {"ranks": [2, 4]},
            "data": {
                "source": "wordnet",
                "pos": ["noun"],
                "max_examples": 60,
                "num_clients": 2,
                "held_out": 0.2,
                "max_length": 32,
                "canaries": {"repeats": [1, 4], "clients": [0], "digits": 4, "references": 10},
            },
        }
    )
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True))
    )
    base, tok = load_base_model(prepare_base_model(cfg))
    updates, save = (
        [],
        {"base_model": str(base_model_dir(cfg)), "target_modules": ["q_proj", "v_proj"]},
    )
    for pid in range(2):
        model = attach_lora(
            base,
            rank=cfg.client_rank(pid),
            alpha=16,
            dropout=0.0,
            target_modules=["q_proj", "v_proj"],
        )
        train_local(
            model,
            load_shard(cfg, pid, tokenizer=tok).train,
            steps=3,
            batch_size=8,
            pad_id=tok.pad_token_id,
            lr=0.05,
            seed=pid,
        )
        updates.append(read_factors(model))
        model.unload()
        save_peft_adapter(run_dir / "client_adapters" / str(pid), updates[-1], **save)
    svd = get("svd")
    glob = {
        m: svd([u[m] for u in updates], [1.0, 1.0], global_rank=None, state=None, seed=0).global_
        for m in updates[0]
    }
    save_peft_adapter(run_dir / "final_adapter", glob, **save)
    with (run_dir / "eval-stdout.txt").open("w") as said, redirect_stdout(said):
        assert main(["eval", str(run_dir), *ARGS]) == 0
    return run_dir


def test_report_files_and_views(run: Path) -> None:
    out = run / "eval"
    for name in ("report.json", "report.md", "quality.png", "exposure.png", "mia.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["views"] == ["base", "global", "client:0", "client:1"]
    assert set(report["quality"]) == {"base", "global", "local"}
    cfg = load_recipe(run / "recipe.yaml")
    assert report["recipe"] == {"fingerprint": cfg.fingerprint(), "seed": cfg.seed}
    choose = report["quality"]["global"]["global"]["choose"]  # pooled counts, Wilson interval
    assert choose["accuracy_low"] <= choose["accuracy"] <= choose["accuracy_high"]
    md = (out / "report.md").read_text()
    assert "## Canary exposure" in md and "too few non-members" in md


def test_global_loss_is_token_weighted_and_base_view_is_the_plain_base(run: Path) -> None:
    report = json.loads((run / "eval" / "report.json").read_text())
    clients = report["quality"]["base"]["clients"]
    nll = sum(c["held_out"]["nll_sum"] for c in clients.values())
    tokens = sum(c["held_out"]["tokens"] for c in clients.values())
    assert report["quality"]["base"]["global"]["held_out"]["loss"] == pytest.approx(nll / tokens)
    cfg = build_config(yaml.safe_load((run / "recipe.yaml").read_text()))
    base, tok = load_base_model(prepare_base_model(cfg))
    base.eval()
    held = raw_shard(cfg, 1).held_out
    assert len(held) <= 8  # so the harness scored exactly these (no subsampling)
    plain = HeldOutLoss(held, tok, prompt_format="chat", max_length=32).evaluate(base, batch_size=8)
    assert clients["1"]["held_out"]["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert report["quality"]["global"]["clients"]["1"]["held_out"]["loss"] != pytest.approx(
        clients["1"]["held_out"]["loss"], rel=1e-7
    )


def test_bf16_precision_is_recorded_and_agrees_with_fp32(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    args = [*ARGS[:-2], "--precision", "bf16", "--no-leakage", "--tasks", "held_out", "--out"]
    assert main(["eval", str(run), *args, str(out)]) == 0
    bf16 = json.loads((out / "report.json").read_text())
    fp32 = json.loads((run / "eval" / "report.json").read_text())
    assert fp32["settings"]["precision"] == "fp32" and fp32["settings"]["compute"] == "fp32"
    assert bf16["settings"]["precision"] == "bf16" and bf16["settings"]["compute"] == "bf16"
    for view in ("base", "global", "local"):
        got = bf16["quality"][view]["global"]["held_out"]["loss"]
        want = fp32["quality"][view]["global"]["held_out"]["loss"]
        assert got == pytest.approx(want, abs=0.02) and got != want  # bf16 ran, and agrees


def test_an_unknown_precision_names_the_valid_ones(run: Path, capsys) -> None:
    assert main(["eval", str(run), *ARGS[:-2], "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "precision must be one of fp32, bf16, auto, got 'fp16'" in err


def test_leakage_sections(run: Path) -> None:
    leak = json.loads((run / "eval" / "report.json").read_text())["leakage"]
    rows = leak["exposure"]
    assert sorted((r["view"], r["repeats"]) for r in rows) == sorted(
        (v, k) for v in ("base", "global", "client") for k in (1, 4)
    )
    assert all(r["client"] == 0 and r["exposure"] <= r["max_rank_exposure"] + 1e-9 for r in rows)
    for r in rows:  # the secret's AUC against its references is 1 - (rank - 1) / n (no ties),
        # and exposure = log2(n + 1) - log2(rank) (eval/exposure.py), so rank = (n + 1) / 2^e
        rank = (r["references"] + 1) / 2 ** r["exposure"]
        assert r["auc_vs_references"] == pytest.approx(1 - (rank - 1) / r["references"], abs=1e-9)
    assert set(leak["mia"]) == {"base", "global", "client"}
    pooled = leak["mia"]["global"]["pooled"]
    assert set(pooled) == {"loss", "zlib", "min_k", "min_k_pp", "reference"}
    per_client = leak["mia"]["global"]["clients"]
    assert pooled["loss"]["members"] == sum(c["loss"]["members"] for c in per_client.values())
    assert set(leak["extraction"]["client"]) == {"0", "1"}


def test_each_leakage_view_says_what_it_will_do_and_when_it_is_done(run: Path) -> None:
    """The leakage part is the long one: a line as each view starts (with its sizes) and ends."""
    said = (run / "eval-stdout.txt").read_text()
    starts = re.findall(
        r"leakage view (\d)/(\d) \[(\S+)\]: (\d+) canary sequences, (\d+) MIA", said
    )
    views = ["base", "global", "client:0", "client:1"]
    assert [(int(i), int(n), v) for i, n, v, _, _ in starts] == [
        (i, 4, v) for i, v in enumerate(views, start=1)
    ]
    leak = json.loads((run / "eval" / "report.json").read_text())["leakage"]
    canaries = {v: int(c) for _, _, v, c, _ in starts}
    assert canaries["client:0"] == canaries["global"] > 0 == canaries["client:1"]  # client 0's
    examples = sum(leak["mia"]["global"]["pooled"]["loss"][k] for k in ("members", "non_members"))
    assert {v: int(m) for _, _, v, _, m in starts}["global"] == examples
    assert len(re.findall(r"leakage view \d/4 \[\S+\] done \[\d+s\]", said)) == 4


def test_mia_sample_intervals_and_base_control(run: Path) -> None:
    report = json.loads((run / "eval" / "report.json").read_text())
    leak = report["leakage"]
    cfg = build_config(yaml.safe_load((run / "recipe.yaml").read_text()))
    for pid in ("0", "1"):  # every held-out example is a non-member unless it had no match
        s = leak["sample"][pid]
        assert s["held_out"] == len(raw_shard(cfg, int(pid)).held_out)
        assert s["non_members"] + s["dropped_non_members"] == s["held_out"]
        assert s["members"] == 2 * s["non_members"]
        # every example keeps a scored token (the formatters keep one): nothing left out
        assert s["unscored_non_members"] == s["unscored_members"] == 0
        assert leak["mia"]["global"]["clients"][pid]["loss"]["members"] == s["members"]
    for view in ("base", "global", "client"):
        for score in ("loss", "min_k"):
            a = leak["mia"][view]["pooled"][score]
            lo, hi = a["auc_interval"]
            assert lo <= a["auc"] <= hi and a["interval"]["resamples"] == 1000
            assert a["interval"]["resampled"] == "matched sets"
            t = a["tpr@fpr<0.01"]
            assert t["interval"][0] <= t["value"] <= t["interval"][1]
    # the base model scores "reference" as 0 for everyone: AUC exactly 1/2, interval [1/2, 1/2]
    assert leak["mia"]["base"]["pooled"]["reference"]["auc_interval"] == [0.5, 0.5]
    delta = leak["mia"]["global"]["vs_base"]["loss"]
    base_auc = leak["mia"]["base"]["pooled"]["loss"]["auc"]
    global_auc = leak["mia"]["global"]["pooled"]["loss"]["auc"]
    assert delta["difference"] == pytest.approx(global_auc - base_auc)
    assert "vs_base" not in leak["mia"]["base"]
    # each pooled member's matched set: a non-member of its own client, two members to each
    table = leak["mia"]["global"]["scores"]
    sets, owner = table["members"]["set"], table["non_members"]["client"]
    assert [owner[j] for j in sets] == table["members"]["client"]
    assert sorted(sets) == [j for j in range(len(owner)) for _ in range(2)]
    outside = {
        k: v["auc_interval"]
        for k, v in leak["mia"]["base"]["pooled"].items()
        if not v["auc_interval"][0] <= 0.5 <= v["auc_interval"][1]
    }
    assert leak["control"] == {"ok": not outside, "outside": outside}
    md = (run / "eval" / "report.md").read_text()
    assert "AUC − base (paired)" in md and "percentile bootstrap" in md
    assert "whole matched sets (a non-member with its matched members)" in md
    assert ("Control: every score" in md) == leak["control"]["ok"]
    assert "| client | held-out | non-members | members |" in md


def test_bad_eval_settings_name_the_key(run: Path, capsys) -> None:
    assert main(["eval", str(run), "--mia-members-per-non-member", "0", *ARGS]) == 2
    assert "mia_members_per_non_member must be >= 1" in capsys.readouterr().err


def test_adapter_folder_with_recipe_and_bad_target(run: Path, tmp_path: Path, capsys) -> None:
    adapter = run / "final_adapter"
    code = main(
        [
            "eval",
            str(adapter),
            "--recipe",
            str(run / "recipe.yaml"),
            "--no-leakage",
            "--tasks",
            "held_out",
            *ARGS,
        ]
    )
    assert code == 0
    report = json.loads((adapter.parent / f"{adapter.name}-eval" / "report.json").read_text())
    assert report["views"] == ["base", "global"] and report["leakage"]["mia"] == {}
    assert not (adapter / "eval").exists()  # not in the adapter folder a user may share
    assert main(["eval", str(adapter), *ARGS]) == 2
    assert "pass --recipe" in capsys.readouterr().err
    other = tmp_path / "other.yaml"  # the run's recipe with another seed: other data, other A
    data = load_yaml((run / "recipe.yaml").read_text())
    other.write_text(dump_yaml({**data, "seed": data.get("seed", 0) + 1}))
    carded = tmp_path / "carded"  # the adapter with the card every run writes (fingerprint)
    shutil.copytree(adapter, carded)
    fingerprint = load_recipe(run / "recipe.yaml").fingerprint()
    (carded / CARD_JSON).write_text(json.dumps({"fingerprint": fingerprint}))
    assert main(["eval", str(carded), "--recipe", str(other), *ARGS]) == 2
    assert "is not the recipe that trained" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), *ARGS]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_an_outside_multiple_choice_file_is_asked_of_every_view(run: Path, tmp_path: Path) -> None:
    rows = [
        {
            "question": f"Which word is number {k}?",
            "choices": ["alpha", "beta", "gamma"],
            "answer": k % 3,
        }
        for k in range(4)
    ]
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "eval"
    assert (
        main(["eval", str(run), "--mc-file", str(quiz), "--no-leakage", "--out", str(out), *ARGS])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert list(report["tasks"]) == ["mc_quiz"], "only the file's task unless --tasks names more"
    assert report["tasks"]["mc_quiz"]["about"].startswith(f"Multiple choice from {quiz} (4 ")
    assert set(report["quality"]) == {"base", "global", "local"}
    for view, block in report["quality"].items():
        asked = [c for c in ("0", "1") if "mc_quiz" in block["clients"].get(c, {})]
        # each client's own adapter is its own model; the base and the global are one model
        # each, asked the file's questions once (with the first client), not once per client
        assert asked == (["0", "1"] if view == "local" else ["0"]), view
        per_client = [block["clients"][c]["mc_quiz"] for c in asked]
        assert all(r["examples"] == 4 for r in per_client), view
        assert all(r["chance"] == pytest.approx(1 / 3) for r in per_client), view
        assert block["global"]["mc_quiz"]["examples"] == 4 * len(asked), view
    assert "mc_quiz" in (out / "report.md").read_text()


def test_a_bad_multiple_choice_file_fails_before_any_model_loads(
    run: Path, tmp_path: Path, capsys
) -> None:
    bad = tmp_path / "notes.jsonl"
    bad.write_text(json.dumps({"text": "a note"}) + "\n", encoding="utf-8")
    assert main(["eval", str(run), "--mc-file", str(bad), *ARGS]) == 2
    err = capsys.readouterr()
    assert (
        f"{bad} line 1: a multiple-choice file needs the columns question, choices, answer"
        in err.err
    )
    assert "this row has: text" in err.err and "[eval]" not in err.out, "nothing loaded"
    twin = tmp_path / "sub" / "notes.jsonl"
    twin.parent.mkdir()
    good = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n"
    for path in (bad, twin):
        path.write_text(good, encoding="utf-8")
    assert main(["eval", str(run), "--mc-file", str(bad), "--mc-file", str(twin), *ARGS]) == 2
    assert "both make the task 'mc_notes'; rename one" in capsys.readouterr().err


class Interrupted(Exception):
    pass


def test_an_interrupted_eval_resumes_from_its_finished_pieces(run: Path, tmp_path: Path) -> None:
    """Killed in the third leakage view, the eval run again takes the clients' quality and the
    first two views from disk and writes the very report a run straight through wrote."""
    settings = EvalSettings(
        max_examples=8, batch_size=8, max_new_tokens=4, references=10, precision="fp32"
    )
    out = tmp_path / "eval"

    def stop_in_view_3(text: str) -> None:
        if text.startswith("leakage view 3/4"):
            raise Interrupted

    with pytest.raises(Interrupted):
        evaluate_run(run, out_dir=out, settings=settings, say=stop_in_view_3)
    partial = tmp_path / ".eval.partial"
    assert sorted(p.name for p in partial.iterdir()) == [
        "key.json",
        "leakage-1.json",
        "leakage-2.json",
        "quality-0.json",
        "quality-1.json",
    ]
    said: list[str] = []
    evaluate_run(run, out_dir=out, settings=settings, say=said.append)
    taken = [t for t in said if "interrupted eval" in t]
    assert taken[0] == "resuming an interrupted eval: 4 finished pieces in " + str(partial)
    assert len(taken) == 5  # the line above, two clients' quality, two leakage views
    assert "leakage view 3/4 [client:0] done" in " ".join(said)
    assert not partial.exists()  # the report is written: nothing to resume

    def numbers(report: Path) -> dict:
        data = json.loads(report.read_text())
        return {k: data[k] for k in ("quality", "leakage", "settings", "tasks", "views")}

    assert numbers(out / "report.json") == numbers(run / "eval" / "report.json")


def test_pieces_of_another_eval_are_discarded(run: Path, tmp_path: Path) -> None:
    """Other settings (or adapters) make other numbers: their pieces are not taken."""
    partial = tmp_path / ".eval.partial"
    partial.mkdir()
    (partial / "key.json").write_text('{"settings": "other"}')
    (partial / "quality-0.json").write_text('{"global": {"held_out": {"loss": 0.0}}}')
    said: list[str] = []
    settings = EvalSettings(max_examples=4, batch_size=8, max_new_tokens=2, leakage=False)
    report = evaluate_run(run, out_dir=tmp_path / "eval", settings=settings, say=said.append)
    assert f"{partial}: an interrupted eval of other adapters or settings, discarded" in said
    assert report["quality"]["global"]["clients"]["0"]["held_out"]["loss"] > 0.5
    assert not partial.exists()


def test_an_outside_file_with_other_answers_makes_another_resume_key(tmp_path: Path) -> None:
    """Pieces of an eval whose --mc-file said other answers are not reused: the task's inputs
    digest is part of the key (the file's path and question count alone are not)."""
    from fedllm.eval.tasks.multiple_choice import file_task

    quiz = tmp_path / "quiz.jsonl"
    row = {"question": "2 + 2?", "choices": ["3", "4"], "answer": 1}
    quiz.write_text(json.dumps(row) + "\n")
    before = file_task(quiz)
    quiz.write_text(json.dumps({**row, "answer": 0}) + "\n")
    after = file_task(quiz)
    assert before.describe() == after.describe()
    assert before.inputs_digest != after.inputs_digest


def run_copy(run: Path, folder: Path) -> Path:
    """The run's recipe and adapters in `folder` (its base stays where the adapters name it)."""
    folder.mkdir()
    shutil.copy(run / "recipe.yaml", folder / "recipe.yaml")
    for name in ("final_adapter", "client_adapters"):
        shutil.copytree(run / name, folder / name)
    return folder


def cut(path: Path, *, keep: int) -> None:
    """What an interrupted copy leaves: the file's first `keep` bytes."""
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda r: (r / "final_adapter" / "adapter_model.safetensors").unlink(),
            "final_adapter has no adapter_model.safetensors (its weights); the adapter folder is "
            "incomplete (e.g. an interrupted copy): copy it again",
        ),
        (
            lambda r: cut(r / "final_adapter" / "adapter_model.safetensors", keep=300),
            "final_adapter/adapter_model.safetensors is damaged (Error while deserializing header",
        ),
        (
            lambda r: cut(r / "client_adapters" / "1" / "adapter_model.safetensors", keep=5),
            "client_adapters/1/adapter_model.safetensors is damaged",
        ),
        (
            lambda r: cut(r / "final_adapter" / "adapter_config.json", keep=0),
            "final_adapter/adapter_config.json is empty; the adapter folder is incomplete",
        ),
        (
            lambda r: (r / "final_adapter" / CARD_JSON).write_text('{"fingerprint": "ab'),
            f"final_adapter/{CARD_JSON} is not valid JSON (Unterminated string",
        ),
        (
            lambda r: (r / "recipe.yaml").unlink(),
            "has no recipe.yaml; pass --recipe RECIPE.yaml, the recipe that trained this run",
        ),
        (lambda r: shutil.rmtree(r), "does not exist; pass a run folder `fedllm run` wrote"),
    ],
    ids=["no-weights", "cut-weights", "cut-client", "empty-cfg", "cut-card", "no-recipe", "gone"],
)
def test_a_damaged_run_folder_is_named_before_any_model_loads(
    run: Path, tmp_path: Path, capsys, damage, message: str
) -> None:
    """h111: a run folder from an interrupted copy failed in a hub lookup ("Repo id must be in
    the form ..."), a SafetensorError traceback or "Expecting value: line 1 column 1 (char 0)"
    naming no file; a missing folder or recipe.yaml was "neither a run directory nor ..."."""
    damaged = run_copy(run, tmp_path / "copy")
    damage(damaged)
    assert main(["eval", str(damaged), *ARGS]) == 2
    out = capsys.readouterr()
    assert f"fedllm: error: {damaged}" in out.err and message in out.err, out.err
    assert "Traceback" not in out.err and "[eval]" not in out.out, "nothing loaded"


def test_a_damaged_adapter_folder_is_named(run: Path, tmp_path: Path, capsys) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "final_adapter", adapter)
    cut(adapter / "adapter_model.safetensors", keep=1000)
    assert main(["eval", str(adapter), "--recipe", str(run / "recipe.yaml"), *ARGS]) == 2
    err = capsys.readouterr().err
    assert f"{adapter / 'adapter_model.safetensors'} is damaged" in err
