"""The multiple-choice eval task (MMLU's question/choices/answer layout) on files the tests write,
scored with a tiny model that learned some answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedllm.client.train import train_local
from fedllm.data import load_local, tokenize_all
from fedllm.eval.choice import MultipleChoiceTask
from fedllm.eval.registry import available_tasks, get_task
from fedllm.eval.task import TaskSetup
from fedllm.eval.tasks.multiple_choice import (
    MultipleChoiceFile,
    file_task,
    file_task_name,
    read_questions,
)
from fedllm.model.loading import load_base_model
from fedllm.model.tiny import build_tiny_model

TAUGHT = [
    ("What does the farmer grow?", "tall golden wheat"),
    ("Where does the fisher sail?", "across the grey sea"),
    ("What does the baker make?", "warm brown bread"),
    ("Who guards the castle?", "an old stone knight"),
]
# Distractors the model never sees, of the same length and alphabet as the taught answers.
UNSEEN = ["a quiet blue river", "seven paper lanterns", "the winter owl sleeps"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_reads_indices_letters_and_digits(tmp_path: Path) -> None:
    rows = [
        {"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1},
        {"question": "Capital of France?", "choices": ["Rome", "Paris"], "answer": "B"},
        {"question": "Red?", "choices": ["red", "blue", "green", "grey"], "answer": "a"},
        {"question": "Last?", "choices": ["x", "y", "z"], "answer": "2", "subject": "misc"},
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    assert read_questions(path) == [
        {"prompt": "2+2?", "options": ["3", "4", "5"], "answer": 1},
        {"prompt": "Capital of France?", "options": ["Rome", "Paris"], "answer": 1},
        {"prompt": "Red?", "options": ["red", "blue", "green", "grey"], "answer": 0},
        {"prompt": "Last?", "options": ["x", "y", "z"], "answer": 2},
    ]
    (tmp_path / "mc.json").write_text(json.dumps(rows), encoding="utf-8")
    assert read_questions(tmp_path / "mc.json") == read_questions(path)


def test_bad_rows_name_file_line_and_what_is_valid(tmp_path: Path) -> None:
    ok = {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0}
    cases = {
        "letter": (
            {**ok, "answer": "E"},
            "'answer' 'E' is neither a choice index 0..3 nor a letter A..D",
        ),
        "index": ({**ok, "answer": 4}, "'answer' 4 is neither"),
        "bool": ({**ok, "answer": True}, "'answer' True is neither"),
        "question": ({**ok, "question": ""}, "row without 'question'"),
        "choices": ({**ok, "choices": ["only"]}, "'choices' must be a list of at least 2"),
        # checked before any model loads (it once failed after: "adds no tokens")
        "empty": ({**ok, "choices": ["a", " ", "c", "d"]}, "'choices' holds an empty answer"),
    }
    for name, (row, message) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [ok, row])
        with pytest.raises(ValueError) as err:
            read_questions(path)
        assert f"{path} line 2: " in str(err.value) and message in str(err.value), name
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ok) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl line 3: not valid JSON"):
        read_questions(broken)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl not found.*\"choices\""):
        read_questions(tmp_path / "missing.jsonl")


def test_a_multiple_choice_data_source_feeds_the_task(tmp_path: Path) -> None:
    rows = [
        {"question": "2+2?", "choices": ["3", "4"], "answer": "B", "subject": "math"},
        {
            "question": "Capital of Italy?",
            "choices": ["Rome", "Oslo"],
            "answer": 0,
            "subject": "geo",
        },
    ]
    path = write_jsonl(tmp_path / "mmlu.jsonl", rows)
    examples = load_local(path, label_field="subject")
    assert [(e["prompt"], e["response"], e["label"]) for e in examples] == [
        ("2+2?", "4", "math"),
        ("Capital of Italy?", "Rome", "geo"),
    ]
    setup = TaskSetup(tokenizer=None, prompt_format="chat", max_length=32, max_new_tokens=4, seed=0)
    task = get_task("multiple_choice").build(examples, setup)
    assert get_task("multiple_choice") is MultipleChoiceFile
    assert [task.get_example(i) for i in range(len(task))] == [
        {"prompt": "2+2?", "options": ["3", "4"], "answer": 1},
        {"prompt": "Capital of Italy?", "options": ["Rome", "Oslo"], "answer": 0},
    ]
    # other data (prompt/response rows) gives no questions, so nothing to report
    assert len(MultipleChoiceFile.build([{"prompt": "p", "response": "r"}], setup)) == 0


@pytest.fixture(scope="module")
def taught_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model trained until it prefers the taught answers to their questions."""
    texts = [f"{q} {a}" for q, a in TAUGHT] + UNSEEN
    folder = build_tiny_model(tmp_path_factory.mktemp("mc") / "m", texts=texts * 10, vocab_size=300)
    model, tok = load_base_model(Path(folder))
    model.requires_grad_(True)
    examples = [{"prompt": q, "response": a} for q, a in TAUGHT]
    items = tokenize_all(examples, tok, prompt_format="chat", max_length=48)
    train_local(model, items, steps=20, batch_size=4, pad_id=tok.pad_token_id, lr=3e-3)
    model.eval()
    return model, tok


