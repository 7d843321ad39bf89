"""fedllm/server/seats.py: nodes seated by the partition they claim, so that a resumed run whose
nodes have new ids (Flower's simulation gives them new ones) samples and evaluates the same
clients, and what the server kept per node id follows the partition."""

from __future__ import annotations

from flwr.app import Context, RecordDict

from fedllm.client.app import make_client_app
from fedllm.constrained.adaptive import Adaptive
from fedllm.constrained.bandit import Arm, ArmBandit
from fedllm.deploy.local_grid import LocalGrid, server_identity
from fedllm.features import registry
from fedllm.features.types import TrainReply
from fedllm.recipe import RunConfig, build_config
from fedllm.server import seats
from fedllm.server.strategy import LoraStrategy

SHAPES = {"q": (6, 4), "v": (4, 4)}


def recipe(**federation: object) -> RunConfig:
    return build_config(
        {
            "data": {"num_clients": 6},
            "lora": {"ranks": 2},
            "federation": {"clients_per_round": 3, "evaluate_clients": 2, **federation},
        }
    )


def grid_with_ids(cfg: RunConfig, ids: list[int]) -> LocalGrid:
    """A LocalGrid whose node i (partition i) has id ids[i]: a resumed simulation's new ids."""
    grid = LocalGrid(make_client_app(cfg), cfg.data.num_clients)
    contexts = list(grid.contexts.values())
    grid.contexts = {
        new: Context(
            run_id=c.run_id,
            node_id=new,
            node_config=c.node_config,
            state=RecordDict(),
            run_config={},
        )
        for new, c in zip(ids, contexts, strict=True)
    }
    return grid


def partitions(grid: LocalGrid, nodes: list[int]) -> list[int]:
    return sorted(int(grid.contexts[n].node_config["partition-id"]) for n in nodes)


def test_a_node_is_seated_by_a_partition_it_alone_claims() -> None:
    got = seats.seats([5, 6, 7, 8], {5: 0, 6: 1, 7: 1})
    assert got == {5: (0, 0), 6: (1, 6), 7: (1, 7), 8: (1, 8)}  # 6 and 7 both claim 1


def test_renumbering_moves_only_unambiguous_partitions() -> None:
    old = {1001: 0, 1002: 1, 1003: 1, 1004: 2, 1005: 3}  # 1002/1003 both trained as 1
    claims = {7: 0, 8: 1, 9: 2, 10: 2, 1005: 3}  # 9/10 both claim 2; 1005 kept its id
    assert seats.renumbering(old, claims) == {1001: 7}


def test_carried_ids_are_renamed_and_take_in_lone_claims_of_unheld_partitions() -> None:
    known = {1001: 0, 1002: 1}  # 1001 moved to 7; 1002 not claimed now, keeps its id
    claims = {7: 0, 8: 2, 9: 3, 10: 3, 11: 1}  # 9/10 both claim 3; 11 claims 1002's partition
    assert seats.carried(known, claims=claims, moved={1001: 7}) == {7: 0, 1002: 1, 8: 2}


def test_an_accepted_reply_makes_its_node_the_partitions_one_id() -> None:
    assert seats.seated({1001: 0, 1002: 1}, node=70, partition=0) == {1002: 1, 70: 0}
    assert seats.seated({70: 0}, node=70, partition=0) == {70: 0}


def test_the_query_is_answered_by_the_client_app_with_its_partition() -> None:
    cfg = recipe()
    grid = grid_with_ids(cfg, [40, 41, 42, 43, 44, 45])
    grid.contexts[45] = Context(
        run_id=1, node_id=45, node_config={}, state=RecordDict(), run_config={}
    )  # a node that cannot say (no partition-id): an error reply, no claim, seated by its id
    with server_identity(1):
        replies = list(grid.send_and_receive([seats.query(n) for n in grid.get_node_ids()]))
    assert [m.has_error() for m in replies] == [False] * 5 + [True]
    assert seats.read_claims(replies, num_clients=6) == {40: 0, 41: 1, 42: 2, 43: 3, 44: 4}
    # a claim outside the recipe's partitions is none (a node must not pick any seat it likes)
    assert seats.read_claims(replies, num_clients=3) == {40: 0, 41: 1, 42: 2}


