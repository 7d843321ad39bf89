"""Personal tuning (FedAvg+FT): after the last round each client tunes the final global adapter
on its own data into an adapter it keeps, and says how much that helps on its held-out split.

At the final round's evaluation each client takes the global factors it has just scored (as the
other features personalise them), cut to its own rank (the best rank-r approximation of their
ΔW, `factored_svd`), trains them for one round of local steps (or `steps`) at the constant
learning rate `lr` with the recipe's optimiser, batch and precision, scores the result on the
same held-out split and writes it as a PEFT folder with a card in its own folder:
`<personal-dir>/tuned_adapter/`, else `<run_dir>/clients/<p>/tuned_adapter/`. The evaluation
reply adds `tuned-loss`: metrics.jsonl's eval rows get `tuned_loss` beside `held_out_loss`, the
final server row their token-weighted mean.

Why a small lr: bench/local_tuning.py tuned finished federations this way (scarce-lr regime,
3 seeds): at lr 0.001 the tuned adapter beat the global on each client's own domain (squeeze at
lr 0.01: −0.045 ± 0.010 nats; fedit −0.046 ± 0.023; svd −0.028 ± 0.028) and local-only training on
all 8 clients; at the federation's own lr 0.01 one round overfit ~94 examples (+0.418 ± 0.158).

Recipe: `features: {personal_tuning: {lr: 0.001}}`. Refused with aggregators that merge each
round into the base (flora), pruned tiers (tuning runs on the full base), features that shape
the adapter themselves (Fed-PLoRA, PreLort, SDFLoRA) and an evaluation panel that is not every
client (`federation.evaluate_clients: all`: the panel is who tunes). A client tunes at its node's
rank (node config `rank`, else the recipe's), not at a rank a feature planned for one round
(HetLoRA's pruned rank, the bandit's arm). The final evaluation then
takes one more round of local steps: `federation.round_timeout` must cover a training round plus
an evaluation (a client past it is missed, and its tuned adapter is still kept). In a private
run (DP-SGD, client-level DP, SecAgg+) the tuned adapter, trained on raw data without noise, is
kept only under a node's own personal-dir (never in the run directory) and its loss is not sent.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from fedllm.aggregators import Factors, round_spec
from fedllm.aggregators.linalg import factored_svd
from fedllm.client.round import client_seed, revive_generator
from fedllm.client.schedule import round_steps
from fedllm.client.train import evaluate_nll, train_local
from fedllm.constrained.pruned import planned_ranks
from fedllm.features.base import Feature, ReplyMetrics
from fedllm.features.node_state import NODE_KEY, client_dir
from fedllm.features.registry import active, register
from fedllm.features.types import ClientRound
from fedllm.model.adapters import adapter_holding, read_factors, revive_dead
from fedllm.model.base import cached_base_at
from fedllm.model.card import make_card, save_adapter
from fedllm.model.identity import IDENTITY_MEMO, base_identity
from fedllm.model.loading import scoring_mode

if TYPE_CHECKING:
    from fedllm.recipe.schema import RunConfig

log = logging.getLogger("fedllm.client")

NAME = "personal_tuning"
FOLDER = "tuned_adapter"
KEY = "tuned-loss"


class PersonalTuningOptions(BaseModel):
    """`features.personal_tuning`: the tuning round's constant lr and its steps."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    lr: float = Field(0.001, gt=0, allow_inf_nan=False, description="constant learning rate")
    steps: int | None = Field(
        None, gt=0, description="optimizer steps (default: one round's local steps)"
    )


def tuning_start(
    factors: Mapping[str, Factors], *, rank: int, scaling: float, seed: int
) -> dict[str, Factors]:
    """The tuning round's start: `cut_to_rank`, its dead components (zero-padded past a global
    of lower rank) given fresh A rows from the tuning round's `seed`, as a training round's
    start (`fedllm.client.round.revive`); ΔW is unchanged."""
    start, _ = revive_dead(
        cut_to_rank(factors, rank=rank, scaling=scaling), generator=revive_generator(seed)
    )
    return start


def cut_to_rank(factors: Mapping[str, Factors], *, rank: int, scaling: float) -> dict[str, Factors]:
    """Each module's ΔW at `rank` under `scaling`: the best rank-`rank` approximation when the
    factors hold more (a global need not be SVD-ordered), else the same ΔW zero-padded."""
    out: dict[str, Factors] = {}
    for module, f in factors.items():
        if f.rank <= rank:
            out[module] = f.truncate(rank, scaling)
            continue
        B, A = factored_svd([f.B.float()], [f.A.float()], weights=[f.scaling / scaling], rank=rank)
        out[module] = Factors(B, A, scaling)
    return out


