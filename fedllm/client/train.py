"""The client's local optimisation and the held-out loss, on tokenized examples.

Plain PyTorch steps driven through accelerate (device placement, mixed precision where a device has
it); the federated parts live in `client_app.py`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from fedllm.data import collate


@dataclass(frozen=True)
class TrainResult:
    """What a client reports of its local training."""

    steps: int
    examples: int
    loss_first: float
    loss_last: float
    loss_mean: float
    seconds: float


def _loader(
    examples: Sequence[dict], *, batch_size: int, pad_id: int, seed: int, shuffle: bool
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        list(examples),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=lambda batch: collate(batch, pad_id=pad_id),
    )


def _forever(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


def num_local_steps(
    n_examples: int, *, batch_size: int, local_steps: int | None, local_epochs: float | None
) -> int:
    """Local steps for a round: given directly, or from epochs over this client's shard."""
    if local_steps is not None:
        return local_steps
    assert local_epochs is not None
    return max(1, math.ceil(local_epochs * n_examples / batch_size))


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant, linear or cosine decay after a linear warm-up."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(
    params: list[torch.nn.Parameter], *, optimizer: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW (default) or SGD over `params`."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token NLL per position (batch × length-1), 0 where the label is ignored (-100)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    )
    return nll.view(shift_labels.shape)


def train_local(
    model: torch.nn.Module,
    examples: Sequence[dict],
    *,
    steps: int,
    batch_size: int,
    pad_id: int,
    optimizer: str = "adamw",
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    warmup_steps: int = 0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
    regularizer: Callable[[], torch.Tensor] | None = None,
) -> TrainResult:
    """Run `steps` optimizer steps on the trainable (LoRA) parameters of `model`.

    `regularizer()` (e.g. HetLoRA's tail penalty, `fedllm.aggregators.hetlora_prune`) is added to
    each step's
    loss before the backward pass; the reported losses are the data loss alone.
    """
    if not examples:
        raise ValueError("no training examples on this client")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (is the LoRA adapter attached?)")
    opt = make_optimizer(params, optimizer=optimizer, lr=lr, weight_decay=weight_decay)
    sched = make_scheduler(opt, schedule=schedule, warmup_steps=warmup_steps, total_steps=steps)
    loader = _loader(examples, batch_size=batch_size, pad_id=pad_id, seed=seed, shuffle=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, opt, loader = accelerator.prepare(model, opt, loader)
    model.train()
    losses: list[float] = []
    seen = 0
    start = time.perf_counter()
    batches = _forever(loader)
    for step in range(steps):
        batch = next(batches)
        loss = model(**batch).loss
        accelerator.backward(loss if regularizer is None else loss + regularizer())
        if max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        seen += int(batch["input_ids"].shape[0])
        if on_step is not None:
            on_step(step + 1, steps, losses[-1])
    accelerator.free_memory()
    return TrainResult(
        steps=steps,
        examples=seen,
        loss_first=losses[0],
        loss_last=losses[-1],
        loss_mean=sum(losses) / len(losses),
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def evaluate_nll(
    model: torch.nn.Module, examples: Sequence[dict], *, batch_size: int, pad_id: int
) -> tuple[float, int]:
    """Summed token negative log-likelihood on the response tokens, and how many tokens.

    Sums, not means, so that clients' results combine exactly into a global loss.
    """
    total, tokens = 0.0, 0
    loader = _loader(examples, batch_size=batch_size, pad_id=pad_id, seed=0, shuffle=False)
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = token_nll(logits, batch["labels"])
        total += float(nll.sum())
        tokens += int((batch["labels"][:, 1:] != -100).sum())
    return total, tokens
