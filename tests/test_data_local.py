"""Local JSONL/JSON/CSV/Parquet files and save_to_disk folders, and the load_examples dispatch."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import datasets
import huggingface_hub
import pytest

from fedllm.data import load_examples, load_local, sources
from fedllm.data.local import BUILDERS
from fedllm.recipe.schema_common import DATA_SUFFIXES, looks_like_path

ROWS = [
    {"question": "2+2?", "answer": "4", "topic": "math"},
    {"question": "Capital of France?", "answer": "Paris", "topic": "geo"},
    {"question": "3*3?", "answer": "9", "topic": "math"},
]
EXPECTED = [
    {"prompt": "2+2?", "response": "4", "label": "math"},
    {"prompt": "Capital of France?", "response": "Paris", "label": "geo"},
    {"prompt": "3*3?", "response": "9", "label": "math"},
]
FIELDS = {"prompt_field": "question", "response_field": "answer", "label_field": "topic"}


def resolved(host: str, port: int) -> list:
    """`socket.getaddrinfo` as on a machine online: the hub's host resolves."""
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port))]


def without_ids(examples: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in e.items() if k != "id"} for e in examples]


def write_jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return path


def test_jsonl_with_fields_and_row_ids(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl")
    examples = load_local(path, **FIELDS)
    assert without_ids(examples) == EXPECTED
    assert [e["id"] for e in examples] == [f"{path}:0", f"{path}:1", f"{path}:2"]


def test_json_array_csv_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "qa.json").write_text(json.dumps(ROWS), encoding="utf-8")
    with (tmp_path / "qa.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "answer", "topic"])
        writer.writeheader()
        writer.writerows(ROWS)
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "qa.parquet"))
    for name in ("qa.json", "qa.csv", "qa.parquet"):
        assert without_ids(load_local(tmp_path / name, **FIELDS)) == EXPECTED, name


def test_label_defaults_to_empty_and_id_column_is_kept(tmp_path: Path) -> None:
    rows = [{"prompt": None, "response": "r", "id": 17}]  # a null prompt: unconditional text
    (tmp_path / "plain.jsonl").write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    assert load_local(tmp_path / "plain.jsonl") == [
        {"prompt": "", "response": "r", "label": "", "id": "17"}
    ]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(
        str(tmp_path / "splits")
    )
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(tmp_path / "no_train"))
    assert without_ids(load_local(tmp_path / "single", **FIELDS)) == EXPECTED
    assert without_ids(load_local(tmp_path / "splits", **FIELDS)) == EXPECTED
    with pytest.raises(ValueError, match=r"without a 'train' split.*\['test'\]"):
        load_local(tmp_path / "no_train", **FIELDS)
    (tmp_path / "just_a_folder").mkdir()
    with pytest.raises(ValueError, match="not one written by datasets' save_to_disk"):
        load_local(tmp_path / "just_a_folder")


def test_missing_field_names_field_file_and_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl")
    with pytest.raises(ValueError) as caught:
        load_local(path, prompt_field="question", response_field="reply")
    message = str(caught.value)
    assert "response_field='reply'" in message and str(path) in message
    assert "['question', 'answer', 'topic']" in message
    with pytest.raises(ValueError, match="label_field='domain'"):
        load_local(path, prompt_field="question", response_field="answer", label_field="domain")


def test_missing_path_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_local(tmp_path / "nope.jsonl")
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'\.txt' is not one of \['\.json', '\.jsonl'"):
        load_local(tmp_path / "notes.txt")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.jsonl", "", r"empty\.jsonl is empty: it holds no rows"),
        ("blank.jsonl", "\n\n  \n", r"blank\.jsonl is empty: it holds no rows"),
        ("header.csv", "prompt,response\n", r"header\.csv has a header but no rows"),
        ("empty.json", "[]", r"empty\.json holds no rows"),
        (
            "bad.jsonl",
            '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n',
            r"bad\.jsonl line 2 is not valid JSON \(Expecting value at column 28\); every line",
        ),
        (
            "array.jsonl",
            '{"prompt": "a", "response": "b"}\n[1, 2]\n',
            r"array\.jsonl line 2 is a JSON list, not an object",
        ),
        (
            "cut.json",
            '[{"prompt": "a", "response": "b"},\n {"prompt": "c", "resp',
            r"cut\.json is not valid JSON \(.* at line 2 column \d+\)",
        ),
        ("ragged.csv", "prompt,response\na,b\nc,d,e\n", r"ragged\.csv line 3 has 3 fields, the"),
    ],
)
def test_an_unreadable_or_empty_file_is_named_with_what_is_wrong(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_local(tmp_path / name)


def test_a_null_response_is_an_error_naming_the_row(tmp_path: Path) -> None:
    path = tmp_path / "null.jsonl"
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(ValueError, match=r"null\.jsonl line 2: 'response' is null"):
        load_local(path)


def test_load_examples_dispatches_local_paths(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl")
    assert without_ids(load_examples(str(path), **FIELDS)) == EXPECTED
    two = load_examples(str(path), max_examples=2, seed=1, **FIELDS)
    assert len(two) == 2 and two == load_examples(str(path), max_examples=2, seed=1, **FIELDS)
    with pytest.raises(ValueError, match=r"\['pos'\] do not apply.*prompt_field"):
        load_examples(str(path), pos=("noun",))
    with pytest.raises(FileNotFoundError, match=r"missing\.csv.*'wordnet', 'fortunes'"):
        load_examples(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="source must be 'wordnet', 'fortunes'"):
        load_examples("  ")


def test_hub_names_go_through_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.socket, "getaddrinfo", resolved)  # as online
    calls: list[tuple[str, str | None, str]] = []

    def fake_load_dataset(path: str, *, name: str | None, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples("someone/qa", split="validation", **FIELDS)
    assert calls == [("someone/qa", None, "validation")]
    assert without_ids(examples) == EXPECTED
    assert examples[0]["id"] == "someone/qa[validation]:0"


def test_hub_failure_says_it_needs_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.socket, "getaddrinfo", resolved)  # as online

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"only works online.*no route to host"):
        load_examples("someone/qa")


