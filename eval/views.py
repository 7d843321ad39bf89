"""The models an evaluator compares, on one base loaded once: "base", "global" (the released
federated adapter) and "client:<p>" (client p's last accepted update, the honest-but-curious
server's view). Adapters load with stock `PeftModel.from_pretrained` / `load_adapter`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError

from fedllm.client.precision import PRECISIONS, autocast, autocast_dtype
from fedllm.model.card import resolve_adapter_base
from fedllm.model.loading import load_base_model, scoring_mode

BASE, GLOBAL = "base", "global"


def client_view(partition: int) -> str:
    """The view name of client `partition`'s adapter: 'client:<p>'."""
    return f"client:{partition}"


def adapter_base_dir(adapter: Path) -> Path:
    """The base model folder of an adapter (its portable base name resolved to a local folder)."""
    return resolve_adapter_base(adapter)


def find_client_adapters(run_dir: Path) -> dict[int, Path]:
    """client_adapters/<partition>/ folders written by the server at the end of a run."""
    folder = run_dir / "client_adapters"
    if not folder.is_dir():
        return {}
    return {
        int(p.name): p
        for p in sorted(folder.iterdir())
        if p.name.isdigit() and (p / "adapter_config.json").is_file()
    }


@contextmanager
def named_adapter(folder: Path) -> Iterator[None]:
    """Loading the adapter in `folder`: PEFT's failure (a hub lookup, "Repo id must be in the
    form ...", for a folder without weights; a SafetensorError for a truncated file) as a
    ValueError naming the folder, which `fedllm eval` prints as one line."""
    try:
        yield
    except (OSError, ValueError, SafetensorError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(
            f"cannot load the adapter in {folder} ({reason[:300]}); its files are incomplete "
            "or damaged (e.g. an interrupted copy): copy it again"
        ) from None


class Views:
    """A base model with named adapters; `use(view)` makes one of them active, its forwards
    under bf16 autocast when `precision` picks it (as training does: "auto" where native)."""

    def __init__(
        self,
        global_adapter: Path,
        *,
        client_adapters: dict[int, Path] | None = None,
        dtype: str = "float32",
        quantization: str | None = None,
        precision: str = "auto",
        attention: str = "auto",
        max_length: int | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(
                f"eval setting precision={precision!r}; valid: {', '.join(PRECISIONS)}"
            )
        base_dir = adapter_base_dir(global_adapter)
        base, self.tokenizer = load_base_model(
            base_dir,
            dtype=dtype,
            quantization=quantization,
            attention=attention,
            max_length=max_length,
        )
        # no-grad forwards in eval mode break 4-bit LoRA (platform notes): train mode there, with
        # every dropout layer (an adapter's lora.dropout) in eval mode, so scoring is deterministic
        self.train_mode = quantization is not None
        with named_adapter(global_adapter):
            self.model = PeftModel.from_pretrained(base, str(global_adapter), adapter_name=GLOBAL)
        self.names = [BASE, GLOBAL]
        for pid, folder in sorted((client_adapters or {}).items()):
            with named_adapter(folder):
                self.model.load_adapter(str(folder), adapter_name=client_view(pid))
            self.names.append(client_view(pid))
        self.set_mode()
        self.device = next(self.model.parameters()).device
        self.autocast = autocast_dtype(precision, device=self.device, model=self.model)
        if self.autocast is not None:
            cast_linear_weights(self.model, self.autocast)

    @property
    def compute(self) -> str:
        """What eval forwards run in: "bf16" (autocast) or "fp32" (the weights' own dtype)."""
        return "fp32" if self.autocast is None else "bf16"

    def set_mode(self) -> None:
        """Eval mode, or train mode for a quantized base, with dropout off either way."""
        scoring_mode(self.model, quantized=self.train_mode)

    @contextmanager
    def use(self, view: str) -> Iterator[PeftModel]:
        """The model with `view` active ("base" disables every adapter)."""
        if view not in self.names:
            raise KeyError(f"unknown view {view!r}; available: {self.names}")
        self.set_mode()
        amp = autocast(self.device, self.autocast)
        if view == BASE:
            with self.model.disable_adapter(), amp:
                yield self.model
        else:
            self.model.set_adapter(view)
            with amp:
                yield self.model


def cast_linear_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store every linear layer's weights (base and adapters) in `dtype`, the one autocast
    computes them in: the same numbers, without autocast re-casting the frozen weights on every
    forward (a quarter of a decode step's time on a CPU). The output layer stays when it shares
    its weights with the input embeddings."""
    embeddings = model.get_input_embeddings().weight
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight is not embeddings:
            module.to(dtype)
