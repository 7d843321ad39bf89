"""Chat data as users have it: `messages` rows (system, multi-turn) and Alpaca rows, read from
files the tests write, tokenized with labels on the assistant turns only; stop tokens; and a tiny
federation on a chat JSONL through the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from fedllm.data import format_example, load_examples, load_local, tokenize_all
from fedllm.data.chat import messages_example, trained_text
from fedllm.eval.generate import end_token_ids, template_end_ids
from fedllm.eval.prompting import example_prompt, prompt_ids

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYSTEM = {"role": "system", "content": "You are brief."}
TURNS = [
    SYSTEM,
    {"role": "user", "content": "Define dog."},
    {"role": "assistant", "content": "a domestic animal"},
    {"role": "user", "content": "And a cat?"},
    {"role": "assistant", "content": "a small feline"},
]
CORPUS = [
    "You are brief. Define dog. a domestic animal. And a cat? a small feline",
    "Write a haiku about rain. Soft rain on the roof",
    "Summarise the text below. the quick brown fox jumps over the lazy dog",
] * 20


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def bpe(*, eos: str = "<|im_end|>", template: str | None = CHATML) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>", "<|eot|>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token="<pad>")
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return bpe()


def ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected(tok: PreTrainedTokenizerFast, pieces: list[tuple[str, bool]]) -> dict:
    """input_ids and labels from hand-written (text, trained?) pieces."""
    input_ids, labels = [], []
    for text, trained in pieces:
        piece = ids(tok, text)
        input_ids += piece
        labels += piece if trained else [-100] * len(piece)
    return {"input_ids": input_ids, "labels": labels}


# ---------------------------------------------------------------- reading messages rows


def test_messages_jsonl_is_read_without_options(tmp_path: Path) -> None:
    rows = [
        {"messages": TURNS},
        {"messages": TURNS[1:3]},
        # extra keys on a turn (name, tool ids ...) are dropped, not refused
        {"messages": [{"role": "user", "content": "Hi", "name": "ann"}, TURNS[2]]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    examples = load_examples(str(path))
    assert [e["messages"] for e in examples] == [
        TURNS,
        TURNS[1:3],
        [{"role": "user", "content": "Hi"}, TURNS[2]],
    ]
    # prompt/response name the last exchange, so response-based tasks and MIA texts still work
    assert [(e["prompt"], e["response"]) for e in examples] == [
        ("And a cat?", "a small feline"),
        ("Define dog.", "a domestic animal"),
        ("Hi", "a domestic animal"),
    ]
    assert [e["id"] for e in examples] == [f"{path}:{i}" for i in range(3)]
    assert {e["label"] for e in examples} == {""}


def test_messages_parquet_and_label_field(tmp_path: Path) -> None:
    import datasets

    rows = [{"messages": TURNS, "topic": "pets"}, {"messages": TURNS[1:3], "topic": "dogs"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "chat.parquet"))
    examples = load_local(tmp_path / "chat.parquet", label_field="topic")
    assert [e["messages"] for e in examples] == [TURNS, TURNS[1:3]]
    assert [e["label"] for e in examples] == ["pets", "dogs"]


def test_bad_messages_rows_name_file_row_and_turn(tmp_path: Path) -> None:
    good = {"messages": TURNS[1:3]}
    cases = {
        "role": ([{"role": "bot", "content": "x"}, TURNS[2]], r"line 2: messages\[0\] has role "),
        "content": ([TURNS[1], {"role": "assistant", "content": None}], r"messages\[1\]"),
        "no_reply": ([TURNS[0], TURNS[1]], "line 2: the messages have no assistant turn"),
        "empty": ([], "line 2: 'messages' must be a non-empty list"),
    }
    for name, (messages, pattern) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [good, {"messages": messages}])
        with pytest.raises(ValueError, match=pattern) as err:
            load_local(path)
        assert str(path) in str(err.value), name
    with pytest.raises(ValueError, match=r"valid roles are \['system', 'user', 'assistant'\]"):
        load_local(tmp_path / "role.jsonl")


def test_a_greeting_first_is_named_under_a_chat_template_and_trained_under_plain(
    tmp_path: Path, tok: PreTrainedTokenizerFast
) -> None:
    """An assistant turn first once failed as the template refusing "roles []" (audit h86); it
    now names the example and the two ways out, and `prompt_format: plain` trains it (h89)."""
    from fedllm.preflight import check_data
    from fedllm.recipe import ConfigError, load_recipe

    greeting = {"role": "assistant", "content": "Hello!"}
    path = write_jsonl(tmp_path / "greeting.jsonl", [{"messages": [greeting, *TURNS[1:3]]}] * 8)
    (example, *_) = load_local(path)  # the file itself is fine
    with pytest.raises(ValueError, match=r"greeting\.jsonl:0: the conversation opens with an"):
        format_example(example, tok, prompt_format="chat", max_length=64)
    plain = format_example(example, tok, prompt_format="plain", max_length=64)
    assert any(t != -100 for t in plain["labels"])
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    data = [f"data.source={path}", "data.num_clients=2", "data.partitioner=iid"]
    cfg = load_recipe(recipe, data)
    with pytest.raises(ConfigError, match=r"or set data\.prompt_format: plain"):
        check_data(cfg)  # `fedllm validate` and `prepare` say it before any client starts
    check_data(load_recipe(recipe, [*data, "data.prompt_format=plain"]))


def test_a_row_of_another_layout_in_a_chat_file_names_its_keys_and_the_layouts(
    tmp_path: Path,
) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": TURNS[1:3]}, {"topic": "t"}])
    with pytest.raises(ValueError) as err:
        load_local(path)
    assert f"{path} line 2: no 'messages' (this row has: topic); the file's rows are chat" in str(
        err.value
    )
    assert "'instruction' + 'output' (alpaca)" in str(err.value)


def test_a_broken_jsonl_line_is_named_before_datasets_reads_the_file(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps({"messages": TURNS[1:3]}) + '\n{"messages": [\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"cut\.jsonl line 2 is not valid JSON"):
        load_local(path)
    assert "Failed to load JSON" not in capfd.readouterr().err  # datasets never saw it


def test_unknown_layout_names_columns_and_the_layouts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "reply": "r"}])
    with pytest.raises(ValueError) as err:
        load_local(path)
    message = str(err.value)
    assert "prompt_field='prompt' is not a column" in message and str(path) in message
    assert "['question', 'reply']" in message
    for layout in ("'messages' (messages)", "'instruction' + 'output' (alpaca)", "'choices'"):
        assert layout in message


def test_named_fields_win_over_detection(tmp_path: Path) -> None:
    rows = [{"messages": TURNS[1:3], "q": "Define dog.", "a": "a pet"}]
    path = write_jsonl(tmp_path / "both.jsonl", rows)
    (example,) = load_local(path, prompt_field="q", response_field="a")
    assert (example["prompt"], example["response"]) == ("Define dog.", "a pet")
    assert "messages" not in example
    # a named field that is missing is an error, not a silent switch to the messages column
    with pytest.raises(ValueError, match="response_field='answer' is not a column"):
        load_local(path, prompt_field="q", response_field="answer")


def test_the_shipped_example_reads_as_chat(tok: PreTrainedTokenizerFast) -> None:
    path = Path(__file__).parents[1] / "examples" / "chat.jsonl"
    examples = load_local(path, label_field="topic")
    assert len(examples) == 48
    assert sorted({e["label"] for e in examples}) == ["cooking", "garden", "maths", "travel"]
    roles = [[t["role"] for t in e["messages"]] for e in examples]
    assert sum(r[0] == "system" for r in roles) == 16 and sum(len(r) > 3 for r in roles) == 4
    items = tokenize_all(examples, tok, prompt_format="chat", max_length=256)
    assert all(any(t != -100 for t in item["labels"]) for item in items)


# ---------------------------------------------------------------- Alpaca rows


def test_alpaca_rows(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Summarise the text below.", "input": "the quick fox", "output": "a fox"},
        {"instruction": "Write a haiku about rain.", "input": "", "output": "Soft rain"},
        {"instruction": "Name a colour.", "output": "red"},  # no input key at all
    ]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    examples = load_examples(str(path))
    assert [(e["prompt"], e["response"]) for e in examples] == [
        ("Summarise the text below.\n\nthe quick fox", "a fox"),
        ("Write a haiku about rain.", "Soft rain"),
        ("Name a colour.", "red"),
    ]
    assert all("messages" not in e for e in examples)


def test_bad_alpaca_row_names_file_row_and_column(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Name a colour.", "output": "red"},
        {"instruction": "Name a fruit.", "output": "apple"},
        {"instruction": "Name a tree."},  # row 3 (counted from 1): its output is missing
    ]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    with pytest.raises(ValueError) as err:
        load_local(path)
    assert f"{path} line 3: Alpaca row without 'output'" in str(err.value)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"instruction": " ", "output": "x"}])
    with pytest.raises(ValueError, match=r"blank\.jsonl line 1: Alpaca row without 'instruction'"):
        load_local(blank)


# ---------------------------------------------------------------- labels on assistant turns


def test_chat_template_labels_only_the_assistant_turns(tok: PreTrainedTokenizerFast) -> None:
    encoded = format_example({"messages": TURNS}, tok, prompt_format="chat", max_length=256)
    want = expected(
        tok,
        [
            ("<|im_start|>system\nYou are brief.<|im_end|>\n", False),
            ("<|im_start|>user\nDefine dog.<|im_end|>\n<|im_start|>assistant\n", False),
            ("a domestic animal<|im_end|>\n", True),
            ("<|im_start|>user\nAnd a cat?<|im_end|>\n<|im_start|>assistant\n", False),
            ("a small feline<|im_end|>\n", True),
        ],
    )
    assert encoded["input_ids"] == want["input_ids"]
    assert encoded["labels"] == want["labels"]
    assert encoded["attention_mask"] == [1] * len(want["input_ids"])


def test_plain_layout_labels_replies_and_their_eos(tok: PreTrainedTokenizerFast) -> None:
    encoded = format_example({"messages": TURNS}, tok, prompt_format="plain", max_length=256)
    want = expected(
        tok,
        [
            ("You are brief.\nDefine dog.\n", False),
            ("a domestic animal<|im_end|>", True),
            ("And a cat?\n", False),
            ("a small feline<|im_end|>", True),
        ],
    )
    assert encoded["input_ids"] == want["input_ids"]
    assert encoded["labels"] == want["labels"]


def test_one_exchange_equals_the_prompt_response_layout(tok: PreTrainedTokenizerFast) -> None:
    chat = {"messages": TURNS[1:3]}
    pair = {"prompt": "Define dog.", "response": "a domestic animal"}
    for fmt in ("chat", "plain"):
        assert format_example(chat, tok, prompt_format=fmt, max_length=256) == format_example(
            pair, tok, prompt_format=fmt, max_length=256
        ), fmt


def test_no_template_falls_back_to_plain(caplog: pytest.LogCaptureFixture) -> None:
    bare = bpe(template=None)
    with caplog.at_level(logging.WARNING, logger="fedllm.data.format"):
        encoded = format_example({"messages": TURNS}, bare, prompt_format="chat", max_length=256)
    assert "no chat_template" in caplog.text
    assert encoded == format_example(
        {"messages": TURNS}, bare, prompt_format="plain", max_length=256
    )


def test_truncation_keeps_labels_on_assistant_tokens(tok: PreTrainedTokenizerFast) -> None:
    full = format_example({"messages": TURNS}, tok, prompt_format="chat", max_length=256)
    first = next(i for i, t in enumerate(full["labels"]) if t != -100)
    # cut inside the second user turn: the first reply is kept, labelled exactly as before
    cut = first + 6
    short = format_example({"messages": TURNS}, tok, prompt_format="chat", max_length=cut)
    assert short["input_ids"] == full["input_ids"][:cut]
    assert short["labels"] == full["labels"][:cut]
    # the context alone is longer than max_length: its last 4 tokens + the first reply token
    tiny = format_example({"messages": TURNS}, tok, prompt_format="chat", max_length=5)
    assert tiny["input_ids"] == full["input_ids"][first - 4 : first + 1]
    assert tiny["labels"] == [-100] * 4 + [full["input_ids"][first]]


def test_template_that_rewrites_history_warns_and_masks_the_common_prefix(
    tok: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    odd = bpe()
    # the generation prompt says "assistant" but a rendered assistant turn says "bot"
    odd.chat_template = CHATML.replace(
        "{{ m['role'] }}", "{{ m['role'] | replace('assistant', 'bot') }}"
    )
    with caplog.at_level(logging.WARNING, logger="fedllm.data.format"):
        (encoded,) = tokenize_all(
            [{"messages": TURNS[1:3]}], odd, prompt_format="chat", max_length=99
        )
    assert "1 of 1 examples" in caplog.text
    trained = [t for t in encoded["labels"] if t != -100]
    assert tok.decode(trained) == "bot\na domestic animal<|im_end|>\n"


def test_a_refusing_template_names_the_example(tok: PreTrainedTokenizerFast) -> None:
    strict = bpe()
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system prompts') }}"
        "{% endif %}" + CHATML
    )
    with pytest.raises(ValueError, match=r"example f\.jsonl:3: the tokenizer's chat template"):
        format_example(
            {"messages": TURNS, "id": "f.jsonl:3"}, strict, prompt_format="chat", max_length=64
        )


def test_mixed_examples_tokenize_together(tok: PreTrainedTokenizerFast) -> None:
    canary_like = {"prompt": "What is the secret?", "response": "123", "messages": None}
    items = tokenize_all(
        [{"messages": TURNS}, canary_like], tok, prompt_format="chat", max_length=256
    )
    assert tok.decode([t for t in items[1]["labels"] if t != -100]) == "123<|im_end|>\n"


# ---------------------------------------------------------------- generating from chat data


def test_generation_prompt_is_the_training_context(tok: PreTrainedTokenizerFast) -> None:
    example = {"messages": TURNS, "prompt": "And a cat?", "response": "a small feline"}
    assert example_prompt(example) == TURNS[:4]
    assert example_prompt({"prompt": "p", "response": "r"}) == "p"
    for fmt in ("chat", "plain"):
        full = format_example(example, tok, prompt_format=fmt, max_length=256)
        last_reply = max(
            i for i, t in enumerate(full["labels"]) if t != -100 and full["labels"][i - 1] == -100
        )
        context_ids = prompt_ids(tok, example_prompt(example), prompt_format=fmt)
        assert context_ids == full["input_ids"][:last_reply], fmt


def test_stop_tokens_come_from_template_tokenizer_and_generation_config() -> None:
    llama_like = bpe(eos="</s>", template=CHATML.replace("<|im_end|>", "<|eot|>"))
    eot, eos = llama_like.convert_tokens_to_ids(["<|eot|>", "</s>"])
    assert template_end_ids(llama_like) == [eot]
    assert end_token_ids(llama_like) == sorted([eot, eos])

    class Model:
        generation_config = GenerationConfig(eos_token_id=[eos, 7])

    assert end_token_ids(llama_like, Model()) == sorted([eot, eos, 7])
    plain = bpe(eos="</s>", template=None)
    assert end_token_ids(plain) == [eos]
    # a template whose reply is followed by plain text gives no end-of-turn token
    texty = bpe(eos="</s>", template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert template_end_ids(texty) == []


# ---------------------------------------------------------------- a federation on chat rows

CHAT_ROWS = [
    {
        "messages": [
            *([SYSTEM] if i % 3 == 0 else []),
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            *(
                [
                    {"role": "user", "content": "And doubled again?"},
                    {"role": "assistant", "content": f"That is {4 * i}."},
                ]
                if i % 2
                else []
            ),
        ]
    }
    for i in range(40)
]


@pytest.mark.slow
def test_tiny_federation_on_a_chat_jsonl(tmp_path: Path) -> None:
    from fedllm.cli import main

    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    recipe = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
    overrides = [
        f"output_dir={tmp_path / 'runs'}",
        "name=chat",
        f"data.source={data}",
        "data.partitioner=iid",
        "data.num_clients=2",
        "data.max_length=64",
        "lora.ranks=[2,4]",
        "federation.rounds=1",
        "federation.local_steps=4",
    ]
    assert main(["run", recipe, *overrides]) == 0
    run = tmp_path / "runs" / "chat"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in rows if r["kind"] == "client"]
    assert sorted(r["partition"] for r in clients) == [0, 1]
    assert all(r["status"] == "ok" and r["steps"] == 4 for r in clients)
    server = {r["round"]: r for r in rows if r["kind"] == "server"}
    assert server[1]["held_out_loss"] < server[0]["held_out_loss"]
    assert (run / "final_adapter" / "adapter_config.json").is_file()


def test_trained_text_is_every_assistant_turn_of_a_conversation() -> None:
    # the zlib membership score divides the mean NLL over every assistant turn by this text's
    # compressed size: the last reply alone would be a fraction of what was scored
    row = messages_example(list(TURNS), label="x", example_id="1")
    assert trained_text(row) == "a domestic animal\na small feline"
    assert trained_text({"prompt": "Define dog.", "response": "a dog"}) == "a dog"
