"""Seats: a node's place in the round's sample and the evaluation panel, by the partition it says
it holds, so that a node that comes back under a new id keeps its place.

Flower's simulation gives a resumed run's nodes new ids (a SuperNode may come back under a new
one too): a sample or a panel drawn over node ids would then pick other clients than the run it
resumes, compare held-out losses of other panels across the resume, and orphan what the server
kept per node id (a bandit's counts, a pruned tier's map). Each node is asked once per server
process, with a query message, which partition it holds; a uniquely claimed partition is the
node's seat. When every node has a new id (a resumed simulation), what features kept under an
old id (the adaptive bandit's counts) moves to the node that claims its partition. The ids that
state is kept under (`carried`, `seated`) are checkpointed: a node's accepted partition, else
its lone claim, so a node that never had a reply accepted moves too, and so does every resume.

A claim is not proof: a hostile node can claim any partition. Two nodes claiming one partition
are both seated by node id, as a node that does not answer (an older client, an error, a late
answer); a claim never vouches for a training reply or an evaluation (the partition a node
trained as is learned from its accepted training replies, `fedllm.server.replies`). What a
claim can do: take a partition no connected node claims, and with it a seat (in the sample of
the rounds it picks, or on the panel, since the seed is in the recipe); with persistent ids a
checkpoint's state never moves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedllm.model.wire import PARTITION, WHO

Seat = tuple[int, int]  # (0, partition) for a claimed partition, (1, node id) otherwise


def query(node: int) -> Message:
    """The message asking `node` which partition it holds."""
    content = RecordDict({WHO: ConfigRecord({})})
    return Message(content, dst_node_id=node, message_type=MessageType.QUERY)


def read_claims(replies: Iterable[Message], *, num_clients: int) -> dict[int, int]:
    """node -> the partition its reply claims, one of the recipe's `num_clients` (an error, a
    malformed reply or another number claims none: a node must not pick any seat it likes)."""
    claims = {}
    for msg in replies:
        if msg.has_error():
            continue
        try:
            value = msg.content.config_records[WHO][PARTITION]
        except KeyError:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < num_clients:
            claims[msg.metadata.src_node_id] = value
    return claims


def seats(nodes: Iterable[int], claims: Mapping[int, int]) -> dict[int, Seat]:
    """node -> its seat: (0, partition) if it alone claims that partition, else (1, node)."""
    nodes = list(nodes)
    counts = Counter(claims[n] for n in nodes if n in claims)
    return {n: (0, claims[n]) if n in claims and counts[claims[n]] == 1 else (1, n) for n in nodes}


def renumbering(old: Mapping[int, int], claims: Mapping[int, int]) -> dict[int, int]:
    """old node id -> new node id, for partitions that one old id held (`old`: node -> the
    partition it trained as) and one new node alone claims now, where the ids differ."""
    held = Counter(old.values())
    claimed = Counter(claims.values())
    now = {p: n for n, p in claims.items() if claimed[p] == 1}
    return {n: now[p] for n, p in old.items() if held[p] == 1 and p in now and now[p] != n}


def carried(
    known: Mapping[int, int], *, claims: Mapping[int, int], moved: Mapping[int, int]
) -> dict[int, int]:
    """node -> partition of the ids that per-node state is kept under, after a process's
    introduction: the `known` ones renamed by `moved`, plus each partition one node alone
    claims that no known id holds (a node that never had a reply accepted, e.g. a slow device
    that always missed, so that its state follows it into the next resume too)."""
    out = {moved.get(n, n): p for n, p in known.items()}
    held, counts = set(out.values()), Counter(claims.values())
    out |= {n: p for n, p in claims.items() if counts[p] == 1 and p not in held and n not in out}
    return out


def seated(known: Mapping[int, int], *, node: int, partition: int) -> dict[int, int]:
    """`known` after `node`'s reply as `partition` was accepted: that node is the partition's
    one id (an older id of the partition, a resumed run's, holds no state of it any more)."""
    return {n: p for n, p in known.items() if p != partition and n != node} | {node: partition}
