"""Emulated devices (`devices:`): clients that differ in speed and memory, on one machine.

A device profile gives a client
- `threads`: the torch threads its local training may use (real: set around each training
  message, restored afterwards);
- `slowdown`: its local steps take `slowdown` times their measured time. EMULATION: after the
  real steps the client sleeps (slowdown - 1) x their measured seconds and reports the emulated
  time as `train-seconds` (what the bandit's reward and the deadline see). A client that can no
  longer make the round's deadline (`federation.round_timeout`, counted from when it got the
  message) stops waiting `LATE_MARGIN` seconds past it: its reply is late either way;
- `memory_mb`: its memory budget in MiB. Once the base it trains on is ready (pruned, quantized),
  the client estimates what the round needs (`training_memory`) and refuses a plan that does not
  fit, with `MEMORY_REFUSAL` in the error the server receives (the bandit then never offers that
  arm to this client again). Nothing limits the real process: the budget is an estimate against
  a number.

Profiles come from the recipe (`devices:`, partitions in order as in `lora.tiers`); a SuperNode's
node config keys `threads`, `slowdown` and `memory-mb` override its entry. Evaluation is not
slowed. On the server, a node asked to train that sent no reply in time (it missed the round's
deadline, see `fedllm.server.exchange`) gets a `missed` row in metrics.jsonl, and the round's row
counts them (`clients_missed`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import MetricRecord, RecordDict

from fedllm.client.node_config import DEVICE_KEYS
from fedllm.features.base import Feature
from fedllm.features.registry import register
from fedllm.features.types import ClientRound, ClientRow, Download, RoundResult, TrainReply
from fedllm.model.loading import module_shapes
from fedllm.recipe.schema import RunConfig
from fedllm.recipe.schema_constrained import DeviceProfile

MEMORY_REFUSAL = "does not fit this device's memory"  # in the error reply; the bandit reads it
LATE_MARGIN = 1.0  # seconds past the deadline at which a late client stops its emulated wait
MIB = 2**20


@dataclass(frozen=True)
class Device:
    """What one client emulates: torch threads (None: the process's), slowdown, memory (MiB)."""

    threads: int | None = None
    slowdown: float = 1.0
    memory_mb: float | None = None


def profile_of(cfg: RunConfig, partition: int) -> DeviceProfile | None:
    """The recipe's device profile of `partition` (None without `devices`)."""
    start = 0
    for profile in cfg.devices or []:
        if partition < start + profile.clients:
            return profile
        start += profile.clients
    return None


def _number(node_config: Mapping[str, Any], key: str, *, minimum: float, example: str) -> float:
    raw = node_config[key]
    try:
        value = math.nan if isinstance(raw, bool) else float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= minimum):
        raise ValueError(
            f"node config {key}={raw!r}: must be a number >= {minimum:g}, e.g. {key}={example}"
        )
    return value