def test_accuracy_picks_the_taught_answer(taught_model, tmp_path: Path) -> None:
    model, tok = taught_model
    letters = "ABCD"
    rows, flipped = [], []
    for k, (question, answer) in enumerate(TAUGHT):
        choices = [*UNSEEN]
        choices.insert(k % 4, answer)  # the taught answer sits at A, B, C, D in turn
        rows.append({"question": question, "choices": choices, "answer": letters[k % 4]})
        flipped.append({"question": question, "choices": choices, "answer": (k + 1) % 4})
    task = MultipleChoiceFile.from_file(write_jsonl(tmp_path / "mc.jsonl", rows), tokenizer=tok)
    result = task.evaluate(model, batch_size=8)
    assert result["examples"] == 4 and result["chance"] == pytest.approx(0.25)
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == 1.0
    wrong = MultipleChoiceFile.from_file(write_jsonl(tmp_path / "wrong.jsonl", flipped))
    assert wrong.evaluate(model, batch_size=3, tokenizer=tok)["accuracy"] == 0.0


def test_accuracy_has_a_wilson_interval_and_the_global_one_pools_the_counts() -> None:
    from fedllm.eval.choice import wilson

    # by hand, z = 1.96: 7 of 10: centre (0.7 + 0.19207) / 1.38415 = 0.64449, half
    # 1.96 · √(0.021 + 0.0096) / 1.38415 = 0.24770 -> [0.3968, 0.8922]
    assert wilson(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    assert wilson(0, 5)[0] == 0.0 and wilson(0, 5)[1] > 0.4  # never an empty interval
    assert all(math.isnan(x) for x in wilson(0, 0))
    clients = [
        {"examples": 10, "correct": 7, "accuracy": 0.7, "chance": 0.25},
        {"examples": 30, "correct": 21, "accuracy": 0.7, "chance": 0.25},
    ]
    for c in clients:
        c["accuracy_low"], c["accuracy_high"] = wilson(c["correct"], c["examples"])
    pooled = MultipleChoiceFile.combine(clients)
    assert pooled["accuracy"] == pytest.approx(0.7) and pooled["correct"] == 28
    # 28 of 40, not the mean of two clients' (wider) intervals
    assert (pooled["accuracy_low"], pooled["accuracy_high"]) == pytest.approx(wilson(28, 40))
    assert pooled["accuracy_high"] - pooled["accuracy_low"] < 0.3


def test_an_outside_files_pooled_interval_counts_its_questions_once(tmp_path: Path) -> None:
    """Every client's adapter answers the same N questions of an --mc-file: pooling C×N as
    independent draws made the interval too narrow (audit h89: 5×40 gave [0.633, 0.759])."""
    from fedllm.eval.choice import wilson

    path = write_jsonl(tmp_path / "quiz.jsonl", taught_rows())
    task = file_task(path)
    clients = [
        {"examples": 40, "correct": c, "accuracy": c / 40, "chance": 0.25} for c in (28,) * 5
    ]
    for c in clients:
        c["accuracy_low"], c["accuracy_high"] = wilson(c["correct"], 40)
    pooled = task.combine(clients)
    assert pooled["accuracy"] == pytest.approx(0.7)
    assert (pooled["accuracy_low"], pooled["accuracy_high"]) == pytest.approx(wilson(28, 40))


def test_no_questions_give_no_number(taught_model) -> None:
    model, tok = taught_model
    result = MultipleChoiceFile([], tokenizer=tok).evaluate(model, batch_size=4)
    assert result["examples"] == 0 and math.isnan(result["accuracy"])
    assert MultipleChoiceFile.combine([result]) == {}


def taught_rows() -> list[dict]:
    """The four taught questions, each taught answer at A, B, C, D in turn among the unseen."""
    rows = []
    for k, (question, answer) in enumerate(TAUGHT):
        choices = [*UNSEEN]
        choices.insert(k % 4, answer)
        rows.append({"question": question, "choices": choices, "answer": "ABCD"[k % 4]})
    return rows


def test_an_outside_file_is_a_task_asking_its_questions_whatever_the_client_data(
    taught_model, tmp_path: Path
) -> None:
    model, tok = taught_model
    path = write_jsonl(tmp_path / "My Quiz-v2.jsonl", taught_rows())
    task = file_task(path)
    assert task.name == "mc_my_quiz_v2" and issubclass(task, MultipleChoiceTask)
    assert task.describe()["about"].startswith(f"Multiple choice from {path} (4 questions)")
    assert "mc_my_quiz_v2" not in available_tasks(), "per call, never in the registry"
    setup = TaskSetup(tokenizer=tok, prompt_format="chat", max_length=48, max_new_tokens=4, seed=0)
    held_out = [{"prompt": "p", "response": "r"}]  # a client's own data plays no part
    built = task.build(held_out, setup)
    assert [built.get_example(i)["answer"] for i in range(len(built))] == [0, 1, 2, 3]
    assert built.evaluate(model, batch_size=8) == {
        "examples": 4,
        "correct": 4,
        "accuracy": 1.0,
        "accuracy_low": pytest.approx(0.5101, abs=1e-4),  # Wilson, 4 of 4: not [1, 1]
        "accuracy_high": 1.0,
        "chance": pytest.approx(0.25),
    }
    assert file_task_name(tmp_path / "---.jsonl") == "mc_file"


def test_a_file_of_another_layout_names_the_file_and_the_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(ValueError) as err:
        file_task(path)
    assert str(err.value) == (
        f"{path} line 1: a multiple-choice file needs the columns question, choices, answer "
        '(MMLU\'s layout: {"question": ..., "choices": [...], "answer": 0 or "A"}); '
        "this row has: prompt, response"
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.jsonl holds no questions; give one"):
        file_task(empty)
