"""Sample-level DP-SGD (Opacus) on a client's trainable LoRA parameters.

Each step samples every example independently with probability q (Poisson), computes per-example
gradients with Opacus's hooks, clips each to norm C, sums, adds N(0, (σC)²) and divides by the
expected batch q·n. Parameters with requires_grad=False (the base, or lora_A under FFA) get no
gradient and no noise. The loss is each example's mean response-token NLL, averaged over the
batch, so an example's gradient depends on that example alone (a token mean over the whole batch,
as `model(**batch).loss` computes, would couple examples and void the clipping bound).

An empty Poisson batch skips the forward pass but still takes a noise-only step, so that the
release is the sampled Gaussian mechanism the accountant assumes. Sampling and noise draw from a
generator seeded from OS entropy unless a seed is given (tests): a seed derived from the public
recipe would let the server subtract the noise.

Batches move to the model's device, and the noise is drawn on that device (a generator there,
seeded from the sampling generator). Under bf16 autocast (`precision`) Opacus's per-example
gradients come out in bf16: they are cast to fp32 before clipping, summing and noise, so the
fp32 LoRA parameters get an fp32 update. Gradient accumulation and gradient checkpointing are
refused for DP-SGD (`fedllm.privacy.sample_level`): a step is one Poisson batch, and Opacus's
hooks see no per-example gradients through recomputed (checkpointed) layers.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedllm.client.precision import autocast, autocast_dtype, check_precision
from fedllm.client.schedule import make_optimizer, make_scheduler
from fedllm.client.train import TrainResult, label_nll, model_device, to_device
from fedllm.data import collate
from fedllm.privacy.plan import SamplePlan


@dataclass(frozen=True)
class DPTrainResult:
    """Local training plus what the server's accountant needs: σ, q and the steps actually run."""

    train: TrainResult
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    empty_batches: int
    clipped_fraction: float

    def metrics(self) -> dict[str, float | int]:
        """The reply's DP metrics (read by fedllm.privacy.sample_level on the server)."""
        return {
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-sample-rate": self.sample_rate,
            "dp-steps": self.train.steps,
            "dp-max-grad-norm": self.max_grad_norm,
            "dp-empty-batches": self.empty_batches,
            "dp-clipped-fraction": self.clipped_fraction,
        }


def example_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, amp: torch.dtype | None = None
) -> torch.Tensor:
    """Each example's mean NLL over its response tokens (a vector of batch size); the forward
    runs under autocast to `amp` when given (the NLL itself in fp32)."""
    device = batch["input_ids"].device
    with autocast(device, amp):
        nll = label_nll(model, batch)
    counted = (batch["labels"][:, 1:] != -100).sum(dim=1).clamp(min=1)
    return nll.sum(dim=1) / counted


def per_sample_norms(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """The norm of each example's whole gradient (over all params), from Opacus's grad_sample."""
    rows = [p.grad_sample.reshape(len(p.grad_sample), -1).norm(dim=1) for p in params]
    return torch.stack(rows, dim=1).norm(dim=1)


class PrivateSteps:
    """Opacus DP-SGD bound to a model's trainable parameters; `close()` removes its hooks."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: torch.Generator,
        amp: torch.dtype | None = None,
    ) -> None:
        if noise_multiplier < 0 or max_grad_norm <= 0:
            raise ValueError(
                f"need noise_multiplier >= 0 and max_grad_norm > 0, "
                f"got {noise_multiplier} and {max_grad_norm}"
            )
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters (is the LoRA adapter attached?)")
        self.device, self.amp = model_device(model), amp
        check_precision(model, amp)
        if generator.device != self.device:  # Opacus draws noise with it on the params' device
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            generator = torch.Generator(self.device).manual_seed(seed)
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            generator=generator,
        )

    def step(self, batch: dict[str, torch.Tensor] | None) -> tuple[float | None, int]:
        """One DP-SGD step on `batch` (None: empty, noise only); (mean loss, examples clipped)."""
        loss, clipped = None, 0
        if batch is None:
            for p in self.params:
                p.grad_sample = p.new_zeros((0, *p.shape))
        else:
            losses = example_losses(self.module, to_device(batch, self.device), amp=self.amp)
            losses.mean().backward()
            loss = float(losses.detach().mean())
            for p in self.params:  # bf16 under autocast: clip, sum and noise in fp32
                if p.grad_sample is not None and p.grad_sample.dtype != p.dtype:
                    p.grad_sample = p.grad_sample.to(p.dtype)
            norms = per_sample_norms(self.params)
            clipped = int((norms > self.optimizer.max_grad_norm).sum())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, clipped

    def close(self) -> None:
        """Remove Opacus's hooks and per-example gradient attributes from the model."""
        self.module._close()


def train_dp(
    model: torch.nn.Module,
    examples: Sequence[dict],
    *,
    plan: SamplePlan,
    steps: int,
    pad_id: int,
    optimizer: str = "adamw",
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    warmup_steps: int = 0,
    schedule_offset: int = 0,
    schedule_steps: int | None = None,
    precision: str = "fp32",
    seed: int | None = None,
) -> DPTrainResult:
    """`steps` DP-SGD steps with Poisson sampling at plan.sample_rate over `examples`; the
    schedule and `precision` as in `fedllm.client.train.train_local`."""
    n = len(examples)
    if n == 0:
        raise ValueError("no training examples on this client")
    q = plan.sample_rate
    gen = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer=optimizer, lr=lr, weight_decay=weight_decay)
    sched = make_scheduler(
        opt,
        schedule=schedule,
        warmup_steps=warmup_steps,
        total_steps=schedule_steps or steps,
        offset=schedule_offset,
    )
    amp = autocast_dtype(precision, device=model_device(model), model=model)
    private = PrivateSteps(
        model,
        opt,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=max(1, round(q * n)),
        generator=gen,
        amp=amp,
    )
    model.train()
    losses: list[float] = []
    seen = clipped = empty = 0
    start = time.perf_counter()
    try:
        for _ in range(steps):
            picked = (torch.rand(n, generator=gen) < q).nonzero().flatten().tolist()
            batch = collate([examples[i] for i in picked], pad_id=pad_id) if picked else None
            loss, n_clipped = private.step(batch)
            sched.step()
            empty += batch is None
            seen += len(picked)
            clipped += n_clipped
            if loss is not None:
                losses.append(loss)
    finally:
        private.close()
    nan = float("nan")
    result = TrainResult(
        steps=steps,
        examples=seen,
        loss_first=losses[0] if losses else nan,
        loss_last=losses[-1] if losses else nan,
        loss_mean=sum(losses) / len(losses) if losses else nan,
        seconds=time.perf_counter() - start,
    )
    return DPTrainResult(
        train=result,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=q,
        max_grad_norm=plan.max_grad_norm,
        empty_batches=empty,
        clipped_fraction=clipped / seen if seen else 0.0,
    )
