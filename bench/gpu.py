"""Local LoRA step time on a device, fp32 against bf16 autocast (and a 4-bit base), in one run.

    python bench/gpu.py [--recipe recipes/quickstart.yaml] [--steps 10] [--device cuda]
                        [--threads N] [--no-4bit] [--out results/gpu.md] [key=value ...]

For each configuration: the recipe's base on `--device` (CUDA by default; `cpu` measures the CPU
path the same way), a fresh LoRA adapter at client 0's rank, one warm-up step, then `--steps`
timed steps of `fedllm.client.train.train_local` on client 0's shard; the median step time, the
last training loss, the held-out loss (fp32 evaluation) and the peak device memory. Ratios are
against fp32 on the same device in the same run. Writes results/gpu.md (or `--out`).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fedllm.recipe import RunConfig

RESULTS = Path(__file__).parent / "results" / "gpu.md"
CONFIGS = [  # (label, precision, quantization)
    ("fp32 (baseline)", "fp32", None),
    ("bf16 autocast", "bf16", None),
    ("4-bit base, bf16 autocast", "bf16", "4bit"),
]


@dataclass(frozen=True)
class Measured:
    """One configuration's median step, losses and peak memory."""

    label: str
    step_seconds: float
    train_loss: float
    held_out_loss: float
    peak_bytes: int


def measure(
    cfg: RunConfig, *, device: torch.device, precision: str, quant: str | None, steps: int
) -> tuple[float, float, float, int]:
    """Time `steps` local steps of client 0 in this configuration (see the module docstring)."""
    from fedllm.client.train import evaluate_nll, train_local
    from fedllm.data.shards import load_shard
    from fedllm.model.adapters import attach_lora
    from fedllm.model.base import prepare_base_model
    from fedllm.model.loading import load_base_model

    folder = prepare_base_model(cfg)
    base, tok = load_base_model(folder, dtype=cfg.model.dtype, quantization=quant, device=device)
    shard = load_shard(cfg, 0, tokenizer=tok)
    rank, fed = cfg.client_rank(0), cfg.federation
    torch.manual_seed(cfg.seed)
    model = attach_lora(
        base,
        rank=rank,
        alpha=cfg.lora.alpha,
        dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
    )
    kw = dict(batch_size=fed.batch_size, pad_id=tok.pad_token_id, lr=fed.lr, precision=precision)
    train_local(model, shard.train, steps=1, **kw)  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps = [time.perf_counter()]
    result = train_local(
        model,
        shard.train,
        steps=steps,
        seed=cfg.seed + 1,
        on_step=lambda *_: stamps.append(time.perf_counter()),
        **kw,
    )
    model.train(quant is None)  # quantized bases evaluate in train mode (platform notes)
    nll, tokens = evaluate_nll(
        model, shard.held_out, batch_size=fed.eval_batch_size, pad_id=tok.pad_token_id
    )
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    model.unload()
    del model, base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step = statistics.median(b - a for a, b in itertools.pairwise(stamps))
    return step, result.loss_last, nll / max(tokens, 1), peak


def run(argv: list[str] | None = None) -> str:
    """Measure every configuration and return the results page (also written to `--out`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipe", default=str(Path(__file__).parents[1] / "recipes/quickstart.yaml")
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-4bit", action="store_true", help="skip the 4-bit configuration")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device here; pass --device cpu to time the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)

    from fedllm.recipe import load_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    rows = []
    for label, precision, quant in CONFIGS:
        if quant and args.no_4bit:
            continue
        step, train_loss, held, peak = measure(
            cfg, device=device, precision=precision, quant=quant, steps=args.steps
        )
        rows.append(Measured(label, step, train_loss, held, peak))
        print(f"{label}: {step:.4f} s/step, loss {train_loss:.4f}, held-out {held:.4f}", flush=True)
    base = rows[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        "# Local steps on a device: fp32 vs bf16 autocast",
        "",
        f"`python bench/gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}` on "
        f"{name} ({device}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"load average {os.getloadavg()[0]:.1f} at the end. {args.steps} timed steps per row "
        "(median), after one warm-up step.",
        "",
        "| configuration | s / step | step ratio | last train loss | held-out loss | "
        "peak device memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.step_seconds:.4f} | {r.step_seconds / base.step_seconds:.3f} | "
            f"{r.train_loss:.4f} | {r.held_out_loss:.4f} | {r.peak_bytes / 2**20:.0f} |"
        )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return text


if __name__ == "__main__":
    run()