def device_of(cfg: RunConfig, node_config: Mapping[str, Any]) -> Device | None:
    """This node's device: its recipe profile with its own node config keys on top (None: no
    profile and no keys). A malformed key names itself and what is valid."""
    pid = node_config.get("partition-id")
    profile = profile_of(cfg, int(pid)) if pid is not None else None
    if profile is None and not any(k in node_config for k in DEVICE_KEYS):
        return None
    threads, slowdown, memory = (
        (profile.threads, profile.slowdown, profile.memory_mb) if profile else (None, 1.0, None)
    )
    if "threads" in node_config:
        value = _number(node_config, "threads", minimum=1, example="2")
        if value != int(value):
            raw = node_config["threads"]
            raise ValueError(f"node config threads={raw!r}: must be a whole number, e.g. threads=2")
        threads = int(value)
    if "slowdown" in node_config:
        slowdown = _number(node_config, "slowdown", minimum=1, example="2.5")
    if "memory-mb" in node_config:
        memory = _number(node_config, "memory-mb", minimum=1e-9, example="1200")
    return Device(threads, slowdown, memory)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch threads (None: unchanged), then restore the count."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- memory ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training round needs: the base's weights as stored, the LoRA factors with their
    gradients and optimizer state, and the activations kept for the backward pass."""

    weights: int
    adapter: int
    activations: int

    @property
    def total(self) -> int:
        """All three parts, in bytes."""
        return self.weights + self.adapter + self.activations

    def describe(self) -> str:
        """The parts in MiB, for a message ('weights 250.0, LoRA + optimizer 1.2, activations
        80.5 MiB')."""
        parts = zip(("weights", "LoRA + optimizer", "activations"), self.parts, strict=True)
        return ", ".join(f"{name} {b / MIB:.1f}" for name, b in parts) + " MiB"

    @property
    def parts(self) -> tuple[int, int, int]:
        """(weights, adapter, activations), in bytes."""
        return self.weights, self.adapter, self.activations


def activation_bytes(
    *,
    tokens: int,
    length: int,
    hidden: int,
    layer_dims: list[tuple[int, int]],
    vocab: int,
    checkpointing: bool,
) -> int:
    """fp32 activations kept for backward over `tokens` = batch x `length` tokens.

    Per decoder layer and token: 6 x hidden (norms, residuals, attention input and output),
    4 x the MLP width (gate, up, activation, product) and 2 x query heads x length (attention
    scores and probabilities); `layer_dims` = [(MLP width, query heads)] per layer, as pruned.
    Plus the logits and their gradient (2 x vocab per token). With gradient checkpointing only
    each layer's input is kept, plus one layer recomputed at a time.
    """
    per_layer = [4 * tokens * (6 * hidden + 4 * i + 2 * a * length) for i, a in layer_dims]
    logits = 4 * tokens * vocab * 2
    if checkpointing:
        return 4 * tokens * hidden * len(layer_dims) + max(per_layer, default=0) + logits
    return sum(per_layer) + logits


def _layer_dims(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(MLP width, query heads) of every decoder layer (Llama-style: self_attn + mlp), as the
    modules are (pruned or not); the config's sizes for other layouts."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    dims = []
    for m in model.modules():
        attn, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
        q, up = getattr(attn, "q_proj", None), getattr(mlp, "up_proj", None)
        if q is not None and up is not None:
            dims.append((int(up.out_features), int(q.out_features) // head_dim))
    if not dims:
        dims = [(c.intermediate_size, c.num_attention_heads)] * c.num_hidden_layers
    return dims


def training_memory(
    model: torch.nn.Module,
    *,
    rank: int,
    target_modules: list[str],
    batch_size: int,
    length: int,
    optimizer: str = "adamw",
    checkpointing: bool = False,
) -> MemoryEstimate:
    """An estimate of the memory one round of LoRA training at `rank` needs on `model` (the
    base as the client trains it: pruned modules are smaller, 4-bit weights take half a byte)."""
    tensors = [*model.parameters(), *model.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    copies = 4 if optimizer == "adamw" else 2  # weight + gradient (+ AdamW's two moments)
    shapes = module_shapes(model, target_modules)
    adapter = sum(4 * copies * rank * (d + k) for d, k in shapes.values())
    c = model.config
    activations = activation_bytes(
        tokens=batch_size * length,
        length=length,
        hidden=c.hidden_size,
        layer_dims=_layer_dims(model),
        vocab=c.vocab_size,
        checkpointing=checkpointing,
    )
    return MemoryEstimate(weights, adapter, activations)


def round_memory(base: torch.nn.Module, rnd: ClientRound) -> MemoryEstimate:
    """`training_memory` of this round's plan on the base it trains on."""
    fed = rnd.cfg.federation
    return training_memory(
        base,
        rank=rnd.plan.rank,
        target_modules=rnd.cfg.lora.target_modules,
        batch_size=fed.batch_size,
        length=rnd.cfg.data.max_length,
        optimizer=fed.optimizer,
        checkpointing=fed.gradient_checkpointing,
    )


# -- slowdown ----------------------------------------------------------------------------------
def slowed(content: RecordDict, *, slowdown: float, elapsed: float, timeout: float) -> RecordDict:
    """Emulate a device `slowdown` times slower at its local steps: sleep the difference (never
    past `LATE_MARGIN` after `timeout` from the message's start, `elapsed` ago) and report the
    emulated `train-seconds`."""
    metrics = content["metrics"] if "metrics" in content else None
    measured = elapsed
    if metrics is not None and "train-seconds" in metrics:
        measured = float(metrics["train-seconds"])
    extra = (slowdown - 1) * measured
    time.sleep(max(0.0, min(extra, timeout + LATE_MARGIN - elapsed)))
    if metrics is not None and "train-seconds" in metrics:
        content["metrics"] = MetricRecord({**metrics, "train-seconds": measured * slowdown})
    return content


@register
class Devices(Feature):
    """Emulated device profiles on clients; rows for clients that missed the deadline."""

    name = "devices"
    order = 45  # after the base is pruned (40), before the bandit reads the round's rows (50)

    @classmethod
    def enabled(cls, cfg: RunConfig) -> bool:
        """On when the recipe has a `devices:` list."""
        return cfg.devices is not None

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if not cls.enabled(cfg):
            return
        total, n = sum(p.clients for p in cfg.devices), cfg.data.num_clients
        if total != n:
            raise ValueError(f"devices cover {total} clients but data.num_clients is {n}")
        if cfg.privacy.secure_aggregation.enabled:
            raise ValueError(
                "devices (emulated speed) wraps each training message, as SecAgg+ does; "
                "drop devices or privacy.secure_aggregation"
            )

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.asked: list[int] = []  # nodes asked to train this round
        self.partitions: dict[int, int] = {}  # node -> partition, from its accepted replies

    # -- client --------------------------------------------------------------------------------
    @classmethod
    def wrap_train(
        cls,
        cfg: RunConfig,
        content: RecordDict,
        *,
        context: Any,
        train: Callable[..., RecordDict],
    ) -> RecordDict | None:
        """The round under this node's thread limit, then its emulated slowdown."""
        device = device_of(cfg, context.node_config)
        if device is None or (device.threads is None and device.slowdown == 1):
            return None
        start = time.perf_counter()
        with torch_threads(device.threads):
            out = train(cfg, content, context=context)
        if device.slowdown == 1:
            return out
        elapsed = time.perf_counter() - start
        timeout = cfg.federation.round_timeout
        return slowed(out, slowdown=device.slowdown, elapsed=elapsed, timeout=timeout)

    def prepare_base(self, base: torch.nn.Module, rnd: ClientRound) -> torch.nn.Module:
        """Refuse a plan whose estimated training memory exceeds this device's budget."""
        device = device_of(rnd.cfg, rnd.node_config)
        if device is None or device.memory_mb is None:
            return base
        need = round_memory(base, rnd)
        if need.total > device.memory_mb * MIB:
            p = rnd.plan
            quant = p.quantization or "full precision"
            raise ValueError(
                f"client {p.partition}: the plan (rank {p.rank}, pruning {p.pruning:g}, {quant}) "
                f"{MEMORY_REFUSAL}: it needs about {need.total / MIB:.1f} MiB "
                f"({need.describe()}) and the budget is {device.memory_mb:g} MiB "
                "(node config memory-mb / devices[].memory_mb)"
            )
        return base

    # -- server --------------------------------------------------------------------------------
    def download(self, node: int, down: Download) -> Download:
        """Unchanged; `node` is noted as asked to train, for `record`'s missed rows."""
        self.asked.append(node)
        return down

    def accepted(self, node: int, reply: TrainReply) -> None:
        """Remember the node's partition, for its `missed` row in a later round."""
        self.partitions[node] = reply.partition

    def record(self, result: RoundResult, *, server_row: dict[str, Any]) -> None:
        """A `missed` row for every node asked to train that sent nothing back in time."""
        seen = {row.node for row in result.rows}
        missed = [n for n in dict.fromkeys(self.asked) if n not in seen]
        timeout = self.cfg.federation.round_timeout
        reason = f"no reply within the round's deadline (federation.round_timeout={timeout:g}s)"
        for node in missed:
            row = ClientRow(server_row["round"], node, "missed", None, self.partitions.get(node))
            row.reason = reason
            result.rows.append(row)
        server_row["clients_missed"] = len(missed)
        self.asked = []
