"""One array per message (`fedllm.model.packing`): exact round trips through Flower's
serialisation, far fewer Flower objects per message, untouched content without the marker, the
ClientApp mod, and layouts that lie rejected with a reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedllm.deploy.local_grid import server_identity, wire
from fedllm.model.packing import BYTES, LAYOUT, PACKED, PackingError, is_packed, mod, pack, unpack


def content() -> RecordDict:
    """An update of 40 small arrays (mixed dtypes and shapes, one empty) with metrics."""
    g = torch.Generator().manual_seed(0)
    update = {f"layer{i}.lora_A": torch.randn(2, 3 + i, generator=g) for i in range(20)}
    update |= {f"layer{i}.lora_B": torch.randn(5, 2, generator=g) for i in range(19)}
    update["empty"] = torch.zeros(0, 4)
    kept = ArrayRecord([np.arange(7, dtype=np.int64), np.ones((2, 2), dtype=np.float16)])
    return RecordDict(
        {
            "update": ArrayRecord(update),
            "kept": kept,
            "metrics": MetricRecord({"rank": 2, "train-loss": 1.5}),
            "config": ConfigRecord({"note": "kept as is"}),
        }
    )


def same_arrays(a: RecordDict, b: RecordDict) -> None:
    assert list(a.array_records) == list(b.array_records)
    for name, record in a.array_records.items():
        other = b[name]
        assert list(record.keys()) == list(other.keys()), name
        for key, array in record.items():
            theirs = other[key]
            assert (array.dtype, array.shape, array.stype) == (
                theirs.dtype,
                theirs.shape,
                theirs.stype,
            )
            assert array.data == theirs.data, (name, key)


def test_pack_then_unpack_gives_back_every_array_exactly() -> None:
    original = content()
    packed = pack(original)
    assert is_packed(packed) and set(packed.array_records) == {PACKED}
    assert list(packed[PACKED].keys()) == [BYTES]
    assert dict(packed["metrics"]) == dict(original["metrics"])
    back = unpack(packed)
    same_arrays(original, back)
    assert dict(back["config"]) == {"note": "kept as is"}
    torch.testing.assert_close(
        back["update"].to_torch_state_dict()["layer3.lora_A"],
        original["update"].to_torch_state_dict()["layer3.lora_A"],
    )
    assert set(original.array_records) == {"update", "kept"}, "pack does not change its input"


def test_a_packed_message_survives_flowers_serialisation() -> None:
    with server_identity(1):
        msg = Message(pack(content()), dst_node_id=7, message_type=MessageType.TRAIN)
    same_arrays(content(), unpack(wire(msg).content))


def test_a_packed_message_is_a_handful_of_flower_objects() -> None:
    with server_identity(1):
        plain = Message(content(), dst_node_id=7, message_type=MessageType.TRAIN)
        packed = Message(pack(content()), dst_node_id=7, message_type=MessageType.TRAIN)
    n_plain, n_packed = len(get_all_nested_objects(plain)), len(get_all_nested_objects(packed))
    assert n_plain > 80, n_plain  # each of the 42 arrays an object, plus its chunk
    assert n_packed <= 8, n_packed  # message, dict, one record, one array, a chunk, 3 records


def test_content_without_arrays_or_marker_passes_through() -> None:
    metrics_only = RecordDict({"metrics": MetricRecord({"x": 1.0})})
    assert pack(metrics_only) is metrics_only
    plain = content()
    assert unpack(plain) is plain


def layout_of(packed: RecordDict) -> list:
    return json.loads(packed[LAYOUT]["arrays"])


def with_layout(packed: RecordDict, layout: object) -> RecordDict:
    text = layout if isinstance(layout, str) else json.dumps(layout)
    return RecordDict({**packed, LAYOUT: ConfigRecord({"arrays": text})})


def lie_about_size(layout: list) -> list:
    layout[3][5] += 4
    return layout


def negative_size(layout: list) -> list:
    layout[0][5], layout[1][5] = -1, layout[1][5] + layout[0][5] + 1
    return layout


def duplicate(layout: list) -> list:
    layout[1][1] = layout[0][1]
    return layout


def clash(layout: list) -> list:
    layout[0][0] = "metrics"
    return layout


def bad_shape(layout: list) -> list:
    layout[0][3] = [2, "3"]
    return layout


def short_entry(layout: list) -> list:
    layout[0] = layout[0][:5]
    return layout


def empty_name(layout: list) -> list:
    layout[0][1] = ""
    return layout


LIES = {
    "sizes that do not add up": (lie_about_size, "bytes"),
    "a negative size": (negative_size, "non-negative"),
    "an array twice": (duplicate, "twice"),
    "a record that clashes": (clash, "clashes"),
    "a shape with a string": (bad_shape, "entry 0"),
    "an entry of five fields": (short_entry, "entry 0"),
    "an empty key": (empty_name, "non-empty"),
}


@pytest.mark.parametrize("name", sorted(LIES))
def test_a_layout_that_lies_is_refused_with_a_reason(name: str) -> None:
    change, words = LIES[name]
    packed = pack(content())
    with pytest.raises(PackingError, match=words):
        unpack(with_layout(packed, change(layout_of(packed))))


@pytest.mark.parametrize(
    ("layout", "words"),
    [("not json {", "not JSON"), ({"a": 1}, "list"), ("[]", "describes 0 bytes")],
)
def test_a_layout_that_is_not_a_list_of_entries_is_refused(layout: object, words: str) -> None:
    with pytest.raises(PackingError, match=words):
        unpack(with_layout(pack(content()), layout))


def test_packed_bytes_that_are_not_one_array_are_refused() -> None:
    packed = pack(content())
    two = ArrayRecord({BYTES: packed[PACKED][BYTES], "more": Array(np.zeros(1))}, keep_input=True)
    with pytest.raises(PackingError, match="one array"):
        unpack(RecordDict({**packed, PACKED: two}))
    with pytest.raises(PackingError, match="one array"):
        unpack(RecordDict({**packed, PACKED: ConfigRecord({"x": 1})}))


def test_the_mod_unpacks_what_arrives_and_packs_the_reply() -> None:
    seen: list[RecordDict] = []

    def app(msg: Message, context: Context) -> Message:
        seen.append(msg.content)
        return Message(content(), reply_to=msg)

    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    with server_identity(1):
        msg = wire(Message(pack(content()), dst_node_id=7, message_type=MessageType.TRAIN))
    reply = mod(msg, ctx, app)
    assert not is_packed(seen[0]) and "update" in seen[0]
    assert is_packed(reply.content)
    same_arrays(content(), unpack(reply.content))

    with server_identity(1):  # a sender that does not pack gets a reply it can read
        plain = wire(Message(content(), dst_node_id=7, message_type=MessageType.TRAIN))
    assert not is_packed(mod(plain, ctx, app).content)
