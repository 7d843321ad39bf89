"""Client-level DP (`privacy.mode: client`, DP-FedAvg): each update's factor delta is clipped to
S, the mean gets Gaussian noise zS/m (at the server, or each client's share at the client), and
the recipe's aggregator post-processes the release (`fedllm.privacy.client_dp` has the math).
One Gaussian step per round is charged at q = 1 (clients are drawn from a public seed and who
took part is public, so no amplification by sampling) and the release's effective z.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedllm.aggregators.base import Factors
from fedllm.aggregators.registry import get, round_spec
from fedllm.features.base import Feature
from fedllm.features.registry import register
from fedllm.features.types import ClientRound, ClientUpdate, RoundResult
from fedllm.privacy.accounting import FEDERATION
from fedllm.privacy.budget import PUBLIC_KEYS, Account
from fedllm.privacy.client_dp import ClientLevelDP, privatize_locally
from fedllm.privacy.plan import (
    DELTA_FACTOR,
    client_level_round,
    client_noise_multiplier,
    planned_clients,
)
from fedllm.recipe.schema import RunConfig


@register
class ClientLevel(Feature):
    """Clip, average and noise the accepted updates before the aggregator sees them."""

    name = "client_dp"
    privacy_mode = "client"
    state_key = "privacy"
    screen_relative = False  # one client's presence must not get another's update rejected
    order = 25  # its client noise comes before any rank cut (HetLoRA)

    def sent_start(self) -> bool:
        return True  # the server clips each update's change from its own global

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Uniform weights, fixed local steps, adapter-state rounds and δ below 1/clients."""
        if not cls.enabled(cfg):
            return
        if cfg.privacy.client_noise_multiplier is None:
            try:
                client_noise_multiplier(cfg)  # a target ε no noise can meet fails here, not later
            except ValueError as err:
                raise ValueError(f"privacy.target_epsilon: {err}") from None
        if cfg.aggregator.weighting != "uniform":
            raise ValueError(
                "privacy.mode='client' needs aggregator.weighting='uniform': example-count "
                "weights reveal each client's data size and break the S/m sensitivity bound"
            )
        if cfg.federation.local_epochs is not None:
            raise ValueError(
                "privacy.mode='client' needs federation.local_steps, not local_epochs: with "
                "epochs a client's step count is ceil(epochs·n/batch), and its reply's 'steps' "
                "would reveal its data size n, which client-level DP protects"
            )
        spec = round_spec(cfg.aggregator.name)
        if spec.merge or spec.local_B:
            raise ValueError(
                f"privacy.mode='client' cannot wrap aggregator.name={cfg.aggregator.name!r}: "
                "it needs clients that send their whole adapter (not a merged or A-only update)"
            )
        n = cfg.data.num_clients
        if cfg.privacy.delta > DELTA_FACTOR / n:
            raise ValueError(
                f"privacy.delta={cfg.privacy.delta:g} must be below 1/data.num_clients = 1/{n} "
                f"by a factor of {1 / DELTA_FACTOR:g} or more (privacy.delta <= "
                f"{DELTA_FACTOR / n:.1e}) for client-level DP: a client is the unit of privacy, "
                "and near 1/n a mechanism that publishes one whole client's update would pass"
            )

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        p = cfg.privacy
        self.z = client_noise_multiplier(cfg)
        self.round_charge = client_level_round(cfg)  # (seen z, q = 1, 1 step) a round
        self.freeze_a = round_spec(cfg.aggregator.name).freeze_A
        self.dp = ClientLevelDP(
            get(cfg.aggregator.name),
            clip=p.client_clip,
            noise_multiplier=self.z,
            noise_at=p.noise_at,
            expected_clients=planned_clients(cfg),
            freeze_a=self.freeze_a,
        )
        self.account = Account.for_recipe(cfg)
        self.dp_metrics: dict[str, int | float] = {}

    # -- client --------------------------------------------------------------------------------
    def post_process(self, update: ClientUpdate, rnd: ClientRound) -> ClientUpdate:
        """noise_at=client: clip this client's delta to S and add its share of the noise."""
        p = self.cfg.privacy
        if p.noise_at != "client":
            return update
        if not update.start:
            raise ValueError("client-level DP needs the global factors this client started from")
        noisy, norm = privatize_locally(
            update.factors,
            update.start,
            clip=p.client_clip,
            noise_multiplier=self.z,
            clients=planned_clients(self.cfg),
            freeze_a=self.freeze_a,
        )
        self.dp_metrics = {"dp-update-norm": norm, "dp-clipped": float(norm > p.client_clip)}
        return ClientUpdate(noisy, update.start, update.rank)

    def metrics(self) -> dict[str, int | float]:
        return dict(self.dp_metrics)

    def reply_keys(self) -> frozenset[str] | None:
        """Client-level DP covers the whole update; the client's losses, data size, update
        norm and timing stay on it."""
        return PUBLIC_KEYS

    # -- server --------------------------------------------------------------------------------
    def before_round(
        self, server_round: int, *, partitions: Sequence[int], sampled: int
    ) -> str | None:
        """Stop when this round's charge would pass `privacy.epsilon_budget`; the charge is kept as
        pending (`lost_round`)."""
        return self.account.stop(server_round, {FEDERATION: self.round_charge})

    def lost_round(self, server_round: int, *, partitions: Sequence[int], sampled: int) -> None:
        """Charge the lost round as a finished one (its updates may have reached the server), at
        the noise planned for it before its clients trained."""
        if not self.account.charge_pending():  # a checkpoint from before the plan was kept
            self._charge_one_round()

    @property
    def seen_z(self) -> float:
        """The noise multiplier the server sees of one update (`seen_noise_multiplier`)."""
        return self.round_charge[0]

    def _charge_one_round(self) -> None:
        """One round at `client_level_round`: the noise the server sees of one update."""
        sigma, q, steps = self.round_charge
        self.account.ledger.record(FEDERATION, noise_multiplier=sigma, sample_rate=q, steps=steps)

    def release(
        self,
        nodes: Sequence[int],
        inputs: list[dict[str, Factors]],
        *,
        weights: list[float],
        global_: Mapping[str, Factors],
    ) -> tuple[list[dict[str, Factors]], list[float]]:
        """One pseudo-update: global + mean of clipped deltas + noise (DP-FedAvg)."""
        return [self.dp.release(global_, inputs)], [1.0]

    def record(self, result: RoundResult, *, server_row: dict[str, Any]) -> None:
        """Charge the round's release (nothing released under noise_at=client, yet updates seen:
        one update's noise) to the ledger, and put ε into every row and the server row."""
        ledger, release = self.account.ledger, self.dp.take()
        if release is not None:
            ledger.record(
                FEDERATION,
                noise_multiplier=release.effective_noise_multiplier,
                sample_rate=1.0,  # the sampled clients are public: no amplification
                steps=1,
            )
        elif self.cfg.privacy.noise_at == "client" and any(
            r.status != "failed" for r in result.rows
        ):
            # nothing released, but each client's own noised update reached the server (every
            # reply rejected): what the server saw is charged at the noise of one update
            self._charge_one_round()
        for row in result.rows:
            row.fields["epsilon"] = ledger.epsilon(FEDERATION)
        self.account.annotate(server_row)
        if release is not None:  # no norms: raw update norms are outside the guarantee
            server_row.update(
                dp_clients=release.clients,
                dp_noise_std=release.noise_std,
                dp_noise_multiplier=release.effective_noise_multiplier,
            )

    def progress(self) -> str:
        return self.account.progress()

    def state_dict(self) -> dict[str, Any]:
        return self.account.state_dict()

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        self.account.load_state_dict(state)
