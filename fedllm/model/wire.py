"""Round semantics on the wire: what the server sends and reads back, what a client starts from.

Each aggregator declares a `RoundSpec` (fedllm.aggregators); the strategy and the ClientApp
dispatch on it through these helpers, and the server tells clients the semantics in the round's
ConfigRecord so both sides agree:
- adapter state (default): start from the global factors cut to your rank, send the whole adapter;
- `freeze_A` (ffa): the same, but train B only; A stays at the shared-seed A the server sent;
- `local_B` (fedsa): exchange A only; B stays on the client across rounds in `context.state`;
- `merge` (flora): add the received delta to the base weights (restored afterwards, so the cached
  base serves the next round clean) and train a fresh LoRA on top.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from peft import PeftModel

from fedllm.aggregators import Factors, RoundSpec
from fedllm.model.adapters import PEFT_PREFIX, from_record, to_record

LOCAL_B = "fedsa-local-B"  # key of this node's B matrices in context.state
WHO = "who"  # a query message's record, and its reply's: the partition a node holds
PARTITION = "partition-id"


def who_answer(partition: int) -> RecordDict:
    """A node's reply to the server's query (`fedllm.server.seats`): the partition it holds."""
    return RecordDict({WHO: ConfigRecord({PARTITION: int(partition)})})


OPTION_PREFIX = "option."  # round-config key prefix of the client-side aggregator options


def spec_config(spec: RoundSpec) -> dict[str, bool | str]:
    """The round semantics as ConfigRecord entries."""
    out: dict[str, bool | str] = {
        "merge": spec.merge,
        "freeze-a": spec.freeze_A,
        "local-b": spec.local_B,
    }
    if spec.client_options:
        out["client-options"] = ",".join(spec.client_options)
    return out


def spec_of(config: ConfigRecord) -> RoundSpec:
    """The round semantics the server announced (adapter state if it announced none)."""
    names = str(config.get("client-options", ""))
    return RoundSpec(
        merge=bool(config.get("merge", False)),
        freeze_A=bool(config.get("freeze-a", False)),
        local_B=bool(config.get("local-b", False)),
        client_options=tuple(n for n in names.split(",") if n),
    )


def options_config(spec: RoundSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's client-side aggregator options as round-config entries (`option.<name>`)."""
    return {OPTION_PREFIX + k: v for k, v in options.items() if k in spec.client_options}


def client_options(config: ConfigRecord) -> dict[str, Any]:
    """The client-side aggregator options the server sent (`options_config`'s inverse)."""
    return {
        k.removeprefix(OPTION_PREFIX): v for k, v in config.items() if k.startswith(OPTION_PREFIX)
    }


