"""The client's local optimisation and the held-out loss, on tokenized examples.

Plain PyTorch steps on whatever device the model lives on (CUDA when the process sees one, else
CPU; see `fedllm.model.loading.compute_device`): every batch moves to the model's device. Knobs:
gradient accumulation (a step sums `accumulation` micro-batches, weighted as one bigger batch),
gradient checkpointing, bf16 autocast with fp32 master LoRA weights, and a learning-rate schedule
that may span the whole federation (`schedule_span`). The federated parts live in `app.py`.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from fedllm.client.precision import PRECISIONS as PRECISIONS
from fedllm.client.precision import autocast, autocast_dtype, check_precision
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


def length_grouped_batches(
    lengths: Sequence[int], *, batch_size: int, seed: int, pool: int = 16
) -> list[list[int]]:
    """One epoch of shuffled batches whose members have similar lengths (less padding).

    The shuffled indices are cut into pools of `pool` batches, each pool is sorted by length and
    cut into batches, and the batch order is shuffled again: every example once per epoch, as
    random as plain shuffling across pools, and a batch pads only to its own near-equal lengths.
    """
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    span = batch_size * pool
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]


class _GroupedEpochs(torch.utils.data.Sampler):
    """A batch sampler: a new length-grouped epoch (seed, seed+1, ...) every pass."""

    def __init__(self, lengths: Sequence[int], *, batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = length_grouped_batches(
            self.lengths, batch_size=self.batch_size, seed=self.seed + self.epoch
        )
        self.epoch += 1
        yield from batches


def _loader(
    examples: Sequence[dict],
    *,
    batch_size: int,
    pad_id: int,
    seed: int,
    shuffle: bool,
    group_by_length: bool = False,
) -> DataLoader:
    items = list(examples)
    collate_fn = lambda batch: collate(batch, pad_id=pad_id)  # noqa: E731
    if shuffle and group_by_length:
        lengths = [len(x["input_ids"]) for x in items]
        sampler = _GroupedEpochs(lengths, batch_size=batch_size, seed=seed)
        return DataLoader(items, batch_sampler=sampler, collate_fn=collate_fn)
    if not shuffle:  # evaluation: sums do not depend on the order, so pad as little as possible
        items = sorted(items, key=lambda x: len(x["input_ids"]))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        items, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate_fn
    )


def _forever(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


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


# ---------------------------------------------------------------- steps and schedules


def num_local_steps(
    n_examples: int,
    *,
    batch_size: int,
    local_steps: int | None,
    local_epochs: float | None,
    accumulation: int = 1,
) -> int:
    """Local steps for a round: given directly, or from epochs over this client's shard (a step
    sees `accumulation` batches)."""
    if local_steps is not None:
        return local_steps
    assert local_epochs is not None
    return max(1, math.ceil(local_epochs * n_examples / (batch_size * accumulation)))


def schedule_span(*, scope: str, server_round: int, rounds: int, steps: int) -> tuple[int, int]:
    """(steps already scheduled before this round, steps the schedule spans).

    scope "round" restarts the schedule every round; "federation" spans every planned round,
    so round r starts at step (r-1)·steps of rounds·steps (warm-up once, decay across rounds).
    """
    if scope == "round":
        return 0, steps
    if scope != "federation":
        raise ValueError(f"schedule scope {scope!r}; valid: 'federation', 'round'")
    if not 1 <= server_round <= rounds:
        raise ValueError(f"server round {server_round} outside the planned rounds 1..{rounds}")
    return (server_round - 1) * steps, rounds * steps


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier at global step `step` (0-based) of a `total_steps` schedule:
    linear warm-up (step+1)/(warmup+1), then constant, linear or cosine decay."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"schedule {schedule!r}; valid: 'constant', 'linear', 'cosine'")


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    offset: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant, linear or cosine decay after a linear warm-up; this call's step k is the
    schedule's step `offset` + k."""
    lr_factor(0, schedule=schedule, warmup_steps=0, total_steps=1)  # unknown names fail here

    def factor(step: int) -> float:
        return lr_factor(
            offset + step, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps
        )

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
    later stage of a round's steps continues the data order of one uninterrupted run.
    """
    if not examples:
        raise ValueError("no training examples on this client")
    if accumulation < 1:
        raise ValueError(f"accumulation must be >= 1, got {accumulation}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (is the LoRA adapter attached?)")
    device = model_device(model)
    amp = autocast_dtype(precision, device, model)
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
    loader = _loader(
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
    batches = _forever(loader)
    for _ in range(skip_steps * accumulation):
        next(batches)
    with checkpointing(model, gradient_checkpointing):
        for step in range(steps):
            micro = [to_device(next(batches), device) for _ in range(accumulation)]
            tokens = max(1, sum(counted_tokens(b) for b in micro))
            total = 0.0
            for i, batch in enumerate(micro):
                with autocast(device, amp):
                    nll = label_nll(model, batch, share_head=share_head).sum()
                part = nll / tokens
                if i == 0 and regularizer is not None:
                    part = part + regularizer()
                part.backward()
                total += float(nll.detach())
                seen += int(batch["input_ids"].shape[0])
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
    amp = autocast_dtype(precision, device, model)
    total, tokens = 0.0, 0
    loader = _loader(examples, batch_size=batch_size, pad_id=pad_id, seed=0, shuffle=False)
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, amp):
            nll = label_nll(model, batch, share_head=share_head)
        total += float(nll.sum())
        tokens += counted_tokens(batch)
    return total, tokens
