"""The did-you-mean hint every error that lists valid names gives for a misspelt one."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, valid: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The name in `valid` closest to `word` in any case (`FedIT`: 'fedit') with a similarity of
    at least `cutoff` (difflib's ratio), or None if none is."""
    by_lower = {v.lower(): v for v in valid}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=cutoff)
    return by_lower[close[0]] if close else None


def did_you_mean(word: str, valid: Iterable[str], *, cutoff: float = 0.6) -> str:
    """` (did you mean 'x'?)` for `closest(word, valid)`, or "" if there is none."""
    name = closest(word, valid, cutoff=cutoff)
    return f" (did you mean {name!r}?)" if name is not None else ""