def test_a_typo_of_a_built_in_source_is_named_before_the_hub_is_tried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hub was tried")

    monkeypatch.setattr(datasets, "load_dataset", never)
    monkeypatch.setattr(sources.socket, "getaddrinfo", resolved)  # as online
    with pytest.raises(
        ValueError, match=r"source 'wordnt' is not a local path \(did you mean 'wordnet'\?\)"
    ):
        load_examples("wordnt")
    with pytest.raises(ValueError, match=r"did you mean 'fortunes'"):
        load_examples("fortune")
    with pytest.raises(ValueError, match=r"tried as a Hugging Face hub dataset.*the hub was tried"):
        load_examples("imdb")  # a hub name unlike either: tried


def test_a_hub_name_offline_is_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, `datasets` retried for ~26 s before failing; the hub's host not resolving says
    so at once, with the way to use a cached copy; under HF_HUB_OFFLINE the cache is asked."""

    def unresolved(host: str, port: int) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hub was tried")

    monkeypatch.setattr(sources.socket, "getaddrinfo", unresolved)
    monkeypatch.setattr(datasets, "load_dataset", never)
    with pytest.raises(ValueError, match=r"cannot resolve \(huggingface\.co: .*HF_HUB_OFFLINE=1"):
        load_examples("words")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"the hub was tried"):
        load_examples("words")  # the cache is asked (here: `never`)


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl (line 2 )?is not UTF-8 text"):
        load_local(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "c", "response": ""}, r"line 2: 'response' is empty"),
        ({"prompt": "c", "response": "  "}, r"line 2: 'response' is empty"),
        ({"prompt": "c", "response": {"text": "a"}}, r"line 2: 'response' is a dict, not text"),
        ({"prompt": ["c"], "response": "d"}, r"line 2: 'prompt' is a list, not text"),
        ({"prompt": "c", "response": "d", "topic": None}, r"line 2: label 'topic' is null"),
        # a key misspelt in one row: the row's own keys and the likely typo
        (
            {"prompt": "c", "respose": "d"},
            r"line 2: 'response' is null or missing \(this row has: prompt, topic, respose; is "
            r"'respose' a typo of 'response'\?\)",
        ),
    ],
)
def test_a_row_nothing_could_be_learned_from_is_an_error_naming_it(
    tmp_path: Path, row: dict, message: str
) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "a", "response": "b", "topic": "t"}, {"topic": "t", **row}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_local(path, label_field="topic")


def test_a_missing_prompt_is_a_plain_continuation_and_numbers_are_text(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": None, "response": "b"}, {"prompt": 2, "response": 4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    got = [(e["prompt"], e["response"]) for e in load_local(path)]
    assert got == [("", "b"), ("2", "4")]


def test_a_ragged_csv_is_named_before_pandas_logs_its_own_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "ragged.csv").write_text("prompt,response\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"ragged\.csv line 3 has 3 fields, the header 2"):
        load_local(tmp_path / "ragged.csv")
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # datasets never ran


def test_a_csv_row_short_of_the_header_still_loads_its_missing_field_empty(tmp_path: Path) -> None:
    # datasets reads a short row with nulls (pandas refuses only a row wider than its header)
    (tmp_path / "short.csv").write_text("prompt,response,note\nhello,world,x\nfoo,bar\n")
    rows = load_local(tmp_path / "short.csv")
    assert [(r["prompt"], r["response"]) for r in rows] == [("hello", "world"), ("foo", "bar")]


def test_the_recipe_and_the_loader_read_a_path_alike() -> None:
    """One rule decides "a local path" for the recipe check and for the loader: a missing
    `data/train.CSV` or `..\\shards` is a missing file to both, never a hub name."""
    assert DATA_SUFFIXES == tuple(BUILDERS)  # every suffix a recipe accepts has a reader
    for value in ("/x", "./x", "../x", "~/x", "..\\shards", "train.CSV", "d/t.parquet"):
        assert looks_like_path(value), value
    for value in ("wordnet", "someone/qa", "imdb", "csv"):
        assert not looks_like_path(value), value
    with pytest.raises(FileNotFoundError, match=r"local dataset missing\.CSV not found"):
        load_examples("missing.CSV")