@register
class PersonalTuning(Feature):
    """Each client tunes the final global into an adapter of its own (never sent)."""

    name = NAME
    Options = PersonalTuningOptions
    eval_metrics: ClassVar[ReplyMetrics] = {KEY: (float, 0.0)}

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Refuse what the tuning round cannot start from or would not reach every client."""
        if not cls.enabled(cfg):
            return
        where = f"features.{NAME}"
        if round_spec(cfg.aggregator.name).merge:
            raise ValueError(
                f"{where}: aggregator.name={cfg.aggregator.name!r} merges each round into the "
                "base, so the final global exists only inside the clients' rounds; use an "
                f"adapter-state aggregator or drop {NAME}"
            )
        if pruned := [who for who, _, q in planned_ranks(cfg) if q > 0]:
            raise ValueError(
                f"{where}: {pruned[0]} trains on a pruned base and tuning runs on the full one; "
                f"drop the pruning or {NAME}"
            )
        if shaped := [c.name for c in active(cfg) if c.own_adapter_shape]:
            raise ValueError(
                f"{where}: features.{shaped[0]} shapes the adapter itself, and a tuning round "
                f"would train another; drop one of them"
            )
        if cfg.federation.evaluate_clients != "all":
            raise ValueError(
                f"{where}: the clients tune at the final round's evaluation, so every client "
                f"must evaluate; set federation.evaluate_clients: all (it is "
                f"{cfg.federation.evaluate_clients!r})"
            )
        if cfg.privacy.private:
            log.warning(
                "%s: in a private run the tuned adapter is kept only by nodes started with "
                "`fedllm node --personal-dir <folder>` (never in the run directory; none in a "
                "simulation), and its loss is not sent",
                where,
            )

    def evaluated(self, factors: Mapping[str, Factors], rnd: ClientRound) -> dict[str, float]:
        """After the final round's evaluation: tune, score, keep; the tuned loss (not in a
        private run, nor anything written outside the node's personal-dir there)."""
        cfg, fed = rnd.cfg, rnd.cfg.federation
        if rnd.server_round != fed.rounds or not factors:
            return {}
        if cfg.privacy.private and not rnd.node_config.get(NODE_KEY):
            return {}
        opts = self.options
        rank = rnd.plan.rank
        seed = client_seed(cfg, server_round=fed.rounds + 1, partition=rnd.partition)
        start = tuning_start(factors, rank=rank, scaling=cfg.client_scaling(rank), seed=seed)
        base, tok = cached_base_at(cfg, rnd.plan.quantization, cache=rnd.cache)  # evaluation's
        examples = rnd.shard.train
        steps = opts.steps or round_steps(fed, len(examples))
        lora = {"dropout": cfg.lora.dropout, "target_modules": cfg.lora.target_modules}
        model = adapter_holding(base, start, **lora)
        try:
            model.train()
            train_local(
                model,
                examples,
                steps=steps,
                batch_size=fed.batch_size,
                pad_id=tok.pad_token_id,
                optimizer=fed.optimizer,
                lr=opts.lr,
                weight_decay=fed.weight_decay,
                accumulation=fed.gradient_accumulation_steps,
                gradient_checkpointing=fed.gradient_checkpointing,
                precision=fed.precision,
                share_head=fed.share_head,
                max_grad_norm=fed.max_grad_norm,
                seed=seed,
            )
            scoring_mode(model, quantized=cfg.model.quantization != "none")  # as evaluations
            nll, tokens = evaluate_nll(
                model,
                rnd.shard.held_out,
                batch_size=fed.eval_batch_size,
                pad_id=tok.pad_token_id,
                share_head=fed.share_head,
            )
            model.train()  # the shared base leaves as the evaluation leaves it
            tuned = {
                m: Factors(f.B.cpu(), f.A.cpu(), f.scaling) for m, f in read_factors(model).items()
            }
        finally:
            model.unload()
        loss = nll / max(tokens, 1)
        home = client_dir(cfg, rnd.partition, node_config=rnd.node_config)
        card = make_card(
            cfg,
            base_identity(cfg, memo=home / IDENTITY_MEMO),
            what="tuned",
            round=rnd.server_round,
            rank=rank,
            metrics={"held_out_loss": loss} if tokens else None,
            partition=rnd.partition,
            note=f"The final global adapter tuned by this client for {steps} steps at lr "
            f"{opts.lr:g} on its own data; never sent to the server.",
        )
        folder = save_adapter(home / FOLDER, tuned, card=card, **lora)
        log.info(
            "client %d: tuned the final global in %d steps at lr %g (held-out loss %s), in %s",
            rnd.partition,
            steps,
            opts.lr,
            f"{loss:.4f}" if tokens else "not measured: no held-out tokens",
            folder,
        )
        return {} if cfg.privacy.private or tokens == 0 else {KEY: loss}
