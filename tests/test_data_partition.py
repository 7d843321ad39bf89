"""Client partitions (iid, dirichlet, domain) and the held-out split: sizes, determinism, errors."""

from __future__ import annotations

from collections import Counter

import pytest

from fedllm.data import partition, split_held_out


def labelled(counts: dict[str, int]) -> list[dict[str, str]]:
    return [{"prompt": "", "response": "", "label": k} for k, n in counts.items() for _ in range(n)]


def assert_covers(clients: list[list[int]], n: int) -> None:
    flat = [i for client in clients for i in client]
    assert sorted(flat) == list(range(n))
    assert all(client == sorted(client) for client in clients)


def test_iid_is_an_even_shuffled_split() -> None:
    examples = labelled({"a": 10})
    clients = partition(examples, num_clients=3, method="iid", seed=0)
    assert [len(c) for c in clients] == [4, 3, 3]
    assert_covers(clients, 10)
    assert clients == partition(examples, num_clients=3, method="iid", seed=0)
    assert clients != partition(examples, num_clients=3, method="iid", seed=1)
    assert clients != [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert partition(examples, num_clients=1) == [list(range(10))]


def test_domain_assigns_whole_labels_largest_first_onto_smallest_client() -> None:
    # a=5 → client 0 (5,0); b=3 → 1 (5,3); c=2 → 1 (5,5); d=2 → 0 on the tie (7,5); e=1 → 1 (7,6)
    examples = labelled({"e": 1, "a": 5, "c": 2, "b": 3, "d": 2})
    clients = partition(examples, num_clients=2, method="domain")
    assert_covers(clients, 13)
    held = [{examples[i]["label"] for i in client} for client in clients]
    assert held == [{"a", "d"}, {"b", "c", "e"}]
    assert [len(c) for c in clients] == [7, 6]


def test_domain_never_shares_a_label_on_wordnet_like_sizes() -> None:
    examples = labelled({f"label{i}": 3 * i + 1 for i in range(12)})
    clients = partition(examples, num_clients=5, method="domain")
    owners: dict[str, set[int]] = {}
    for c, client in enumerate(clients):
        for i in client:
            owners.setdefault(examples[i]["label"], set()).add(c)
    assert all(len(o) == 1 for o in owners.values())
    sizes = [len(c) for c in clients]
    assert max(sizes) - min(sizes) <= 34  # at most the largest label apart


def test_domain_needs_as_many_labels_as_clients() -> None:
    with pytest.raises(ValueError, match=r"at least data.num_clients=3 distinct labels, found 2"):
        partition(labelled({"a": 5, "b": 5}), num_clients=3, method="domain")
    with pytest.raises(ValueError, match=r"found none \(no example has a label: set data\.label_"):
        partition(labelled({"": 10}), num_clients=2, method="domain")
    with pytest.raises(ValueError, match=r"only 2 examples \(at least 3 needed\); use fewer"):
        partition(labelled({"a": 5, "b": 2}), num_clients=2, method="domain", min_size=3)


def test_dirichlet_is_deterministic_and_non_iid_for_small_alpha() -> None:
    examples = labelled({"a": 100, "b": 100, "c": 100, "d": 100})
    skewed = partition(examples, num_clients=4, method="dirichlet", alpha=0.1, seed=3)
    assert skewed == partition(examples, num_clients=4, method="dirichlet", alpha=0.1, seed=3)
    assert skewed != partition(examples, num_clients=4, method="dirichlet", alpha=0.1, seed=4)
    assert_covers(skewed, 400)
    even = partition(examples, num_clients=4, method="dirichlet", alpha=1000.0, seed=3)

    def top_share(clients: list[list[int]]) -> float:
        """Mean over clients of the share of the client's most common label."""
        shares = [
            Counter(examples[i]["label"] for i in client).most_common(1)[0][1] / len(client)
            for client in clients
        ]
        return sum(shares) / len(shares)

    assert top_share(skewed) > 0.6
    assert top_share(even) < 0.35


def test_dirichlet_respects_min_size_or_says_what_to_change() -> None:
    examples = labelled({"a": 30, "b": 30})
    clients = partition(examples, num_clients=3, method="dirichlet", alpha=0.3, min_size=5)
    assert min(len(c) for c in clients) >= 5
    with pytest.raises(ValueError, match=r"raise data\.dirichlet_alpha, lower data\.num_clients"):
        partition(
            labelled({"a": 3, "b": 2}), num_clients=5, method="dirichlet", alpha=0.01, min_size=1
        )


@pytest.mark.parametrize(("label", "named"), [("", "none"), ("noun.food", "only 'noun.food'")])
def test_dirichlet_over_one_label_is_refused(label: str, named: str) -> None:
    # h110: a local file without data.label_field gave a "non-IID" split that was a random one
    with pytest.raises(ValueError, match=rf"one label \({named}\); set data\.label_field"):
        partition(labelled({label: 20}), num_clients=2, method="dirichlet")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, "num_clients must be an integer ≥ 1"),
        ({"num_clients": 2, "method": "random"}, r"method must be one of \['iid', 'dirichlet'"),
        ({"num_clients": 2, "alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"num_clients": 2, "alpha": -1.0, "method": "dirichlet"}, "alpha must be"),
        ({"num_clients": 2, "min_size": -1}, "min_size must be an integer ≥ 0"),
        (
            {"num_clients": 4, "min_size": 2},
            "7 examples cannot give each of data.num_clients=4 clients at least 2",
        ),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition(labelled({"a": 7}), **kwargs)  # type: ignore[arg-type]


def test_label_methods_need_labels() -> None:
    with pytest.raises(ValueError, match="example 1 has no 'label'"):
        partition([{"label": "a"}, {"prompt": "x"}], num_clients=1, method="dirichlet")


def test_split_held_out() -> None:
    indices = [3, 5, 8, 13, 21, 34, 55, 89, 144, 233]
    train, held = split_held_out(indices, fraction=0.2, seed=0)
    assert len(held) == 2 and len(train) == 8
    assert sorted(train + held) == indices and train == sorted(train) and held == sorted(held)
    assert (train, held) == split_held_out(indices, fraction=0.2, seed=0)
    assert split_held_out(indices, fraction=0.0, seed=0) == (indices, [])
    assert len(split_held_out(indices, fraction=0.25, seed=0)[1]) == 3  # 2.5 rounds up
    assert len(split_held_out(indices, fraction=0.01, seed=0)[1]) == 1  # at least one
    assert len(split_held_out(indices, fraction=0.99, seed=0)[0]) == 1  # never all
    assert split_held_out([7], fraction=0.5, seed=0) == ([7], [])
    assert split_held_out([], fraction=0.5, seed=0) == ([], [])


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_split_held_out_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"fraction must be a number in \[0, 1\)"):
        split_held_out(range(5), fraction=fraction, seed=0)
