"""`fedllm validate` checks what a recipe needs of this machine: data that loads and gives every
client examples, installed trackers; `--config-only` checks the recipe alone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fedllm import preflight
from fedllm.cli import main
from fedllm.model.loading import EMBEDDED, base_config
from fedllm.preflight import check_data
from fedllm.recipe import load_recipe

TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")  # 3 clients, wordnet


def test_check_data_counts_every_example_once() -> None:
    cfg = load_recipe(TINY, ["data.test_set={fraction: 0.1}"])
    data = check_data(cfg)
    assert len(data.train) == len(data.held_out) == cfg.data.num_clients == 3
    assert min(data.train) > 0 and min(data.held_out) > 0
    assert sum(data.train) + sum(data.held_out) + data.test == data.examples == 600
    assert 0 < data.test < data.examples
    assert "600 examples from 'wordnet', " in data.line(cfg)


def rows(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


PAIR = json.dumps({"prompt": "a", "response": "b"})
BAD_DATA = {  # file name: (its lines, what the error must say)
    "empty.jsonl": ([], "is empty: it holds no rows"),
    "broken.jsonl": ([PAIR, "{broken"], "line 2 is not valid JSON"),
    "no_reply.jsonl": (
        [json.dumps({"messages": [{"role": "user", "content": "hi"}]})],
        "no assistant turn",
    ),
    "two_rows.jsonl": ([PAIR, PAIR], "2 examples cannot give each of data.num_clients=3 clients"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_validate_loads_the_data_and_names_what_is_wrong(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines, message = BAD_DATA[name]
    source = rows(tmp_path / name, lines)
    assert main(["validate", TINY, f"data.source={source}"]) == 2
    err = capsys.readouterr().err
    assert "fedllm: error: " in err and message in err
    # the recipe alone is fine: --config-only does not read the file
    assert main(["validate", "--config-only", TINY, f"data.source={source}"]) == 0
    assert "ok  " in capsys.readouterr().out


def test_config_only_names_a_source_typo_and_says_where_the_data_would_come_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A near typo of a built-in source is refused by the recipe itself (it was tried on the hub
    at run time: half a minute of retries offline); a far one reads as the hub dataset it is."""
    assert main(["validate", "--config-only", TINY, "data.source=wordnt"]) == 2
    err = capsys.readouterr().err
    assert "data.source: 'wordnt' is neither a built-in source" in err
    assert "did you mean 'wordnet'?" in err
    assert main(["validate", "--config-only", TINY, "data.source=words"]) == 0
    assert "\n    data Hugging Face hub dataset 'words' (" in capsys.readouterr().out
    assert main(["validate", "--config-only", TINY, "data.source=jxm/wordnet"]) == 0  # an owner's
    assert "\n    data Hugging Face hub dataset 'jxm/wordnet' (" in capsys.readouterr().out
    source = rows(tmp_path / "mine.jsonl", [PAIR] * 10)
    assert main(["validate", "--config-only", TINY, f"data.source={source}"]) == 0
    assert f"\n    data local file {source}\n" in capsys.readouterr().out
    assert main(["validate", "--config-only", TINY]) == 0
    assert "\n    data built-in 'wordnet'\n" in capsys.readouterr().out


def test_validate_says_what_each_client_gets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", TINY]) == 0
    out = capsys.readouterr().out
    assert "\n    model tiny: built from model.tiny" in out
    assert "\n    600 examples from 'wordnet'; 3 clients (domain): train " in out


