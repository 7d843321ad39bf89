"""Continuation examples from the Debian `fortunes` files, labelled by category (the file name).

A multi-line fortune is split after its first line (prompt) and the rest is the response, which
keeps quotes with their "-- Author" line; a one-line fortune is split at its middle word. Both
sides are stripped at the split: a response starting with whitespace would merge with the
prompt's last newline in byte-level BPE and break the prompt/response token boundary.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedllm.data.sample import sample_examples

# "___\b\b\bnot" is typewriter overstriking: a character followed by a backspace is erased.
_OVERSTRIKE = re.compile(r"[^\x08\n]\x08")
_BLANK_LINES = re.compile(r"^(?:[ \t]*\n)+")


def load_fortunes(
    *,
    root: str | Path = "/usr/share/games/fortunes",
    max_examples: int | None = None,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Every fortune with at least two words, by category (sorted file name) then file order.

    With `max_examples`, a deterministic random subset (by `seed`) keeps that order.
    """
    root = Path(root)
    hint = "install them with `apt-get install fortunes` or pass root= pointing at a fortune folder"
    if not root.is_dir():
        raise FileNotFoundError(f"fortune folder {root} not found; {hint}")
    # Skip the strfile indexes (.dat) and the .u8 symlinks that duplicate each category.
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8"))
    if not files:
        raise FileNotFoundError(f"fortune folder {root} holds no fortune files; {hint}")
    examples: list[dict[str, str]] = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, entry in enumerate(split_entries(text)):
            example = split_fortune(entry)
            if example is not None:
                prompt, response = example
                examples.append(
                    {
                        "prompt": prompt,
                        "response": response,
                        "label": path.name,
                        "id": f"fortunes:{path.name}:{number}",
                    }
                )
    return sample_examples(examples, max_examples=max_examples, seed=seed)


def split_entries(text: str) -> list[str]:
    """The non-empty %-separated entries of one fortune file, overstriking resolved."""
    while _OVERSTRIKE.search(text):
        text = _OVERSTRIKE.sub("", text)
    text = text.replace("\x08", "").replace("\r\n", "\n")
    entries = re.split(r"^%[ \t]*$", text, flags=re.MULTILINE)
    stripped = (_BLANK_LINES.sub("", entry).rstrip() for entry in entries)
    return [entry for entry in stripped if entry]


def split_fortune(entry: str) -> tuple[str, str] | None:
    """(prompt, response): first line / the rest, or first half / second half of the words."""
    first, _, rest = entry.partition("\n")
    if first.strip() and rest.strip():
        return first.strip(), rest.lstrip()
    words = entry.split()
    if len(words) < 2:
        return None
    half = len(words) // 2
    return " ".join(words[:half]), " ".join(words[half:])
