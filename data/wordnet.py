"""Word→definition examples from the WordNet 3.0 database files, labelled by lexicographer file.

The 45 lexicographer files (noun.animal, verb.motion, ...) are natural domains for non-IID clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedllm.data.sample import sample_examples

# The standard WordNet 3.0 `lexnames` list: position = the two-digit lex_filenum in data.* files.
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)  # fmt: skip

POS_NAMES: dict[str, str] = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}

# Syntactic markers WordNet appends to some adjectives, e.g. "galore(ip)".
_ADJ_MARKERS = ("(a)", "(p)", "(ip)")


def load_wordnet(
    *,
    root: str | Path = "/usr/share/wordnet",
    pos: Sequence[str] = ("noun", "verb", "adj", "adv"),
    max_examples: int | None = None,
    seed: int = 0,
) -> list[dict[str, str]]:
    """One "Define the word ..." example per synset (its first word), in file order.

    With `max_examples`, a deterministic random subset (by `seed`) keeps its file order.
    """
    if isinstance(pos, str):
        pos = (pos,)
    unknown = [p for p in pos if p not in POS_NAMES]
    if unknown or not pos:
        raise ValueError(f"pos must be a non-empty subset of {list(POS_NAMES)}, got {list(pos)}")
    root = Path(root)
    paths = [root / f"data.{p}" for p in pos]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"WordNet data file {path} not found; install it with `apt-get install "
                f"wordnet-base` or pass root= pointing at a folder with data.{{noun,verb,adj,adv}}"
            )
    examples: list[dict[str, str]] = []
    for p, path in zip(pos, paths, strict=True):
        with path.open(encoding="utf-8") as lines:
            for line_no, line in enumerate(lines, start=1):
                if line.startswith("  ") or not line.strip():
                    continue  # the license header lines start with two spaces
                example = parse_synset_line(line, pos=p)
                if example is None:
                    raise ValueError(f"{path}:{line_no}: not a WordNet synset line: {line[:80]!r}")
                if example["response"]:
                    examples.append(example)
    return sample_examples(examples, max_examples=max_examples, seed=seed)


def parse_synset_line(line: str, *, pos: str) -> dict[str, str] | None:
    """Parse one data.* line into an example, or None when it is not a synset line."""
    fields, sep, gloss = line.partition(" | ")
    parts = fields.split()
    if not sep or len(parts) < 6 or not parts[1].isdigit() or int(parts[1]) >= len(LEXNAMES):
        return None
    offset, lex_filenum, word = parts[0], int(parts[1]), parts[4]
    for marker in _ADJ_MARKERS:
        word = word.removesuffix(marker)
    word = word.replace("_", " ")
    definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
    return {
        "prompt": f"Define the word '{word}' ({POS_NAMES[pos]}).",
        "response": definition,
        "label": LEXNAMES[lex_filenum],
        "id": f"wordnet:{pos}:{offset}",
    }
