"""Split examples over federated clients (IID, Dirichlet label skew, or whole domains per client).

Every function returns sorted example indices and is deterministic for its `seed`.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

METHODS = ("iid", "dirichlet", "domain")
MAX_DIRICHLET_DRAWS = 1000


def partition(
    examples: Sequence[Mapping[str, Any]],
    *,
    num_clients: int,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> list[list[int]]:
    """The sorted example indices of each of `num_clients` clients; every example goes to one.

    iid: a shuffled even split. dirichlet: per label, client shares drawn from Dirichlet(alpha),
    redrawn until every client has `min_size`. domain: whole labels per client, balanced greedily
    (largest label onto the smallest client; `seed` is not needed).
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer ≥ 1, got {num_clients!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be an integer ≥ 0, got {min_size!r}")
    if len(examples) < num_clients * min_size:
        raise ValueError(
            f"{len(examples)} examples cannot give each of data.num_clients={num_clients} "
            f"clients at least {min_size} (that needs {num_clients * min_size}); use more "
            "examples (data.max_examples) or fewer data.num_clients"
        )
    if method == "iid":
        order = np.random.default_rng(seed).permutation(len(examples))
        return [sorted(part.tolist()) for part in np.array_split(order, num_clients)]
    labels = [_label(example, i) for i, example in enumerate(examples)]
    if method == "dirichlet":
        if len(set(labels)) == 1:  # a Dirichlet split of one label is a random size split
            which = "none" if labels[0] == "" else f"only {labels[0]!r}"
            raise ValueError(
                "data.partitioner='dirichlet' skews each label's share across clients, but the "
                f"examples have one label ({which}); set data.label_field to a label column, "
                "or use data.partitioner='iid'"
            )
        clients = _dirichlet(
            labels, num_clients=num_clients, alpha=alpha, seed=seed, min_size=min_size
        )
    else:
        clients = _domain(labels, num_clients=num_clients)
        smallest = min(len(c) for c in clients)
        if smallest < min_size:
            raise ValueError(
                f"data.partitioner='domain' gives a client only {smallest} examples (at least "
                f"{min_size} needed); use fewer data.num_clients, or data.partitioner='dirichlet' "
                "or 'iid'"
            )
    return [sorted(c) for c in clients]


def split_held_out(
    indices: Iterable[int], *, fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train, held_out), both sorted: fraction·n rounded half up held out, at least one when
    fraction > 0, but never every index (a single index stays in train)."""
    if not (isinstance(fraction, (int, float)) and 0 <= fraction < 1):
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    items = list(indices)
    n_held = math.floor(len(items) * fraction + 0.5)
    if fraction > 0:
        n_held = max(n_held, 1)
    n_held = min(n_held, max(len(items) - 1, 0))
    shuffled = random.Random(seed).sample(items, len(items))
    return sorted(shuffled[n_held:]), sorted(shuffled[:n_held])


def _label(example: Mapping[str, Any], index: int) -> str:
    if "label" not in example:
        raise ValueError(
            f"example {index} has no 'label' (keys: {sorted(example)}); "
            "label-based methods need one, or use method='iid'"
        )
    return str(example["label"])


def _dirichlet(
    labels: list[str], *, num_clients: int, alpha: float, seed: int, min_size: int
) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for _ in range(MAX_DIRICHLET_DRAWS):
        clients: list[list[int]] = [[] for _ in range(num_clients)]
        for label in sorted(by_label):
            members = rng.permutation(by_label[label])
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, part in zip(clients, np.split(members, cuts), strict=True):
                client.extend(part.tolist())
        if min(len(c) for c in clients) >= min_size:
            return clients
    raise ValueError(
        f"data.partitioner='dirichlet' (data.dirichlet_alpha={alpha}) left a client below "
        f"{min_size} examples in {MAX_DIRICHLET_DRAWS} draws; raise data.dirichlet_alpha, lower "
        "data.num_clients, or add examples (data.max_examples)"
    )


def _domain(labels: list[str], *, num_clients: int) -> list[list[int]]:
    counts = Counter(labels)
    if len(counts) < num_clients:
        found = f"{len(counts)} ({sorted(counts)[:10]})"
        if set(counts) == {""}:  # a local file read without data.label_field
            found = "none (no example has a label: set data.label_field to a label column)"
        raise ValueError(
            f"data.partitioner='domain' needs at least data.num_clients={num_clients} distinct "
            f"labels, found {found}; use fewer data.num_clients, or data.partitioner='iid' or "
            "'dirichlet'"
        )
    sizes = [0] * num_clients
    owner: dict[str, int] = {}
    for label in sorted(counts, key=lambda name: (-counts[name], name)):
        client = min(range(num_clients), key=lambda c: (sizes[c], c))
        owner[label] = client
        sizes[client] += counts[label]
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for i, label in enumerate(labels):
        clients[owner[label]].append(i)
    return clients


def hold_out_test(
    examples: Sequence[Mapping[str, Any]],
    *,
    fraction: float,
    labels: Iterable[str] = (),
    max_examples: int | None = None,
    seed: int = 0,
) -> tuple[list[int], list[int]]:
    """(test, rest), both sorted: a global test set drawn before any client gets its partition.

    From every label, `fraction` of its examples (rounded half up, at least one of any label with
    two or more), chosen by `seed`, plus every example of `labels` (domains no client holds: they
    are never in `rest`). With `max_examples`, a seeded subset of that many is kept; drawn
    examples left out go back to `rest`.
    """
    if not (isinstance(fraction, (int, float)) and 0 <= fraction < 1):
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or max_examples < 1):
        raise ValueError(f"max_examples must be a positive integer or None, got {max_examples!r}")
    by_label: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        by_label.setdefault(str(example.get("label", "")), []).append(i)
    whole = set(labels)
    unknown = sorted(whole - set(by_label))
    if unknown:
        raise ValueError(
            f"label(s) {unknown} are not in the data; its labels are {sorted(by_label)[:50]}"
        )
    rng = random.Random(seed)
    test: list[int] = []
    for label in sorted(by_label):
        members = by_label[label]
        if label in whole:
            test.extend(members)
            continue
        n = math.floor(len(members) * fraction + 0.5)
        if fraction > 0 and len(members) >= 2:
            n = max(n, 1)
        test.extend(rng.sample(members, n))
    if max_examples is not None and len(test) > max_examples:
        test = rng.sample(sorted(test), max_examples)
    excluded = set(test).union(*(by_label[label] for label in whole))
    return sorted(test), [i for i in range(len(examples)) if i not in excluded]
