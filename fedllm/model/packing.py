"""One array per message: a message's adapter tensors travel as one Flower Array.

Flower 1.41 stores and forwards every Array of a message as its own object: one HTTP request per
array (and per 5 MB chunk) at each hop, each a row in the SuperLink's database. A quickstart
adapter is ~240 small arrays, and that per-object work kept the SuperLink busy for most of a
deployed round (bench/results/deploy.md). `pack` moves every ArrayRecord of a message's content
into one ArrayRecord holding one byte Array, with the layout in a ConfigRecord; `unpack` gives
back the exact Arrays (dtype, shape, serialisation, bytes) and treats the layout as untrusted.

The server packs the messages it sends and unpacks every reply it reads; the ClientApp's
outermost mod (`mod`) unpacks a packed message and packs its reply. Content without the marker
passes through untouched either way, so SecAgg+'s own messages and a peer that does not pack
still work. Packing changes nothing a peer may send: the arrays inside are checked as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

PACKED = "fedllm.packed"  # the ArrayRecord holding the one byte Array
LAYOUT = "fedllm.packed-layout"  # ConfigRecord: "arrays" → JSON [[record, key, dtype, shape,
#                                   stype, nbytes], ...] in buffer order
BYTES = "bytes"  # the packed Array's key
CallNext = Callable[[Message, Context], Message]
MAX_ARRAYS = 100_000  # more arrays than any adapter has modules × factors


class PackingError(ValueError):
    """A packed message whose layout does not describe its bytes."""


def is_packed(content: RecordDict) -> bool:
    """Whether `content` carries packed arrays (the layout record)."""
    return LAYOUT in content


def pack(content: RecordDict) -> RecordDict:
    """`content` with all its ArrayRecords as one byte Array plus a layout (a new RecordDict;
    `content` is unchanged). Content without arrays comes back as it is."""
    records = content.array_records
    if not records:
        return content
    layout, chunks = [], []
    for name, record in records.items():
        for key, array in record.items():
            layout.append([name, key, array.dtype, list(array.shape), array.stype, len(array.data)])
            chunks.append(array.data)
    data = b"".join(chunks)
    packed = Array(dtype="uint8", shape=(len(data),), stype=BYTES, data=data)
    out = RecordDict({k: v for k, v in content.items() if k not in records})
    out[PACKED] = ArrayRecord(array_dict={BYTES: packed}, keep_input=True)
    out[LAYOUT] = ConfigRecord({"arrays": json.dumps(layout)})
    return out


def unpack(content: RecordDict) -> RecordDict:
    """`content` with the packed arrays back in their ArrayRecords (a new RecordDict);
    unpacked content comes back as it is. PackingError names what is wrong with a layout."""
    if not is_packed(content):
        return content
    entries = _layout(content)
    record = content.get(PACKED)
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [BYTES]:
        raise PackingError(f"'{PACKED}' must be an array record holding one array {BYTES!r}")
    data = record[BYTES].data
    if (described := sum(e[5] for e in entries)) != len(data):
        raise PackingError(f"the layout describes {described} bytes, the array holds {len(data)}")
    others = {k: v for k, v in content.items() if k not in (PACKED, LAYOUT)}
    arrays: dict[str, dict[str, Array]] = {}
    offset = 0
    for name, key, dtype, shape, stype, nbytes in entries:
        if name in others:
            raise PackingError(f"packed record {name!r} clashes with the message's own {name!r}")
        group = arrays.setdefault(name, {})
        if key in group:
            raise PackingError(f"array {key!r} of record {name!r} appears twice in the layout")
        chunk = data[offset : offset + nbytes]
        group[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=chunk)
        offset += nbytes
    out = RecordDict(others)
    for name, group in arrays.items():
        out[name] = ArrayRecord(array_dict=group, keep_input=True)
    return out


def _layout(content: RecordDict) -> list[tuple[str, str, str, list[int], str, int]]:
    """The layout's entries, each checked for types and ranges."""
    config = content[LAYOUT]
    raw = config.get("arrays") if isinstance(config, ConfigRecord) else None
    if not isinstance(raw, str):
        raise PackingError(f"'{LAYOUT}' must be a config record with a JSON string 'arrays'")
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as err:
        raise PackingError(f"'{LAYOUT}' is not JSON: {err}") from None
    if not isinstance(entries, list) or len(entries) > MAX_ARRAYS:
        raise PackingError(f"'{LAYOUT}' must be a list of at most {MAX_ARRAYS} arrays")
    out = []
    for i, e in enumerate(entries):
        ok = (
            isinstance(e, list)
            and len(e) == 6
            and all(isinstance(s, str) and s for s in (e[0], e[1], e[2], e[4]))
            and isinstance(e[3], list)
            and all(type(n) is int and n >= 0 for n in e[3])
            and type(e[5]) is int
            and e[5] >= 0
        )
        if not ok:
            raise PackingError(
                f"'{LAYOUT}' entry {i} must be [record, key, dtype, shape, stype, nbytes] with "
                f"non-empty names and non-negative integers, got {str(e)[:120]}"
            )
        out.append((e[0], e[1], e[2], e[3], e[4], e[5]))
    return out


def mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """ClientApp mod (outermost): a packed message reaches the app unpacked, and its reply
    leaves packed; an unpacked message and its reply pass through."""
    if not is_packed(msg.content):
        return call_next(msg, context)
    msg.content = unpack(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack(reply.content)
    return reply
