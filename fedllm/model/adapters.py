"""LoRA adapters <-> per-module factors <-> Flower records <-> PEFT folders.

A module's factors are named by the base model's module path (`model.layers.0.self_attn.q_proj`);
on the wire they travel as `<module>.lora_A` / `<module>.lora_B` arrays plus one scaling s = α/r,
so that every party agrees on the update s·B·A.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedllm.aggregators import Factors
from fedllm.files import load_json_object

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"  # PEFT's pickled format, which other tools still write
RECOPY = "the adapter folder is incomplete (e.g. an interrupted copy): copy it again"


def initial_factors(
    shapes: Mapping[str, tuple[int, int]], *, rank: int, scaling: float, seed: int
) -> dict[str, Factors]:
    """The starting adapter: B = 0 (so round 0 is the base model), A as peft initialises it."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Factors] = {}
    for module, (d, k) in sorted(shapes.items()):
        bound = 1.0 / math.sqrt(k)  # kaiming_uniform_(a=√5) on a (rank × k) weight
        a = (torch.rand(rank, k, generator=gen) * 2 - 1) * bound
        out[module] = Factors(torch.zeros(d, rank), a, scaling)
    return out


def revive_dead(
    factors: Mapping[str, Factors], *, generator: torch.Generator
) -> tuple[dict[str, Factors], int]:
    """(`factors` with every dead component revived, how many were). A component whose A row and
    B column are both zero (zero-padding: a global of lower rank than the client's) never trains,
    each factor's gradient being a product with the other; its A row gets peft's fresh
    kaiming-uniform init, U(±1/√k), and B stays zero, so ΔW is unchanged (modules in sorted
    order)."""
    out: dict[str, Factors] = {}
    revived = 0
    for module in sorted(factors):
        f = factors[module]
        dead = (f.A == 0).all(dim=1) & (f.B == 0).all(dim=0)
        if not bool(dead.any()):
            out[module] = f
            continue
        k, n = f.A.shape[1], int(dead.sum())
        fresh = (torch.rand(n, k, generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(k)
        A = f.A.clone()
        A[dead] = fresh.to(A.dtype)
        out[module] = Factors(f.B, A, f.scaling)
        revived += n
    return out, revived


def attach_lora(
    base: torch.nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
) -> PeftModel:
    """Wrap the frozen base in a fresh peft LoRA adapter of this rank (only LoRA is trainable)."""
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def read_factors(model: PeftModel) -> dict[str, Factors]:
    """Copy the adapter's factors out of the live model (peft's state dict aliases parameters).

    `save_embedding_layers=False`: fedllm's LoRA targets linear layers only, and peft's "auto"
    asks the Hub for the base's config.json whenever the base is named by id, not folder.
    """
    config = model.peft_config[model.active_adapter]
    scaling = config.lora_alpha / config.r
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    out: dict[str, Factors] = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        b = state[key.replace(".lora_A.weight", ".lora_B.weight")]
        # on the CPU: factors leave the device with the reply and are aggregated on the server
        out[module] = Factors(
            b.detach().float().cpu().clone(), a.detach().float().cpu().clone(), scaling
        )
    return out


def write_factors(model: PeftModel, factors: Mapping[str, Factors]) -> None:
    """Load factors into the live adapter, converting each to this adapter's rank and scaling."""
    config = model.peft_config[model.active_adapter]
    rank, scaling = config.r, config.lora_alpha / config.r
    modules = dict(model.named_modules())
    missing = [m for m in factors if not hasattr(modules.get(PEFT_PREFIX + m), "lora_A")]
    if missing:
        raise KeyError(f"adapter has no LoRA on {missing[:3]}: the sender targets other modules")
    with torch.no_grad():
        for module, f in factors.items():
            layer = modules[PEFT_PREFIX + module]
            fitted = f.truncate(rank, scaling)
            name = model.active_adapter
            layer.lora_A[name].weight.copy_(fitted.A.to(layer.lora_A[name].weight.dtype))
            layer.lora_B[name].weight.copy_(fitted.B.to(layer.lora_B[name].weight.dtype))


def adapter_holding(
    base: torch.nn.Module,
    factors: Mapping[str, Factors],
    *,
    dropout: float,
    target_modules: list[str],
) -> PeftModel:
    """A fresh LoRA adapter on `base` at the factors' largest rank and their scaling, holding
    them; unloaded again if they do not fit (the base is shared: it must not keep the layers)."""
    rank = max((f.rank for f in factors.values()), default=1)
    scaling = next(iter(factors.values())).scaling if factors else 1.0
    model = attach_lora(
        base, rank=rank, alpha=scaling * rank, dropout=dropout, target_modules=target_modules
    )
    try:
        write_factors(model, factors)
    except BaseException:
        model.unload()
        raise
    return model


def to_record(factors: Mapping[str, Factors]) -> ArrayRecord:
    """Factors as a Flower ArrayRecord (float32 CPU tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    for module, f in factors.items():
        tensors[f"{module}.lora_A"] = f.A.detach().to(torch.float32).cpu().contiguous()
        tensors[f"{module}.lora_B"] = f.B.detach().to(torch.float32).cpu().contiguous()
    return ArrayRecord(tensors)


def from_record(record: ArrayRecord, scaling: float) -> dict[str, Factors]:
    """Factors from a Flower ArrayRecord; raises ValueError naming a malformed entry."""
    tensors = record.to_torch_state_dict()
    out: dict[str, Factors] = {}
    for key in tensors:
        if key.endswith(".lora_A"):
            module = key.removesuffix(".lora_A")
            b_key = module + ".lora_B"
            if b_key not in tensors:
                raise ValueError(f"{key} has no matching {b_key}")
            out[module] = Factors(tensors[b_key].clone(), tensors[key].clone(), scaling)
        elif not key.endswith(".lora_B"):
            raise ValueError(f"unexpected array {key!r}: expected '<module>.lora_A' / '.lora_B'")
    if len(out) * 2 != len(tensors):
        raise ValueError("lora_B arrays without a matching lora_A")
    return out


def save_peft_adapter(
    folder: Path,
    factors: Mapping[str, Factors],
    *,
    base_model: str,
    target_modules: list[str],
    dropout: float = 0.0,
) -> Path:
    """Write factors as a PEFT adapter folder that stock `PeftModel.from_pretrained` loads."""
    if not factors:
        raise ValueError("no factors to save")
    # One rank and one alpha serve all modules: zero-pad lower ranks, fold scalings into B.
    rank = max(f.rank for f in factors.values())
    scaling = max(f.scaling for f in factors.values())
    config = LoraConfig(
        r=rank,
        lora_alpha=scaling * rank,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_model),
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tensors: dict[str, torch.Tensor] = {}
    for module, f in factors.items():
        key = PEFT_PREFIX + module
        fitted = f.truncate(rank, scaling)
        tensors[f"{key}.lora_A.weight"] = fitted.A.to(torch.float32).contiguous()
        tensors[f"{key}.lora_B.weight"] = fitted.B.to(torch.float32).contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def check_adapter_files(folder: Path) -> None:
    """Refuse an adapter folder PEFT cannot load, naming the file: adapter_config.json missing,
    empty or cut short, or the weights (adapter_model.safetensors) missing or truncated. PEFT's
    own errors name no file: a missing weights file becomes a hub lookup ("Repo id must be in
    the form ..."), a truncated one a SafetensorError traceback."""
    config = folder / ADAPTER_CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    load_json_object(config, remedy=RECOPY)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (folder / LEGACY_WEIGHTS).is_file():
            return  # loaded by torch; not written by fedllm, so not checked here
        raise FileNotFoundError(f"{folder} has no {ADAPTER_WEIGHTS} (its weights); {RECOPY}")
    try:
        with safe_open(str(weights), framework="pt") as f:  # reads and checks the header only
            f.keys()
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is damaged ({err}); {RECOPY}") from None


def adapter_summary(folder: Path) -> dict:
    """The rank, alpha and targets of a saved PEFT adapter (for reports)."""
    config = load_json_object(folder / ADAPTER_CONFIG, remedy=RECOPY)
    return {k: config[k] for k in ("r", "lora_alpha", "target_modules", "base_model_name_or_path")}


def factors_digest(factors: Mapping[str, Factors]) -> str:
    """A short hash of global factors, logged at each round start so a resume can be checked."""
    digest = hashlib.sha256()
    for module in sorted(factors):
        f = factors[module]
        digest.update(module.encode())
        digest.update(f.B.detach().float().contiguous().numpy().tobytes())
        digest.update(f.A.detach().float().contiguous().numpy().tobytes())
        digest.update(repr(float(f.scaling)).encode())
    return digest.hexdigest()[:12]


def live_lora(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module → (B, A): the live (differentiable) lora_B/lora_A weights of the active adapter."""
    name = getattr(model, "active_adapter", "default")
    if isinstance(name, list | tuple):  # peft returns a list when several adapters are active
        name = name[0]
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, layer in model.named_modules():
        lora_A = getattr(layer, "lora_A", None)
        if isinstance(lora_A, torch.nn.ModuleDict) and name in lora_A:
            out[module] = (layer.lora_B[name].weight, lora_A[name].weight)
    return out
