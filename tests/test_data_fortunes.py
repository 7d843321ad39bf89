"""Fortune loader: a hand-written fortune folder in tmp_path, plus a smoke test on the real one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from fedllm.data import load_examples, load_fortunes

COOKIE = (
    "Never trust a computer you can't throw out a window.\n"
    "\t\t-- Steve Wozniak\n"
    "%\n"
    "A gift of a flower will soon be made to you.\n"
    "%\n"
    "Yow!\n"
    "%\n"
    "my client is *___\b\b\bnot* a murderer\n"
    "%\n"
)
PETS = "\n  \nDogs come when called;\ncats take a message.\n%\nno trailing percent sign"


def write_fortunes(root: Path) -> Path:
    (root / "cookie").write_text(COOKIE, encoding="utf-8")
    (root / "pets").write_text(PETS, encoding="utf-8")
    (root / "cookie.dat").write_bytes(b"\x00\x00\x00\x02\xff\xfe index bytes")
    (root / "cookie.u8").symlink_to(root / "cookie")
    return root


def test_hand_written_folder(tmp_path: Path) -> None:
    examples = load_fortunes(root=write_fortunes(tmp_path))
    assert [(e["prompt"], e["response"], e["label"], e["id"]) for e in examples] == [
        (
            "Never trust a computer you can't throw out a window.",
            "-- Steve Wozniak",
            "cookie",
            "fortunes:cookie:0",
        ),
        # one line: split at the middle word (11 words → 5 + 6)
        ("A gift of a flower", "will soon be made to you.", "cookie", "fortunes:cookie:1"),
        # "Yow!" (entry 2) has one word and is skipped; overstriking is resolved
        ("my client is", "*not* a murderer", "cookie", "fortunes:cookie:3"),
        ("Dogs come when called;", "cats take a message.", "pets", "fortunes:pets:0"),
        ("no trailing", "percent sign", "pets", "fortunes:pets:1"),
    ]


def test_max_examples_is_deterministic(tmp_path: Path) -> None:
    root = write_fortunes(tmp_path)
    two = load_fortunes(root=root, max_examples=2, seed=3)
    assert len(two) == 2 and two == load_fortunes(root=root, max_examples=2, seed=3)
    assert load_examples("fortunes", root=root, max_examples=2, seed=3) == two
    with pytest.raises(ValueError, match="max_examples must be a positive integer"):
        load_fortunes(root=root, max_examples=0)


def test_missing_folder_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere.*apt-get install fortunes"):
        load_fortunes(root=tmp_path / "nowhere")
    (tmp_path / "only.dat").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match=r"no fortune files.*apt-get install fortunes"):
        load_fortunes(root=tmp_path)


@pytest.mark.skipif(
    not Path("/usr/share/games/fortunes/cookie").exists(), reason="fortunes not installed"
)
def test_real_fortunes() -> None:
    examples = load_fortunes()
    labels = Counter(e["label"] for e in examples)
    assert len(labels) == 43 and len(examples) == 15199
    assert labels["cookie"] == 1133 and labels["pratchett"] == 2
    assert all(e["prompt"] and e["response"] and "\b" not in e["response"] for e in examples)
    assert all(not e["response"][0].isspace() for e in examples)
