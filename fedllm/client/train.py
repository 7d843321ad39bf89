"""The client's local optimisation and the held-out loss, on tokenized examples.

Plain PyTorch steps on whatever device the model lives on (CUDA when the process sees one, else
CPU; see `fedllm.model.loading.compute_device`): every batch moves to the model's device. Knobs:
gradient accumulation (a step sums `accumulation` micro-batches, weighted as one bigger batch),
gradient checkpointing, bf16 autocast with fp32 master LoRA weights, and a learning-rate schedule
that may span the whole federation (`schedule.py`; batches in `batches.py`). The federated
parts live in `app.py`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fedllm.client.batches import batch_loader, forever
from fedllm.client.precision import PRECISIONS as PRECISIONS
from fedllm.client.precision import autocast, autocast_dtype, check_precision
from fedllm.client.schedule import make_optimizer, make_scheduler


@dataclass(frozen=True)
class TrainResult:
    """What a client reports of its local training."""

    steps: int
    examples: int
    loss_first: float
    loss_last: float
    loss_mean: float
    seconds: float


def chain_results(results: Sequence[TrainResult]) -> TrainResult:
    """One result for consecutive stages of a round's local steps: the first and last step's
    losses, the mean over every step, summed steps, examples and time."""
    if not results:
        raise ValueError("no training stages to combine")
    steps = sum(r.steps for r in results)
    return TrainResult(
        steps=steps,
        examples=sum(r.examples for r in results),
        loss_first=results[0].loss_first,
        loss_last=results[-1].loss_last,
        loss_mean=sum(r.loss_mean * r.steps for r in results) / max(steps, 1),
        seconds=sum(r.seconds for r in results),
    )


# ---------------------------------------------------------------- device and precision


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device` (no copy when they already are)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@contextmanager
def checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient (activation) checkpointing on the transformers base of `model` while inside,
    non-reentrant, with input grads on (LoRA); undone afterwards (the base is shared)."""
    if not enabled:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"federation.gradient_checkpointing: {type(base).__name__} does not support "
            "gradient checkpointing; set it to false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.enable_input_require_grads()
    config = getattr(base, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:  # training needs no KV cache; checkpointed layers would warn and drop it
        config.use_cache = False
    try:
        yield
    finally:
        if use_cache:
            config.use_cache = use_cache
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()
        base.disable_input_require_grads()


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


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict a counted label in some row (the union over the batch)."""
    return (labels[:, 1:] != -100).any(dim=0).nonzero().squeeze(1)


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether `model` (or the model an Opacus or peft wrapper holds) takes `logits_to_keep`."""
    inner = getattr(model, "_module", model)  # Opacus' GradSampleModule forwards its kwargs
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def shared_head(batch: dict[str, torch.Tensor]) -> int:
    """How many leading tokens every row of `batch` shares before its first label (a chat
    template's system turn and instruction words): 0 for a single row or nothing shared."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    labelled = (labels != -100).any(dim=0).nonzero()
    # the position predicting the first label runs with its row, so the head ends before it
    limit = int(labelled[0]) - 1 if len(labelled) else 0
    if ids.shape[0] < 2 or limit < 1:
        return 0
    same = (ids[:, :limit] == ids[:1, :limit]).all(dim=0) & (mask[:, :limit] == 1).all(dim=0)
    differs = (~same).nonzero()
    return int(differs[0]) if len(differs) else limit


def label_nll(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, share_head: bool = False
) -> torch.Tensor:
    """Next-token NLL at every position that predicts a label in some row, 0 where ignored.

    The output head and the fp32 cross-entropy run only at those positions (`logits_to_keep`,
    through the model's own forward, so soft-capping or logit scales still apply): with chat
    prompts about four in five positions predict nothing, and a 49k-word head dominated the step.
    With `share_head`, the tokens every row starts with (`shared_head`: the chat template's
    system turn) run once, as a one-row forward whose keys/values every row attends to; the
    gradient flows back through them summed over the rows, so loss and gradient are the full
    batch's to float rounding (a LoRA dropout mask on those tokens is then shared by the rows).
    Not for per-example gradients (DP-SGD): those need every row's own forward.
    Sums over the result equal `token_nll(model(...).logits, labels)`'s.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    keep = predicting_positions(labels)
    if not (0 < len(keep) < labels.shape[1] - 1 and keeps_logits(model)):
        return token_nll(model(input_ids=ids, attention_mask=mask).logits, labels)
    head = shared_head(batch) if share_head else 0
    after_head: dict = {}  # how the rows' forward continues from the head's keys/values
    if head:
        cache = model(
            input_ids=ids[:1, :head],
            attention_mask=mask[:1, :head],
            use_cache=True,
            logits_to_keep=1,
        ).past_key_values
        if cache is not None and hasattr(cache, "batch_repeat_interleave"):
            cache.batch_repeat_interleave(ids.shape[0])
            positions = torch.arange(head, ids.shape[1], device=ids.device)
            after_head = {
                "past_key_values": cache,
                "use_cache": True,
                "position_ids": positions.expand(ids.shape[0], -1),
            }
        else:
            head = 0  # no reusable cache: every row runs in full
    logits = model(
        input_ids=ids[:, head:], attention_mask=mask, logits_to_keep=keep - head, **after_head
    ).logits
    targets = labels[:, keep + 1]
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="none",
    )
    return nll.view(targets.shape)


def counted_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many next-token labels of `batch` count in the loss."""
    return int((batch["labels"][:, 1:] != -100).sum())


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
    schedule_offset: int = 0,
    schedule_steps: int | None = None,
    accumulation: int = 1,
    gradient_checkpointing: bool = False,
    precision: str = "fp32",
    group_by_length: bool = False,
    share_head: bool = False,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    skip_steps: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
    regularizer: Callable[[], torch.Tensor] | None = None,
) -> TrainResult:
    """Run `steps` optimizer steps on the trainable (LoRA) parameters of `model`.

    A step draws `accumulation` micro-batches of `batch_size` and weights each micro-batch's
    summed token NLL by the step's total token count, so it equals one step on the concatenated
    batch (the token mean `model(**batch).loss` computes). The schedule's step k is
    `schedule_offset` + k of `schedule_steps` (default: this call's steps; see
    `schedule_span`). `precision` "bf16"/"auto" runs forwards under bf16 autocast; the LoRA
    parameters, their gradients and the optimizer stay fp32. `share_head` runs the prompt head
    a batch's rows share once per batch (see `label_nll`; not with gradient checkpointing, which
    keeps no keys/values). `regularizer()` (FedProx, HetLoRA's tail penalty) is added once per
    step; the reported losses are the data loss alone.
    The batches of the first `skip_steps` steps of this seed's order are drawn and dropped: a
    later stage of a round's steps continues the data order of one uninterrupted run. Dropout
    masks come from `seed` (and `skip_steps`) in a forked RNG: a round trains the same however
    many rounds the process ran before it (a resumed run too), and the process's RNG is left
    as it was.
    """
    if not examples:
        raise ValueError("no training examples on this client")
    if accumulation < 1:
        raise ValueError(f"accumulation must be >= 1, got {accumulation}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (is the LoRA adapter attached?)")
    device = model_device(model)
    amp = autocast_dtype(precision, device=device, model=model)
    check_precision(model, amp)
    share_head = share_head and not gradient_checkpointing
    opt = make_optimizer(params, optimizer=optimizer, lr=lr, weight_decay=weight_decay)
    sched = make_scheduler(
        opt,
        schedule=schedule,
        warmup_steps=warmup_steps,
        total_steps=schedule_steps or steps,
        offset=schedule_offset,
    )
    loader = batch_loader(
        examples,
        batch_size=batch_size,
        pad_id=pad_id,
        seed=seed,
        shuffle=True,
        group_by_length=group_by_length,
    )
    model.train()
    losses: list[float] = []
    seen = 0
    start = time.perf_counter()
    batches = forever(loader)
    for _ in range(skip_steps * accumulation):
        next(batches)
    gpus = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus), checkpointing(model, gradient_checkpointing):
        torch.manual_seed((seed * 1_000_003 + skip_steps) % 2**63)  # dropout: this round's own
        for step in range(steps):
            micro = [to_device(next(batches), device) for _ in range(accumulation)]
            tokens = max(1, sum(counted_tokens(b) for b in micro))
            total = _backward(
                model,
                micro,
                tokens=tokens,
                amp=amp,
                share_head=share_head,
                regularizer=regularizer,
                device=device,
            )
            seen += sum(int(b["input_ids"].shape[0]) for b in micro)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total / tokens)
            if on_step is not None:
                on_step(step + 1, steps, losses[-1])
    return TrainResult(
        steps=steps,
        examples=seen,
        loss_first=losses[0],
        loss_last=losses[-1],
        loss_mean=sum(losses) / len(losses),
        seconds=time.perf_counter() - start,
    )


def _backward(
    model: torch.nn.Module,
    micro: Sequence[dict],
    *,
    tokens: int,
    amp: torch.dtype | None,
    share_head: bool,
    regularizer: Callable[[], torch.Tensor] | None,
    device: torch.device,
) -> float:
    """Accumulate one step's gradients over its micro-batches, each weighted by the step's
    `tokens` (the token mean of the concatenated batch); returns the summed token NLL."""
    total = 0.0
    for i, batch in enumerate(micro):
        with autocast(device, amp):
            nll = label_nll(model, batch, share_head=share_head).sum()
        part = nll / tokens
        if i == 0 and regularizer is not None:
            part = part + regularizer()
        part.backward()
        total += float(nll.detach())
    return total


@torch.no_grad()
def evaluate_nll(
    model: torch.nn.Module,
    examples: Sequence[dict],
    *,
    batch_size: int,
    pad_id: int,
    precision: str = "fp32",
    share_head: bool = False,
) -> tuple[float, int]:
    """Summed token negative log-likelihood on the response tokens, and how many tokens.

    Sums, not means, so that clients' results combine exactly into a global loss. Batches move to
    the model's device; `precision` and `share_head` as in `train_local` (the NLL is fp32).
    """
    device = model_device(model)
    amp = autocast_dtype(precision, device=device, model=model)
    total, tokens = 0.0, 0
    loader = batch_loader(examples, batch_size=batch_size, pad_id=pad_id, seed=0, shuffle=False)
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, amp):
            nll = label_nll(model, batch, share_head=share_head)
        total += float(nll.sum())
        tokens += counted_tokens(batch)
    return total, tokens
