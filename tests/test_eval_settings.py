"""fedllm.eval.settings: bad eval settings are refused up front, naming the setting."""

import pytest

from fedllm.eval.settings import MIN_REFERENCES, EvalSettings


def test_too_few_references_are_refused_before_any_model_loads() -> None:
    # one reference secret passed and crashed the skew-normal fit after the models had loaded
    with pytest.raises(ValueError, match=r"--references: .* must be >= 10, got 1"):
        EvalSettings(references=1)
    assert EvalSettings(references=MIN_REFERENCES).references == MIN_REFERENCES
    assert EvalSettings().references is None  # the recipe's


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch_size", 0, "batch_size must be >= 1"),
        ("bootstrap", -1, "bootstrap must be >= 0"),
        ("confidence", 1.0, r"confidence must be in \(0, 1\)"),
        ("precision", "fp16", "precision must be one of"),
    ],
)
def test_each_bad_setting_is_named(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EvalSettings(**{key: value})
