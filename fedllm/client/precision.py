"""Mixed precision for local steps and evaluation: bf16 autocast with fp32 master LoRA weights.

`federation.precision` picks it ("auto": bf16 where the device multiplies bf16 natively). Autocast
casts the frozen fp32 weights at every matmul; storing them in bf16 for a round instead measured
no faster on this CPU (quickstart step, idle machine: 0.97–1.04×), so the casts stay.
"""

from __future__ import annotations

import torch

# whether a device runs bf16 matmuls natively (CUDA with bf16, a CPU with AVX512-BF16/AMX)
from fedllm.aggregators.linalg import native_bf16 as bf16_supported

PRECISIONS = ("fp32", "bf16", "auto")


def autocast_dtype(
    precision: str, *, device: torch.device, model: torch.nn.Module | None = None
) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`: bf16, or None for full precision.

    "auto" is bf16 where the device runs it natively and the base is not float16 (which bf16
    would round a second time), else fp32; "bf16" is bf16 regardless (emulated and slow on a
    CPU without AVX512-BF16; refused over a float16 base by `check_precision`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "fp32" or (precision == "auto" and not bf16_supported(device)):
        return None
    if precision == "auto" and model is not None and torch.float16 in _frozen_dtypes(model):
        return None
    return torch.bfloat16


def _frozen_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}


def check_precision(model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Refuse bf16 autocast over a float16 base (a second rounding of every weight) and LoRA
    parameters below fp32 (autocast needs fp32 masters)."""
    if dtype is None:
        return
    if torch.float16 in _frozen_dtypes(model):
        raise ValueError(
            "federation.precision='bf16' over a float16 base (model.dtype='float16') rounds "
            "every weight twice; use model.dtype 'float32' or 'bfloat16' (storage) with "
            "precision 'bf16', or precision 'fp32'"
        )
    low = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad} - {"torch.float32"})
    if low:
        raise ValueError(f"bf16 autocast needs fp32 trainable (LoRA) parameters, found {low}")


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to `dtype` on `device`'s type; a disabled context for None (full precision)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
