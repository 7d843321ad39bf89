"""Chat rows: a `messages` list of {role, content} turns (system/user/assistant, multi-turn).

Rendering returns the conversation's text once, with the character span of every assistant turn,
so the text is tokenized once and only tokens inside those spans are trained on.

- "chat": the tokenizer's chat template. An assistant turn's span runs from the end of the
  generation prompt before it to the end of the template's rendering up to it, so it covers the
  reply and the template's end-of-turn tokens, never the system/user turns or their markup.
- "plain" (no template): each system/user turn is "{content}\\n" and each assistant turn is
  "{content}{eos}", so one user → assistant exchange is exactly the prompt/response layout
  "{prompt}\\n{response}{eos}" of `prompt_format: plain`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant")
Span = tuple[int, int]


def check_messages(value: Any, *, where: str) -> list[dict[str, str]]:
    """A row's turns as [{role, content}] (other keys dropped), or an error naming `where`."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} turns, "
            f"got {value!r:.80}"
        )
    turns: list[dict[str, str]] = []
    for i, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise ValueError(f"{where}: messages[{i}] must be a {{role, content}} object")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise ValueError(
                f"{where}: messages[{i}] has role {role!r:.80}; valid roles are {list(ROLES)}"
            )
        if not isinstance(content, str):
            raise ValueError(
                f"{where}: messages[{i}] ({role}) needs a string 'content', got {content!r:.80}"
            )
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in turns):
        raise ValueError(f"{where}: the messages have no assistant turn, so nothing to train on")
    return turns


def opens_with_assistant(messages: Sequence[Mapping[str, str]]) -> bool:
    """Whether the first turn after any system turns is the assistant's: a reply to nothing,
    which a chat template cannot put after a prompt (`prompt_format: plain` can)."""
    return next((t["role"] for t in messages if t["role"] != "system"), None) == "assistant"


GREETING = (
    "the conversation opens with an assistant turn, which a chat template cannot render after "
    "a prompt: start it with a user turn (a greeting goes into the system turn or after the "
    "user's first message), or set data.prompt_format: plain"
)


def messages_example(
    messages: list[dict[str, str]], *, label: str, example_id: str
) -> dict[str, Any]:
    """The loaders' example for a conversation: prompt/response name its last exchange."""
    last = max(i for i, t in enumerate(messages) if t["role"] == "assistant")
    asked = [t["content"] for t in messages[:last] if t["role"] == "user"]
    return {
        "prompt": asked[-1] if asked else "",
        "response": messages[last]["content"],
        "label": label,
        "id": example_id,
        "messages": messages,
    }


def trained_text(example: Mapping[str, Any]) -> str:
    """The text the training loss covers: every assistant turn of a conversation (joined by
    newlines), or the response (what a zlib-calibrated membership score divides by)."""
    messages = example.get("messages")
    if not messages:
        return example["response"]
    return "\n".join(t["content"] for t in messages if t["role"] == "assistant")


def context(example: Mapping[str, Any]) -> str | list[dict[str, str]]:
    """What a reply to `example` is generated from: its turns before the last assistant turn."""
    messages = example.get("messages")
    if not messages:
        return example["prompt"]
    last = max(i for i, t in enumerate(messages) if t["role"] == "assistant")
    return list(messages[:last])


def plain_text(messages: Sequence[Mapping[str, str]], *, eos: str) -> tuple[str, list[Span]]:
    """The plain layout of `messages` and the character span of each assistant turn (+ eos)."""
    parts: list[str] = []
    spans: list[Span] = []
    at = 0
    for turn in messages:
        if turn["role"] == "assistant":
            piece = turn["content"] + eos
            spans.append((at, at + len(piece)))
        else:
            piece = turn["content"] + "\n"
        parts.append(piece)
        at += len(piece)
    return "".join(parts), spans


def template_text(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], *, where: str = "example"
) -> tuple[str, list[Span], bool]:
    """(chat-template text, assistant spans, whether every turn rendered as a prefix of the whole).

    When a template renders a conversation's beginning differently from the whole (it moves or
    drops text), a span falls back to the longest common prefix and the flag is False.
    """
    if opens_with_assistant(messages):
        raise ValueError(f"{where}: {GREETING}")
    full = render(tokenizer, messages, generation_prompt=False, where=where)
    spans: list[Span] = []
    clean = True
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        head = render(tokenizer, messages[:i], generation_prompt=True, where=where)
        upto = render(tokenizer, messages[: i + 1], generation_prompt=False, where=where)
        start, end = common_prefix(head, full), common_prefix(upto, full)
        clean = clean and start == len(head) and end == len(upto)
        if end > start:
            spans.append((start, end))
    return full, spans, clean


def render(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    generation_prompt: bool,
    where: str = "example",
) -> str:
    """The chat template's text of `messages`; a template's own refusal names `where`."""
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja's TemplateError and templates' raise_exception
        raise ValueError(
            f"{where}: the tokenizer's chat template refused these messages "
            f"({type(err).__name__}: {err}); roles were {[t['role'] for t in messages]}"
        ) from err


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common prefix of two sequences (strings or token lists)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
