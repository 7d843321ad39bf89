"""Structured pruning of a frozen Llama-style base for a constrained client.

Removes MLP intermediate channels (gate/up rows, down columns) and query heads (q rows, o columns)
by an importance score: weight magnitude, or Wanda-style |W|·‖X‖ with input norms from a few local
batches. Every layer keeps the same number of channels and of query heads per key/value group, so
the pruned model is an ordinary `LlamaForCausalLM` with a smaller config (it saves, reloads and
quantizes like any other). Key/value heads are kept: grouped-query attention stays intact.

The result carries the kept-index map of every linear layer it changed, which is what the client
sends with its LoRA factors so the server can put them back at full shape
(`fedllm.constrained.prune_map`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import LlamaForCausalLM, PretrainedConfig, PreTrainedModel

from fedllm.constrained.prune_map import Kept

Importance = Literal["wanda", "magnitude"]
Part = Literal["mlp", "heads"]


@dataclass(frozen=True)
class PrunePlan:
    """How many channels / query heads per group each layer keeps, for a given ratio."""

    intermediate: int
    heads_per_group: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_heads(self) -> int:
        """Query heads kept per layer: heads per key/value group × key/value heads."""
        return self.heads_per_group * self.num_kv_heads


def check_ratio(ratio: float, *, who: str) -> float:
    """A pruning ratio must lie in [0, 1); `who` names the client or key in the error."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise ValueError(f"{who}: pruning ratio must be a number in [0, 1), got {ratio!r}")
    if not 0 <= ratio < 1:
        raise ValueError(f"{who}: pruning ratio {ratio!r} is outside [0, 1)")
    return float(ratio)


def _keep(n: int, ratio: float) -> int:
    """Units kept out of n: round-half-up of n·(1-ratio), at least one."""
    return max(1, min(n, math.floor(n * (1 - ratio) + 0.5)))


def prune_plan(
    config: PretrainedConfig, ratio: float, *, parts: Sequence[Part] = ("mlp", "heads")
) -> PrunePlan:
    """The kept counts for a Llama config at `ratio` (same for every layer); ValueError for a
    base the pruned model cannot be rebuilt as (it is rebuilt as a LlamaForCausalLM)."""
    kind = getattr(config, "model_type", None)
    biased = [b for b in ("attention_bias", "mlp_bias") if getattr(config, b, False)]
    if kind != "llama" or biased:
        what = f"a {kind!r} model" if kind != "llama" else f"a Llama with {' and '.join(biased)}"
        raise ValueError(
            f"structured pruning rebuilds the base as a bias-free Llama (SmolLM2, Llama, "
            f"TinyLlama), and this base is {what} (h97: it crashed mid-round); drop the pruning "
            "(tiers' pruning: 0, adaptive pruning arms [0.0]) or use a Llama-architecture base"
        )
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv
    per_group = _keep(group, ratio) if "heads" in parts else group
    # transformers' Llama config insists hidden_size % num_heads == 0: keep fewer heads if needed
    while config.hidden_size % (per_group * kv):
        per_group -= 1
    inter = config.intermediate_size
    return PrunePlan(
        intermediate=_keep(inter, ratio) if "mlp" in parts else inter,
        heads_per_group=per_group,
        num_kv_heads=kv,
        head_dim=head_dim,
    )


# the side of each adapted projection that pruning cuts ("out": rows, "in": columns): heads are
# q_proj's rows and o_proj's columns, MLP channels gate/up's rows and down's columns; k_proj and
# v_proj keep every kv head, so nothing of them is ever pruned
PRUNED_SIDE = {
    "q_proj": "out",
    "o_proj": "in",
    "gate_proj": "out",
    "up_proj": "out",
    "down_proj": "in",
}


def check_sides(kept: Mapping[str, Kept], *, who: str) -> None:
    """Refuse a kept-index map on a side pruning never cuts (both sides of a module, k_proj's
    rows...): the server's per-coordinate weights are exact only for the one pruned side, and
    such a map made them raise after screening, ending the run (h104)."""
    for module, k in kept.items():
        side = PRUNED_SIDE.get(module.rsplit(".", 1)[-1])
        sent = [name for name, idx in (("out", k.out), ("in", k.in_)) if idx is not None]
        if sent and sent != [side]:
            valid = f"only its {side!r} ids" if side else "none of it"
            raise ValueError(
                f"{who}: kept-index map on {module}.{'/'.join(sent)}; pruning keeps {valid}"
            )


def pruned_module_shapes(
    shapes: dict[str, tuple[int, int]], config: PretrainedConfig, *, plan: PrunePlan
) -> dict[str, tuple[int, int]]:
    """(out, in) of each adapted module after pruning to `plan` (for rank checks before a run)."""
    q = plan.num_heads * plan.head_dim
    new = {"q_proj": (q, None), "o_proj": (None, q), "gate_proj": (plan.intermediate, None)}
    new |= {"up_proj": (plan.intermediate, None), "down_proj": (None, plan.intermediate)}
    out = {}
    for name, (d, k) in shapes.items():
        dd, kk = new.get(name.rsplit(".", 1)[-1], (None, None))
        out[name] = (dd or d, kk or k)
    return out


def _layers(model: PreTrainedModel) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(x, "mlp") and hasattr(x, "self_attn") for x in layers):
        raise ValueError(
            f"structured pruning supports Llama-style models (model.layers[i].mlp/.self_attn), "
            f"not {type(model).__name__}"
        )
    return list(layers)


