"""What every recipe section shares: the `Strict` base (unknown keys refused, frozen, no boolean
for a number) and the field types and checks of more than one section.

A leaf module, so that `schema` and every `schema_*` section module import it and not each other.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo, field_validator

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
BasePrecision = Literal["none", "4bit", "8bit"]  # "4bit"/"8bit": bitsandbytes
# A dtype may be spelled either way in every field that takes one: torch's names (model.dtype,
# compression.dtype) or the short ones (federation.precision); the field keeps its own.
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _long_name(value: Any) -> Any:
    return DTYPE_NAMES.get(value, value) if isinstance(value, str) else value


def _short_name(value: Any) -> Any:
    short = {long: s for s, long in DTYPE_NAMES.items()}
    return short.get(value, value) if isinstance(value, str) else value


Dtype = Annotated[Literal["float32", "bfloat16", "float16"], BeforeValidator(_long_name)]
Precision = Annotated[Literal["fp32", "bf16", "auto"], BeforeValidator(_short_name)]


class Strict(BaseModel):
    """A recipe section: unknown keys are errors, values frozen after validation."""

    # inf passes `gt=0` (an endless epoch count, an infinite lr): numbers must be finite
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """`rounds: true` is a mistake, not 1 round: a number field takes no boolean (pydantic's
        lax mode would)."""
        ann = cls.model_fields[info.field_name].annotation
        forms = {ann, *typing.get_args(ann)}
        if isinstance(value, bool) and forms & {int, float} and bool not in forms:
            raise ValueError(f"expected a number, got a boolean ({str(value).lower()})")
        return value


def looks_like_path(value: str) -> bool:
    """True if `value` reads as a local path (/, ./, ../, ~, their Windows forms or a data file's
    suffix): such a value is never tried as a hub name or taken for a typo of a built-in source."""
    prefixes = ("/", "./", "../", "~", "\\", ".\\", "..\\")
    return value.startswith(prefixes) or Path(value).suffix.lower() in DATA_SUFFIXES


def must_exist(value: str, what: str) -> str:
    """`value`, unless it looks like a local path (`looks_like_path`) that does not exist: a hub
    name or a built-in source passes unchecked."""
    path = Path(value).expanduser()
    if looks_like_path(value) and not path.exists():
        where = (
            ""
            if path.is_absolute()
            else (
                f" in {Path.cwd()} (a relative path is taken from the current directory, not from "
                "the recipe's folder)"
            )
        )
        raise ValueError(f"{what} {value!r} does not exist{where}")
    return value
