"""Members and non-members for membership inference, drawn so that only membership differs.

Non-members are a client's own held-out examples; members are its training examples (canaries
excluded) matched to them: for each non-member, `per_non_member` members with the same domain
(the example's label) and the nearest length (scored tokens). Members and non-members then have
the same domain mix, client mix and nearly the same length distribution, so a model that never
saw the data (the base control) cannot tell them apart except by chance. A non-member whose
domain has too few unused members left is dropped, and counted. So is an example with no scored
token, whose every score would be NaN (the formatters keep at least one response token, so this
takes items made otherwise): a non-member takes its matched set with it, a member goes alone.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MatchedSample:
    """Indices into the member pool and the non-member list, and what could not be matched."""

    members: list[int]  # k per kept non-member, grouped in the order of `non_members`
    non_members: list[int]  # kept non-members, ascending
    dropped: int  # non-members without k unused members of their domain
    sets: list[int]  # per member: its non-member's position in `non_members` (its matched set)
    unscored_members: int = 0  # members dropped for having no scored token
    unscored_non_members: int = 0  # non-members dropped so, each with its matched set


def matched_sample(
    member_domains: Sequence[str],
    member_lengths: Sequence[int],
    *,
    non_member_domains: Sequence[str],
    non_member_lengths: Sequence[int],
    per_non_member: int,
    seed: int,
) -> MatchedSample:
    """Pick `per_non_member` members per non-member: same domain, nearest length, no reuse.

    Non-members are visited in a seeded random order and take their nearest unused members
    (ties broken by a seeded random rank), so no non-member is favoured by its position.
    """
    if per_non_member < 1:
        raise ValueError(f"per_non_member must be >= 1, got {per_non_member}")
    if len(member_domains) != len(member_lengths):
        raise ValueError("member_domains and member_lengths must describe the same examples")
    if len(non_member_domains) != len(non_member_lengths):
        raise ValueError(
            "non_member_domains and non_member_lengths must describe the same examples"
        )
    rng = random.Random(f"fedllm-mia-match:{seed}")
    tiebreak = rng.sample(range(len(member_domains)), len(member_domains))
    pool: dict[str, list[int]] = defaultdict(list)
    for i, domain in enumerate(member_domains):
        pool[domain].append(i)
    chosen: dict[int, list[int]] = {}
    dropped = 0
    for j in rng.sample(range(len(non_member_domains)), len(non_member_domains)):
        free = pool[non_member_domains[j]]
        if len(free) < per_non_member:
            dropped += 1
            continue
        length = non_member_lengths[j]
        free.sort(key=lambda i: (abs(member_lengths[i] - length), tiebreak[i]))
        chosen[j] = free[:per_non_member]
        del free[:per_non_member]
    kept = sorted(chosen)
    return MatchedSample(
        members=[i for j in kept for i in chosen[j]],
        non_members=kept,
        dropped=dropped,
        sets=[pos for pos, j in enumerate(kept) for _ in chosen[j]],
    )


def drop_unscored(
    sample: MatchedSample, *, member_tokens: Sequence[int], non_member_tokens: Sequence[int]
) -> MatchedSample:
    """`sample` without the examples that have no scored token, whose scores would be NaN.

    A non-member goes with its whole matched set (its members are not counted as unscored); a
    member goes alone, its set keeping the others. Token counts are indexed as the member pool
    and the non-member list passed to `matched_sample`.
    """
    keep = [j for j in sample.non_members if non_member_tokens[j] > 0]
    position = {j: pos for pos, j in enumerate(keep)}
    members, sets, unscored = [], [], 0
    for i, pos in zip(sample.members, sample.sets, strict=True):
        j = sample.non_members[pos]
        if j not in position:
            continue  # its non-member went: the whole set goes
        if member_tokens[i] <= 0:
            unscored += 1
            continue
        members.append(i)
        sets.append(position[j])
    return replace(
        sample,
        members=members,
        non_members=keep,
        sets=sets,
        unscored_members=sample.unscored_members + unscored,
        unscored_non_members=sample.unscored_non_members + len(sample.non_members) - len(keep),
    )


def subsample(indices: Sequence[int], *, limit: int | None, seed: int) -> list[int]:
    """At most `limit` of `indices` (seeded, order kept); all of them when limit is None."""
    if limit is None or limit >= len(indices):
        return list(indices)
    keep = sorted(random.Random(f"fedllm-mia-subsample:{seed}").sample(range(len(indices)), limit))
    return [indices[k] for k in keep]