def server_options(spec: RoundSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """The aggregator options the server's aggregation function takes (client-side ones removed)."""
    return {k: v for k, v in options.items() if k not in spec.client_options}


def outgoing(factors: Mapping[str, Factors], spec: RoundSpec) -> ArrayRecord:
    """The record to send: A only under `local_B`, both factors otherwise."""
    if spec.local_B:
        tensors = {
            f"{m}.lora_A": f.A.detach().float().cpu().contiguous() for m, f in factors.items()
        }
        return ArrayRecord(tensors)
    return to_record(factors)


def a_only(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Module → A from a record of `<module>.lora_A` arrays; anything else is an error."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in record.to_torch_state_dict().items():
        if not key.endswith(".lora_A"):
            raise ValueError(
                f"unexpected array {key!r}: only '<module>.lora_A' travels under fedsa"
            )
        out[key.removesuffix(".lora_A")] = tensor.clone()
    return out


def read_update(
    record: ArrayRecord,
    *,
    scaling: float,
    spec: RoundSpec,
    shapes: Mapping[str, tuple[int, int]],
) -> dict[str, Factors]:
    """A client's reply as factors; under `local_B` B is zero (the server never sees it)."""
    if not spec.local_B:
        return from_record(record, scaling)
    out = {}
    for module, A in a_only(record).items():
        if module not in shapes:
            raise ValueError(f"unknown module {module!r}")
        out[module] = Factors(A.new_zeros(shapes[module][0], A.shape[0]), A, scaling)
    return out


def personal(model: PeftModel, received: ArrayRecord, *, state: RecordDict) -> dict[str, Factors]:
    """Under `local_B`: the global A cut to the live adapter's rank, with this node's own B.

    B is zero before the node's first round (or if its rank changed); the scaling is the adapter's.
    """
    kept = state.get(LOCAL_B)
    local = kept.to_torch_state_dict() if isinstance(kept, ArrayRecord) else {}
    config = model.peft_config[model.active_adapter]
    rank, scaling = config.r, config.lora_alpha / config.r
    out = {}
    for module, A in a_only(received).items():
        cut = Factors(A.new_zeros(1, A.shape[0]), A, 1.0).truncate(rank).A
        d = peft_module(model, module).lora_B[model.active_adapter].weight.shape[0]
        B = local.get(module)
        if B is None or tuple(B.shape) != (d, rank):
            B = A.new_zeros(d, rank)
        out[module] = Factors(B, cut, scaling)
    return out


def keep_local_B(state: RecordDict, factors: Mapping[str, Factors]) -> None:
    """Store this node's B matrices in its persistent state (`context.state`)."""
    state[LOCAL_B] = ArrayRecord(
        {m: f.B.detach().float().cpu().contiguous() for m, f in factors.items()}
    )


def fresh_adapter(model: PeftModel, *, seed: int) -> None:
    """Re-initialise the live adapter as peft does (B = 0, A kaiming-uniform), from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    name = model.active_adapter
    with torch.no_grad():
        for _, layer in model.named_modules():  # deterministic order: the model's own
            if not isinstance(getattr(layer, "lora_A", None), torch.nn.ModuleDict):
                continue
            if name not in layer.lora_A:
                continue
            A = layer.lora_A[name].weight
            bound = 1.0 / math.sqrt(A.shape[1])  # kaiming_uniform_(a=√5) on an r×k weight
            A.copy_(((torch.rand(A.shape, generator=gen) * 2 - 1) * bound).to(A.dtype))
            layer.lora_B[name].weight.zero_()


def freeze_A(model: PeftModel) -> int:
    """Stop gradients to every lora_A (FFA-LoRA); returns how many tensors were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def stacked(*deltas: Mapping[str, Factors]) -> dict[str, Factors]:
    """Module → one delta equal to the sum of the given deltas of that module (the factors side by
    side, [s₁B₁ | s₂B₂][A₁; A₂] at scaling 1); a module in one mapping only is kept as it is."""
    out: dict[str, Factors] = {}
    for delta in deltas:
        for module, f in delta.items():
            if module not in out:
                out[module] = f
                continue
            g = out[module]
            B = torch.cat([g.B * g.scaling, f.B.to(g.B.dtype) * f.scaling], dim=1)
            out[module] = Factors(B, torch.cat([g.A, f.A.to(g.A.dtype)]), 1.0)
    return out


@contextmanager
def merged_into(base: torch.nn.Module, delta: Mapping[str, Factors]) -> Iterator[None]:
    """Within the block the base's weights are W + s·B·A; the exact originals come back after."""
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for module, f in delta.items():
                weight = base.get_submodule(module).weight
                if not weight.is_floating_point() or weight.shape != torch.Size(f.shape):
                    raise ValueError(
                        f"cannot merge into {module}: weight {weight.dtype} {tuple(weight.shape)}, "
                        f"delta {f.shape} (merge-and-reinitialise needs an unquantized base)"
                    )
                saved[module] = weight.detach().clone()
                weight.add_(f.delta().to(device=weight.device, dtype=weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for module, original in saved.items():
                base.get_submodule(module).weight.copy_(original)


def peft_module(model: PeftModel, module: str) -> torch.nn.Module:
    """The peft LoRA layer wrapping base module `module`."""
    return model.get_submodule(PEFT_PREFIX + module)
