"""`TrainReply.parse`: a reply's metrics validated once, every bad key named (hand-made metrics)."""

from __future__ import annotations

import math

import pytest

from fedllm.features.types import CORE_KEYS, TrainReply

# every key `parse` requires, with the field it fills and whether that field is an integer
REQUIRED = {
    "partition-id": ("partition", int),
    "rank": ("rank", int),
    "num-examples": ("num_examples", int),
    "train-loss": ("train_loss", float),
    "train-loss-first": ("train_loss_first", float),
    "train-loss-last": ("train_loss_last", float),
    "steps": ("steps", int),
    "train-seconds": ("train_seconds", float),
    "bytes-sent": ("bytes_sent", int),
    "bytes-received": ("bytes_received", int),
}
INT_KEYS = [k for k, (_, kind) in REQUIRED.items() if kind is int]
FLOAT_KEYS = [k for k, (_, kind) in REQUIRED.items() if kind is float]
# keys with a lower bound of 0 (rank has 1; the three losses have none)
NON_NEGATIVE = ["partition-id", "num-examples", "steps", "train-seconds", "bytes-sent"]
NON_NEGATIVE += ["bytes-received", "pruning"]


def good(**changes: object) -> dict[str, object]:
    """Well-formed metrics of a rank-4 client on partition 2; `changes` replace or add keys."""
    metrics: dict[str, object] = {
        "partition-id": 2,
        "rank": 4,
        "num-examples": 120,
        "train-loss": 1.25,
        "train-loss-first": 2.5,
        "train-loss-last": 1.0,
        "steps": 15,
        "train-seconds": 3.5,
        "bytes-sent": 4096,
        "bytes-received": 8192,
        "pruning": 0.25,
        "scaling": 4.0,
    }
    metrics.update(changes)
    return metrics


def without(key: str) -> dict[str, object]:
    metrics = good()
    del metrics[key]
    return metrics


def test_required_table_matches_the_core_keys() -> None:
    # the core keys are the required ones plus the optional pruning and the ignored scaling
    assert set(CORE_KEYS) == {*REQUIRED, "pruning", "scaling"}


def test_good_metrics_parse_to_their_fields_with_extras_kept() -> None:
    metrics = good(**{"epsilon": 0.75, "hetlora-tail": 0.125, "dp-sigma": 1.1})
    reply = TrainReply.parse(metrics)
    assert reply == TrainReply(
        partition=2,
        rank=4,
        num_examples=120,
        train_loss=1.25,
        train_loss_first=2.5,
        train_loss_last=1.0,
        steps=15,
        train_seconds=3.5,
        bytes_sent=4096,
        bytes_received=8192,
        pruning=0.25,
        extra={"epsilon": 0.75, "hetlora-tail": 0.125, "dp-sigma": 1.1},
    )
    # `scaling` is a core key: the server derives α/r itself and never keeps the client's claim
    assert "scaling" not in reply.extra


def test_field_types_follow_the_field_not_the_metric() -> None:
    # Flower may carry integers as floats and floats as integers
    reply = TrainReply.parse(good(**{"rank": 3.0, "steps": 15.0, "train-loss": 2, "pruning": 0}))
    assert reply.rank == 3 and type(reply.rank) is int
    assert reply.steps == 15 and type(reply.steps) is int
    assert reply.train_loss == 2.0 and type(reply.train_loss) is float
    assert reply.pruning == 0.0 and type(reply.pruning) is float
    for name, kind in REQUIRED.values():
        assert type(getattr(reply, name)) is kind, name


def test_pruning_is_optional_and_defaults_to_zero() -> None:
    reply = TrainReply.parse(without("pruning"))
    assert reply.pruning == 0.0 and reply.extra == {}


def test_scaling_is_optional() -> None:
    assert TrainReply.parse(without("scaling")).rank == 4


# what a private reply may leave out (DP, SecAgg+): data size, losses, time
OPTIONAL = ["num-examples", "train-loss", "train-loss-first", "train-loss-last", "train-seconds"]


@pytest.mark.parametrize("key", [k for k in REQUIRED if k not in OPTIONAL])
def test_each_missing_required_key_is_named(key: str) -> None:
    with pytest.raises(ValueError, match=f"reply metrics lack '{key}'"):
        TrainReply.parse(without(key))


@pytest.mark.parametrize("key", OPTIONAL)
def test_keys_a_private_reply_leaves_out_parse_to_none(key: str) -> None:
    assert getattr(TrainReply.parse(without(key)), REQUIRED[key][0]) is None


def test_the_first_bad_key_is_named_when_several_are_bad() -> None:
    # fields are read in declaration order: partition-id before rank before train-loss
    metrics = without("train-loss")
    metrics["rank"] = "four"
    with pytest.raises(ValueError, match="'rank'"):
        TrainReply.parse(metrics)


@pytest.mark.parametrize("key", [*REQUIRED, "pruning"])
@pytest.mark.parametrize("value", ["3", None, True, False, [3], {"v": 3}], ids=repr)
def test_non_numbers_are_rejected_by_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"reply metric '{key}' must be a number"):
        TrainReply.parse(good(**{key: value}))


@pytest.mark.parametrize("key", [*FLOAT_KEYS, "pruning"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=repr)
def test_non_finite_floats_are_rejected_by_key(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"reply metric '{key}' must be finite"):
        TrainReply.parse(good(**{key: value}))


@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=repr)
def test_non_finite_values_of_integer_keys_are_rejected_by_key(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        TrainReply.parse(good(**{key: value}))


@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("value", [3.5, 0.001, 2.999])
def test_fractional_values_of_integer_keys_are_rejected(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"reply metric '{key}' must be an integer, got {value}"):
        TrainReply.parse(good(**{key: value}))


@pytest.mark.parametrize("key", NON_NEGATIVE)
@pytest.mark.parametrize("value", [-1, -0.5])
def test_negative_values_are_rejected(key: str, value: float) -> None:
    if key in INT_KEYS and value == -0.5:
        match = f"'{key}' must be an integer"  # not an integer before it is negative
    else:
        least = 1 if key == "num-examples" else 0  # a client that trained had examples
        match = f"reply metric '{key}' must be finite and >= {least}"
    with pytest.raises(ValueError, match=match):
        TrainReply.parse(good(**{key: value}))


@pytest.mark.parametrize("value", [0, -2, 0.0])
def test_rank_must_be_at_least_one(value: float) -> None:
    with pytest.raises(ValueError, match="reply metric 'rank' must be finite and >= 1"):
        TrainReply.parse(good(rank=value))


@pytest.mark.parametrize("key", ["partition-id", "steps", "bytes-sent"])
def test_zero_is_a_valid_count(key: str) -> None:
    name = REQUIRED[key][0]
    assert getattr(TrainReply.parse(good(**{key: 0})), name) == 0


def test_a_reply_with_no_training_examples_is_refused() -> None:
    """0 examples would be a zero weight, and all-zero weights abort the aggregation."""
    with pytest.raises(ValueError, match="reply metric 'num-examples' must be finite and >= 1"):
        TrainReply.parse(good(**{"num-examples": 0}))


def test_parse_does_not_modify_the_metrics() -> None:
    metrics = good(extra_key=1.5)
    before = dict(metrics)
    TrainReply.parse(metrics)
    assert metrics == before
