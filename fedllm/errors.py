"""Errors that end a command with one line for the person running it, not a traceback."""

from __future__ import annotations

import re


class RunFailed(RuntimeError):
    """A run that cannot go on (every client of a round failed); its finished rounds are kept."""


class NodeRefusal(ValueError):
    """A node declining a run by its own published rules (e.g. a privacy floor): its text names
    only the recipe and those rules, so it reaches the server even from a private run."""


def short_reason(reason: str, *, limit: int = 300) -> str:
    """The line of an error report a person needs: a client's error as Flower relays it from a
    Ray worker is the exception's repr plus its whole traceback, ending in "Exception
    ClientAppException occurred. Message: <the error>"; else the innermost `Name: message` line
    (cut to `limit` characters)."""
    if wrapped := re.fullmatch(r"<class '[^']*'>:<'(.*)'>", reason.strip(), flags=re.DOTALL):
        reason = wrapped.group(1)  # Flower's str(type(ex)) + ":<'" + str(ex) + "'>"
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    if not lines:
        return reason
    found = lines[-1]
    text = "\n".join(lines)
    if (at := text.rfind("occurred. Message:")) >= 0:  # Flower's wrapper of the client's error
        found = " ".join(text[at + len("occurred. Message:") :].split()) or found  # all its lines
    else:
        for line in reversed(lines):  # e.g. "ValueError: ..." with a message after the colon
            head, _, message = line.partition(":")
            if head.endswith(("Error", "Exception")) and " " not in head and message.strip():
                found = line
                break
    return found if len(found) <= limit else found[: limit - 1] + "…"