def test_a_resumed_run_with_new_node_ids_samples_and_evaluates_the_same_clients() -> None:
    """The audit's case: with sampling over node ids, round 3 trained partitions {0, 5, 6} in
    the first run and {0, 2, 7} after a resume. Seated by partition, ids do not matter."""
    cfg = recipe()
    first = grid_with_ids(cfg, [1001, 1002, 1003, 1004, 1005, 1006])
    again = grid_with_ids(cfg, [9_000_017, 55, 7_777, 3, 123_456, 42])
    picks = []
    for grid in (first, again):
        s = LoraStrategy(cfg, shapes=SHAPES, features=registry.build(cfg))
        with server_identity(1):
            train = {r: partitions(grid, s.sample(r, grid)) for r in range(1, 6)}
            panel = [
                m.metadata.dst_node_id
                for m in s.configure_evaluate(1, s.global_record(), None, grid)
            ]
        picks.append((train, partitions(grid, panel)))
        assert s.sample(3, grid) == s.sample(3, grid), "a round's sample is drawn once"
    assert picks[0] == picks[1]
    assert all(len(p) == 3 for p in picks[0][0].values()) and len(picks[0][1]) == 2


def adaptive_strategy() -> LoraStrategy:
    cfg = build_config(
        {
            "data": {"num_clients": 6},
            "lora": {"ranks": 2},
            "adaptive": {"ranks": [1, 2], "pruning": [0.0], "time_weight": 1.0},
        }
    )
    return LoraStrategy(cfg, shapes=SHAPES, features=registry.build(cfg))


def checkpoint_of_nodes(ids: dict[int, int]) -> dict:
    """A checkpoint whose nodes (id -> partition) trained, the bandit having learned node
    ids[0]'s best arm (rank 1)."""
    s = adaptive_strategy()
    state = s.state_dict()
    state["node_partitions"] = dict(ids)
    (bandit,) = [f for f in s.features if isinstance(f, Adaptive)]
    first = str(next(iter(ids)))
    bandit.bandit.update(first, bandit.bandit.arms[0], reward=5.0)
    bandit.bandit.update(first, bandit.bandit.arms[1], reward=0.1)
    return {"strategy": state, "adaptive": bandit.state_dict()}


def resumed(checkpoint: dict, grid: LocalGrid) -> tuple[LoraStrategy, Adaptive]:
    s = adaptive_strategy()
    s.load_state_dict(checkpoint["strategy"])
    (bandit,) = [f for f in s.features if isinstance(f, Adaptive)]
    bandit.load_state_dict(checkpoint["adaptive"])
    with server_identity(1):
        s.introduce(grid)
    return s, bandit


def test_a_resumed_simulation_moves_the_bandits_counts_not_the_trained_partitions() -> None:
    """Every node has a new id: the bandit's counts follow the partition's claim to it, but the
    partition a node trained as (which vouches for its replies) waits for its own training."""
    checkpoint = checkpoint_of_nodes({1001: 0, 1002: 1})
    cfg = adaptive_strategy().cfg
    s, bandit = resumed(checkpoint, grid_with_ids(cfg, [70, 71, 72, 73, 74, 75]))
    assert s.claims == {70 + p: p for p in range(6)}
    assert s.node_partitions == {1001: 0, 1002: 1}, "no claim binds a partition"
    assert bandit.bandit.counts == {"70": [1, 1]} and bandit.bandit.best("70").rank == 1


