"""fedllm.eval task classes: questions built as specified, and the metrics of a tiny model."""

from pathlib import Path

import pytest

from fedllm.client.train import evaluate_nll
from fedllm.data import load_wordnet
from fedllm.eval.tasks.choose import ChooseDefinition
from fedllm.eval.tasks.define import DefineWords
from fedllm.eval.tasks.domain import WordDomain
from fedllm.eval.tasks.held_out import HeldOutLoss
from fedllm.model.loading import load_base_model
from fedllm.model.tiny import build_tiny_model

DOG = {
    "prompt": "Define the word 'dog' (noun).",
    "response": "a domestic canine",
    "label": "noun.animal",
    "id": "x",
}
QUICK = {
    "prompt": "Define the word 'quickly' (adverb).",
    "response": "with speed",
    "label": "adv.all",
    "id": "y",
}


def test_domain_questions() -> None:
    task = WordDomain([DOG, QUICK, {"prompt": "free text", "response": "r", "label": "z"}])
    assert len(task) == 1  # adverbs have one domain only; non-WordNet examples are skipped
    q = task.get_example(0)
    assert q["prompt"] == "Which WordNet category does the noun 'dog' belong to?"
    assert len(q["options"]) == 4 and q["options"][q["answer"]] == "animal"
    assert len(set(q["options"])) == 4


def test_the_domain_prior_is_what_knowing_a_clients_domains_alone_scores() -> None:
    # by hand: answers animal, animal, plant, food (counts 2, 1, 1). Q1 {animal, food}: pick
    # animal, right. Q2 {plant, animal}: animal, right. Q3 {plant, food}: a tie, half credit.
    # Q4 {animal, food}: animal, wrong. 2.5 / 4, where chance is 1/2
    from fedllm.eval.tasks.domain import domain_prior

    asked = [
        (["noun.animal", "noun.food"], 0),
        (["noun.plant", "noun.animal"], 1),
        (["noun.plant", "noun.food"], 0),
        (["noun.animal", "noun.food"], 1),
    ]
    assert domain_prior(asked) == pytest.approx(2.5 / 4)
    # parts of speech kept apart: verb.motion and noun.act answered once each, both right (had
    # "motion" and "act" been counted whole, both questions would be ties: 0.5)
    verbs, nouns = ["verb.motion", "verb.act"], ["noun.motion", "noun.act"]
    assert domain_prior([(verbs, 0), (nouns, 1)]) == 1.0
    task = WordDomain([DOG, DOG, QUICK])
    assert task.prior == 1.0  # one domain answered: always right
    assert [m.key for m in WordDomain.metrics][-1] == "prior"


def test_choose_asks_a_chat_row_with_its_whole_conversation() -> None:
    """A chat row's reply follows its system turn and earlier turns in training and in `define`;
    `choose` asked only the last user turn (audit h84)."""
    from fedllm.data.chat import messages_example

    system = {"role": "system", "content": "Answer in one word."}
    rows = [
        messages_example(
            [system, {"role": "user", "content": q}, {"role": "assistant", "content": a}],
            label="geo",
            example_id=str(i),
        )
        for i, (q, a) in enumerate([("France?", "Paris"), ("Italy?", "Rome"), ("Peru?", "Lima")])
    ]
    q = ChooseDefinition(rows, num_options=3).get_example(0)
    assert q["prompt"] == [system, {"role": "user", "content": "France?"}]
    assert q["options"][q["answer"]] == "Paris"


def test_choose_definition_questions() -> None:
    examples = load_wordnet(pos=("noun",), max_examples=20, seed=4)
    task = ChooseDefinition(examples, num_options=4)
    assert len(task) == 20
    for i, ex in enumerate(examples):
        q = task.get_example(i)
        assert q["prompt"] == ex["prompt"] and len(q["options"]) == 4
        assert q["options"][q["answer"]] == ex["response"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    examples = load_wordnet(pos=("noun",), max_examples=40, seed=5)
    texts = [f"{e['prompt']} {e['response']}" for e in examples]
    model, tok = load_base_model(
        Path(build_tiny_model(tmp_path_factory.mktemp("t") / "m", texts=texts, vocab_size=320))
    )
    model.eval()
    return model, tok, examples[:10]


def test_held_out_loss_matches_the_trainer(tiny) -> None:
    model, tok, examples = tiny
    task = HeldOutLoss(examples, tok, prompt_format="chat", max_length=40)
    result = task.evaluate(model, batch_size=4)
    nll, tokens = evaluate_nll(model, task.items, batch_size=3, pad_id=tok.pad_token_id)
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(nll / tokens, rel=1e-4)
    assert result["perplexity"] > 50  # an untrained model over a few hundred tokens


def test_generation_and_choice_tasks_run_on_a_model(tiny) -> None:
    model, tok, examples = tiny
    define = DefineWords(examples, tok, prompt_format="chat", max_new_tokens=4)
    assert define.get_example(0)["reference"] == examples[0]["response"]
    result = define.evaluate(model, batch_size=4)
    assert result["examples"] == 10 and 0 <= result["rouge_l"] <= 1
    assert result["exact_match"] == 0.0  # 4 tokens of an untrained model are not a definition
    choose = ChooseDefinition(examples).evaluate(
        model, tokenizer=tok, prompt_format="chat", batch_size=8
    )
    assert choose["examples"] == 10 and choose["chance"] == pytest.approx(0.25)