@torch.no_grad()
def input_norms(model: PreTrainedModel, batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ over all non-padding tokens of each input feature of every o_proj and down_proj."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str):
        def fn(module, args, _out):
            x = args[0].detach().float()
            mask = current_mask[0]
            if mask is not None:
                x = x[mask.bool()]
            sq = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq

        return fn

    for i, layer in enumerate(_layers(model)):
        hooks.append(layer.self_attn.o_proj.register_forward_hook(hook(f"{i}.o")))
        hooks.append(layer.mlp.down_proj.register_forward_hook(hook(f"{i}.down")))
    current_mask: list[torch.Tensor | None] = [None]
    device = next(model.parameters()).device
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            current_mask[0] = batch.get("attention_mask")
            model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        for h in hooks:
            h.remove()
    if not sums:
        raise ValueError("Wanda importance needs at least one calibration batch")
    return {k: v.sqrt() for k, v in sums.items()}


def importance(
    model: PreTrainedModel, *, method: Importance, norms: dict[str, torch.Tensor] | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (score of each MLP channel, score of each query head); higher = more useful."""
    if method == "wanda" and norms is None:
        raise ValueError("importance method 'wanda' needs input norms from calibration batches")
    scores = []
    for i, layer in enumerate(_layers(model)):
        down = layer.mlp.down_proj.weight.detach().float().abs()  # hidden × intermediate
        o = layer.self_attn.o_proj.weight.detach().float().abs()  # hidden × heads·head_dim
        if method == "wanda":
            channel = (down * norms[f"{i}.down"]).sum(0)
            col = (o * norms[f"{i}.o"]).sum(0)
        else:
            gate = layer.mlp.gate_proj.weight.detach().float().abs().sum(1)
            up = layer.mlp.up_proj.weight.detach().float().abs().sum(1)
            channel = down.sum(0) + gate + up
            col = o.sum(0) + layer.self_attn.q_proj.weight.detach().float().abs().sum(1)
        heads = model.config.num_attention_heads
        scores.append((channel, col.reshape(heads, -1).sum(1)))
    return scores


def choose_kept(
    scores: list[tuple[torch.Tensor, torch.Tensor]], plan: PrunePlan
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: sorted kept channel ids and sorted kept query-head ids (top per kv group)."""
    kept = []
    for channel, head in scores:
        ch = torch.topk(channel, plan.intermediate, sorted=False).indices.sort().values
        groups = head.reshape(plan.num_kv_heads, -1)
        g = groups.shape[1]
        top = torch.topk(groups, plan.heads_per_group, dim=1, sorted=False).indices
        hd = (top + torch.arange(plan.num_kv_heads).unsqueeze(1) * g).reshape(-1).sort().values
        kept.append((ch, hd))
    return kept


def kept_map(
    kept: list[tuple[torch.Tensor, torch.Tensor]], plan: PrunePlan, *, full_config: PretrainedConfig
) -> dict[str, Kept]:
    """Kept indices of every pruned linear layer, by module path (sides left whole are None)."""
    out: dict[str, Kept] = {}
    hd, inter = plan.head_dim, full_config.intermediate_size
    for i, (ch, heads) in enumerate(kept):
        p = f"model.layers.{i}"
        if len(heads) < full_config.num_attention_heads:
            rows = (heads.unsqueeze(1) * hd + torch.arange(hd)).reshape(-1)
            out[f"{p}.self_attn.q_proj"] = Kept(out=rows, in_=None)
            out[f"{p}.self_attn.o_proj"] = Kept(out=None, in_=rows)
        if len(ch) < inter:
            out[f"{p}.mlp.gate_proj"] = Kept(out=ch, in_=None)
            out[f"{p}.mlp.up_proj"] = Kept(out=ch, in_=None)
            out[f"{p}.mlp.down_proj"] = Kept(out=None, in_=ch)
    return out


@torch.no_grad()
def build_pruned(
    model: PreTrainedModel, kept_by_module: dict[str, Kept], *, plan: PrunePlan
) -> LlamaForCausalLM:
    """A new, frozen LlamaForCausalLM holding only the kept rows/columns of `model`."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.intermediate_size = plan.intermediate
    config.num_attention_heads = plan.num_heads
    config.head_dim = plan.head_dim
    state = {}
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        k = kept_by_module.get(module)
        if k is not None and k.out is not None:
            value = value.index_select(0, k.out)
        if k is not None and k.in_ is not None:
            value = value.index_select(1, k.in_)
        state[key] = value.clone()
    pruned = LlamaForCausalLM(config).to(device=next(model.parameters()).device, dtype=model.dtype)
    pruned.load_state_dict(state)
    pruned.generation_config = model.generation_config
    pruned.requires_grad_(False)
    pruned.train()
    return pruned


def prune_model(
    model: PreTrainedModel,
    ratio: float,
    *,
    method: Importance = "wanda",
    batches: Iterable[dict] = (),
    parts: Sequence[Part] = ("mlp", "heads"),
) -> tuple[PreTrainedModel, dict[str, Kept]]:
    """The pruned copy of `model` at `ratio` and its kept-index map (the original is untouched)."""
    check_ratio(ratio, who="prune_model")
    _layers(model)
    plan = prune_plan(model.config, ratio, parts=parts)
    norms = input_norms(model, batches) if method == "wanda" else None
    kept = choose_kept(importance(model, method=method, norms=norms), plan)
    by_module = kept_map(kept, plan, full_config=model.config)
    return build_pruned(model, by_module, plan=plan), by_module
