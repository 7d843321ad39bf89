"""Examples from the user's own data: a JSON/JSONL/CSV/Parquet file or a `save_to_disk` folder."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# File suffix → the `datasets` builder that reads it.
BUILDERS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


def load_local(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    label_field: str | None = None,
) -> list[dict[str, str]]:
    """Read a local file or `datasets.save_to_disk` folder (a DatasetDict's "train" split)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"local dataset {path} not found; give a {'/'.join(BUILDERS)} file "
            "or a folder written by datasets' save_to_disk"
        )
    # A throwaway cache: the rows are copied out below, so nothing is left in ~/.cache.
    with tempfile.TemporaryDirectory(prefix="fedllm-data-") as cache_dir:
        dataset = _read_folder(path) if path.is_dir() else _read_file(path, cache_dir=cache_dir)
        return rows_to_examples(
            dataset,
            columns=list(dataset.column_names),
            origin=str(path),
            prompt_field=prompt_field,
            response_field=response_field,
            label_field=label_field,
        )


def rows_to_examples(
    rows: Iterable[Mapping[str, Any]],
    *,
    columns: list[str],
    origin: str,
    prompt_field: str,
    response_field: str,
    label_field: str | None,
) -> list[dict[str, str]]:
    """Map table rows to examples; None becomes "", other values become str; label "" if unset."""
    wanted = {"prompt_field": prompt_field, "response_field": response_field}
    if label_field is not None:
        wanted["label_field"] = label_field
    for argument, field in wanted.items():
        if field not in columns:
            raise ValueError(
                f"{argument}={field!r} is not a column of {origin}; its columns are {columns}"
            )
    has_id = "id" in columns
    examples: list[dict[str, str]] = []
    for row_number, row in enumerate(rows):
        examples.append(
            {
                "prompt": _text(row[prompt_field]),
                "response": _text(row[response_field]),
                "label": "" if label_field is None else _text(row[label_field]),
                "id": _text(row["id"]) if has_id else f"{origin}:{row_number}",
            }
        )
    return examples


def _read_file(path: Path, *, cache_dir: str) -> Any:
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"cannot read {path}: the suffix {path.suffix!r} is not one of {list(BUILDERS)}; "
            "a folder written by datasets' save_to_disk also works"
        )
    import datasets  # imported on use: it takes over a second

    return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)


def _read_folder(path: Path) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise ValueError(
            f"{path} is a folder but not one written by datasets' save_to_disk ({err}); "
            f"pass a {'/'.join(BUILDERS)} file instead"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(
                f"{path} holds a DatasetDict without a 'train' split; its splits are {list(loaded)}"
            )
        return loaded["train"]
    return loaded


def _text(value: Any) -> str:
    return "" if value is None else str(value)
