"""One entry point for every data source: "wordnet", "fortunes", a local path, or a hub name.

Local files and hub datasets may hold prompt/response columns, a `messages` list (chat), Alpaca
rows or question/choices/answer rows: see fedllm.data.local.detect_layout.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fedllm.data.fortunes import load_fortunes
from fedllm.data.local import BUILDERS, load_local, rows_to_examples
from fedllm.data.sample import sample_examples
from fedllm.data.wordnet import load_wordnet
from fedllm.recipe.schema_common import looks_like_path
from fedllm.recipe.schema_data import BUILT_IN_SOURCES as BUILT_IN
from fedllm.recipe.schema_data import near_built_in

logger = logging.getLogger(__name__)

VALID_SOURCES = (
    "'wordnet', 'fortunes', a local "
    + "/".join(BUILDERS)
    + " file or save_to_disk folder, or a Hugging Face hub dataset name (needs network access)"
)

# The keyword options each kind of source accepts, besides max_examples and seed.
OPTIONS: dict[str, tuple[str, ...]] = {
    "wordnet": ("root", "pos"),
    "fortunes": ("root",),
    "local": ("prompt_field", "response_field", "label_field"),
    "hub": ("prompt_field", "response_field", "label_field", "name", "split"),
}


def load_examples(
    source: str, *, max_examples: int | None = None, seed: int = 0, **source_options: Any
) -> list[dict[str, Any]]:
    """Load examples from `source`; `max_examples` keeps a deterministic subset chosen by `seed`."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source must be {VALID_SOURCES}; got {source!r}")
    if source in BUILT_IN:
        _check_options(source, source_options, kind=source)
        loader = load_wordnet if source == "wordnet" else load_fortunes
        return loader(max_examples=max_examples, seed=seed, **source_options)
    path = Path(source).expanduser()
    if path.exists():
        _check_options(source, source_options, kind="local")
        examples = load_local(path, **source_options)
    elif looks_like_path(source):
        raise FileNotFoundError(f"local dataset {source} not found; valid sources: {VALID_SOURCES}")
    elif close := near_built_in(source):
        # a typo, not a hub name: say so now instead of after the hub's network retries
        raise ValueError(
            f"source {source!r} is not a local path (did you mean {close!r}?); "
            f"valid sources: {VALID_SOURCES}"
        )
    else:
        _check_options(source, source_options, kind="hub")
        logger.info(  # a download can take a while: say what is being tried meanwhile
            "data source %r: no local file or folder of that name in %s; trying it as a "
            "Hugging Face hub dataset",
            source,
            Path.cwd(),
        )
        examples = _load_hub(source, **source_options)
    return sample_examples(examples, max_examples=max_examples, seed=seed)


def _check_options(source: str, options: dict[str, Any], *, kind: str) -> None:
    unknown = sorted(set(options) - set(OPTIONS[kind]))
    if unknown:
        raise ValueError(
            f"option(s) {unknown} do not apply to source {source!r} ({kind}); "
            f"valid options are {list(OPTIONS[kind])} plus max_examples and seed"
        )


def _load_hub(
    name_or_path: str,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    label_field: str | None = None,
    name: str | None = None,
    split: str = "train",
) -> list[dict[str, Any]]:
    import datasets  # imported on use: it takes over a second

    if reason := hub_unreachable():
        raise ValueError(
            f"could not load source {name_or_path!r}: it is not 'wordnet', 'fortunes' or an "
            f"existing local path (in {Path.cwd()}), and as a Hugging Face hub dataset it needs "
            f"the hub, which {reason} (set HF_HUB_OFFLINE=1 to use a copy already in the "
            f"datasets cache); valid sources: {VALID_SOURCES}"
        )
    try:
        dataset = datasets.load_dataset(name_or_path, name=name, split=split)
    except Exception as err:
        raise ValueError(
            f"could not load source {name_or_path!r}: it is not 'wordnet', 'fortunes' or an "
            f"existing local path (in {Path.cwd()}), so it was tried as a Hugging Face hub "
            "dataset, which only works online with a valid name and split "
            f"({type(err).__name__}: {err}); "
            f"valid sources: {VALID_SOURCES}"
        ) from err
    return rows_to_examples(
        dataset,
        columns=list(dataset.column_names),
        origin=f"{name_or_path}[{split}]",
        prompt_field=prompt_field,
        response_field=response_field,
        label_field=label_field,
    )


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (its host does not resolve), else None: offline, `datasets`
    retries each request for half a minute before it fails. Under HF_HUB_OFFLINE nothing is
    asked (the cache answers)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError) as err:
        return f"this machine cannot resolve ({host}: {err})"
    return None
