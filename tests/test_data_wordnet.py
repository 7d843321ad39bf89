"""WordNet loader: a hand-written database in tmp_path, plus a smoke test on the Debian files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from fedllm.data import load_examples, load_wordnet
from fedllm.data.wordnet import LEXNAMES

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"

NOUNS = (
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 "
    "| that which is perceived or known or inferred to have its own distinct existence  \n"
    "02084071 05 n 07 dog 0 domestic_dog 0 Canis_familiaris 0 frump 0 cad 0 bounder 0 blackguard 0 "
    '002 @ 02083346 n 0000 #m 02083863 n 0000 | a member of the genus Canis; "the dog barked"  \n'
    "07802417 13 n 01 hot_dog 0 001 @ 07557434 n 0000 | a frankfurter served hot on a bun;  \n"
)
VERBS = (
    "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 001 * 00005041 v 0000 "
    '02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs; "I can breathe better"  \n'
)
ADJS = (
    "00014358 00 s 02 galore(ip) 0 abounding 0 001 & 00013887 a 0000 "
    '| existing in abundance; "whiskey galore"  \n'
)
ADVS = "00516492 02 r 01 wrongfully 0 000 | in an unjust or unfair manner  \n"


def write_wordnet(root: Path) -> Path:
    for pos, body in (("noun", NOUNS), ("verb", VERBS), ("adj", ADJS), ("adv", ADVS)):
        (root / f"data.{pos}").write_text(HEADER + HEADER + body, encoding="utf-8")
    return root


def test_parses_hand_written_noun_file(tmp_path: Path) -> None:
    examples = load_wordnet(root=write_wordnet(tmp_path), pos=("noun",))
    assert examples == [
        {
            "prompt": "Define the word 'entity' (noun).",
            "response": (
                "that which is perceived or known or inferred to have its own distinct existence"
            ),
            "label": "noun.Tops",
            "id": "wordnet:noun:00001740",
        },
        {
            "prompt": "Define the word 'dog' (noun).",
            "response": "a member of the genus Canis",
            "label": "noun.animal",
            "id": "wordnet:noun:02084071",
        },
        {
            "prompt": "Define the word 'hot dog' (noun).",
            "response": "a frankfurter served hot on a bun",
            "label": "noun.food",
            "id": "wordnet:noun:07802417",
        },
    ]


def test_every_pos_with_frames_and_adjective_markers(tmp_path: Path) -> None:
    examples = load_wordnet(root=write_wordnet(tmp_path))
    assert [e["prompt"] for e in examples[3:]] == [
        "Define the word 'breathe' (verb).",
        "Define the word 'galore' (adjective).",
        "Define the word 'wrongfully' (adverb).",
    ]
    assert [e["response"] for e in examples[3:]] == [
        "draw air into, and expel out of, the lungs",
        "existing in abundance",
        "in an unjust or unfair manner",
    ]
    assert [e["label"] for e in examples[3:]] == ["verb.body", "adj.all", "adv.all"]


def test_max_examples_is_a_deterministic_subset_in_file_order(tmp_path: Path) -> None:
    root = write_wordnet(tmp_path)
    everything = load_wordnet(root=root)
    first = load_wordnet(root=root, max_examples=3, seed=7)
    assert first == load_wordnet(root=root, max_examples=3, seed=7)
    assert len(first) == 3
    positions = [everything.index(e) for e in first]
    assert positions == sorted(positions)
    assert load_wordnet(root=root, max_examples=100) == everything
    assert load_examples("wordnet", root=root, max_examples=3, seed=7) == first


def test_missing_files_name_the_path_and_the_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.noun.*apt-get install wordnet-base"):
        load_wordnet(root=tmp_path / "nowhere")


@pytest.mark.parametrize("pos", [("noun", "pronoun"), (), ("n",)])
def test_bad_pos_says_what_is_valid(tmp_path: Path, pos: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match=r"pos must be .*'noun', 'verb', 'adj', 'adv'"):
        load_wordnet(root=write_wordnet(tmp_path), pos=pos)


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "data.adv").write_text(HEADER + "not a synset\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.adv:2"):
        load_wordnet(root=tmp_path, pos=("adv",))


def test_lexnames_is_the_standard_list() -> None:
    assert len(LEXNAMES) == 45
    assert (LEXNAMES[0], LEXNAMES[3], LEXNAMES[28], LEXNAMES[29], LEXNAMES[44]) == (
        "adj.all",
        "noun.Tops",
        "noun.time",
        "verb.body",
        "adj.ppl",
    )


@pytest.mark.skipif(
    not Path("/usr/share/wordnet/data.noun").exists(), reason="wordnet-base not installed"
)
def test_real_wordnet_counts_and_labels() -> None:
    examples = load_wordnet()
    per_pos = Counter(e["id"].split(":")[1] for e in examples)
    assert per_pos == {"noun": 82115, "verb": 13767, "adj": 18156, "adv": 3621}
    labels = Counter(e["label"] for e in examples)
    assert set(labels) == set(LEXNAMES)
    assert all(e["label"].split(".")[0] in e["id"] for e in examples)
    assert labels["noun.motive"] == 42 and labels["noun.artifact"] == 11587
    assert all(e["response"] and "_" not in e["prompt"] for e in examples)