def test_with_ids_that_persist_nothing_moves_whatever_is_claimed() -> None:
    """A deployment whose nodes kept their ids: a node claiming a connected node's partition
    takes nothing of its state, and both are seated by id."""
    checkpoint = checkpoint_of_nodes({1001: 0, 1002: 1})
    cfg = adaptive_strategy().cfg
    grid = grid_with_ids(cfg, [1001, 1002, 1003, 1004, 1005, 99])
    hostile = grid.contexts[99]
    grid.contexts[99] = Context(
        run_id=1,
        node_id=99,
        node_config={**hostile.node_config, "partition-id": 0},
        state=RecordDict(),
        run_config={},
    )
    s, bandit = resumed(checkpoint, grid)
    assert bandit.bandit.counts == {"1001": [1, 1]}
    assert seats.seats([1001, 99, 1002], s.claims) == {1001: (1, 1001), 99: (1, 99), 1002: (0, 1)}


def test_the_bandit_renames_a_client() -> None:
    bandit = ArmBandit([Arm(2, 0.0), Arm(4, 0.0)])
    bandit.update("1001", bandit.arms[1], reward=0.5)
    bandit.rename("1001", "70")
    assert bandit.counts == {"70": [0, 1]} and bandit.best("70") == Arm(4, 0.0)


def test_a_resumed_simulation_moves_the_ranks_its_downloads_are_cut_to() -> None:
    """h92: with the ranks left under the old ids, the first round after a resume sent every
    node the whole global (26,416 bytes each where 4,912-15,664 were due on the tiny recipe)."""
    checkpoint = checkpoint_of_nodes({1001: 0, 1002: 1})
    checkpoint["strategy"]["node_ranks"] = {1001: 2, 1002: 1}
    cfg = adaptive_strategy().cfg
    s, _ = resumed(checkpoint, grid_with_ids(cfg, [70, 71, 72, 73, 74, 75]))
    assert s.node_ranks == {70: 2, 71: 1}
    assert s.node_partitions == {1001: 0, 1002: 1}, "still learned from training only"


def reply_as(partition: int) -> TrainReply:
    return TrainReply(partition, 2, 10, 1.0, 2.0, 0.5, 5, 0.1, 100, 200)


def test_a_node_never_accepted_takes_its_bandit_state_through_a_resume() -> None:
    """h97's limit: only partitions of accepted replies moved, so a slow device that always
    missed started afresh after a resume, its memory-forbidden arms offered again. Its claim
    now carries its id into the checkpoint, and its state follows it to the new id."""
    cfg = adaptive_strategy().cfg
    first = adaptive_strategy()
    (bandit,) = [f for f in first.features if isinstance(f, Adaptive)]
    with server_identity(1):
        first.introduce(grid_with_ids(cfg, [1001, 1002, 1003, 1004, 1005, 1006]))
    first.remember(1001, reply_as(0))
    bandit.bandit.forbid("1002", bandit.bandit.arms[1])  # 1002 (partition 1) never answered
    checkpoint = {"strategy": first.state_dict(), "adaptive": bandit.state_dict()}
    s, moved = resumed(checkpoint, grid_with_ids(cfg, [70, 71, 72, 73, 74, 75]))
    assert moved.bandit.allowed("71") == [0], "the forbidden arm stays forbidden under 71"
    assert s.node_partitions == {1001: 0}, "a claim still binds no partition"


def test_a_second_resume_moves_the_state_again() -> None:
    """Each resume of a simulation gives new ids: the partition trained under 70 after the
    first one is carried under 70, not also under the first run's 1001 (two ids for one
    partition moved nothing before stop 48)."""
    cfg = adaptive_strategy().cfg
    checkpoint = checkpoint_of_nodes({1001: 0, 1002: 1})
    s, bandit = resumed(checkpoint, grid_with_ids(cfg, [70, 71, 72, 73, 74, 75]))
    s.remember(70, reply_as(0))
    bandit.bandit.update("70", bandit.bandit.arms[0], reward=5.0)
    again = {"strategy": s.state_dict(), "adaptive": bandit.state_dict()}
    _, moved = resumed(again, grid_with_ids(cfg, [80, 81, 82, 83, 84, 85]))
    assert moved.bandit.counts == {"80": [2, 1]}