def test_validate_refuses_a_tracker_that_is_not_installed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(  # as on a machine without the trackers extra
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    assert main(["validate", TINY, "output.trackers=[wandb]"]) == 2
    assert "pip install -e '.[trackers]'" in capsys.readouterr().err
    assert main(["validate", "--config-only", TINY, "output.trackers=[wandb]"]) == 0


def test_validate_names_a_base_model_that_is_not_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()  # a folder, but no config.json: not a model
    assert main(["validate", TINY, f"model.name={folder}"]) == 2
    assert "has no config.json, so it is not a model folder" in capsys.readouterr().err
    assert main(["validate", "--config-only", TINY, f"model.name={folder}"]) == 0


def test_validate_finds_the_embedded_model_without_converting_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["validate", TINY, "model.name=smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "model smollm2-135m: embedded, SmolLM2-135M-Instruct.Q4_1.gguf" in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.target_modules=[q_prj, v_proj]", "['q_prj'] match no linear layer of the base "
         "('q_prj': did you mean 'q_proj'?); existing: ['down_proj', 'gate_proj', 'k_proj', "
         "'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"),
        # tiny's v_proj is (32, 64): hidden 64, 2 of 4 heads for keys and values
        ("lora.ranks=[4, 100]", "lora.ranks: client 1 has rank 100, larger than module "
         "model.layers.0.self_attn.v_proj (32, 64) allows (valid: 1..32)"),
    ],
)  # fmt: skip
def test_validate_checks_the_adapted_layers_without_building_the_base(
    override: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", TINY, override]) == 2
    assert message in capsys.readouterr().err
    assert main(["validate", "--config-only", TINY, override]) == 0  # names need the base


def test_the_embedded_base_config_comes_from_the_gguf_without_converting_it(
    tmp_path: Path,
) -> None:
    config = base_config(EMBEDDED, cache_dir=tmp_path)  # nothing converted in this cache
    assert type(config).__name__ == "LlamaConfig"
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)  # SmolLM2-135M
    assert not any(tmp_path.iterdir())


def test_prepare_says_how_much_data_max_length_cuts(tmp_path: Path) -> None:
    """A cut example trains on part of its reply and never on its end-of-turn token; nothing
    said it (audit h86: 204 of the quickstart's 2,000 examples at max_length 64)."""
    from fedllm.data.format import tokenize_all, truncation
    from fedllm.data.shards import raw_shard
    from fedllm.model.base import prepare_base_model
    from fedllm.preflight import check_length

    cfg = load_recipe(TINY, [f"output_dir={tmp_path}", "data.max_length=64"])
    folder = prepare_base_model(cfg)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    train = raw_shard(cfg, 0).train
    fmt = {"prompt_format": cfg.data.prompt_format}
    whole = tokenize_all(train, tokenizer, max_length=1 << 20, **fmt)
    short = tokenize_all(train, tokenizer, max_length=64, **fmt)
    longer = sum(len(item["input_ids"]) > 64 for item in whole)
    trained = [sum(t != -100 for t in item["labels"]) for item in (*whole, *short)]
    expected = (longer, sum(trained[len(whole) :]), sum(trained[: len(whole)]))
    assert 0 < longer < len(train)  # the recipe's own data: some cut, some not
    assert truncation(train, tokenizer, max_length=64, **fmt) == expected
    assert truncation(train, tokenizer, max_length=1 << 20, **fmt) == (0, expected[2], expected[2])
    said = check_length(cfg, folder)
    assert said is not None and said.startswith("data.max_length=64 cuts ")
    assert "sampled training examples" in said and "raise data.max_length" in said
    roomy = load_recipe(TINY, [f"output_dir={tmp_path}", "data.max_length=256"])
    assert check_length(roomy, folder) is None


def test_validating_several_recipes_names_the_one_that_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # h95: "label_field='topik' is not a column..." did not say which of recipes/*.yaml it was
    (tmp_path / "m").mkdir()  # not a model folder: a machine check fails
    assert main(["validate", TINY, TINY, f"model.name={tmp_path / 'm'}"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(line.startswith(f"fedllm: error: {TINY}: ") for line in errors)


def test_a_quantised_tier_without_bitsandbytes_is_refused_by_validate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # h97: it failed only inside a round, where a 4-bit arm scored 0 and was offered again
    monkeypatch.setattr(preflight, "installed", lambda name: name != "bitsandbytes")
    arms = "adaptive={ranks: [2], quantization: [none, 4bit]}"
    assert main(["validate", TINY, arms]) == 2
    assert "needs bitsandbytes: pip install bitsandbytes" in capsys.readouterr().err
    assert main(["validate", TINY]) == 0  # nothing quantised: nothing needed
