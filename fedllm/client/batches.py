"""Batches for local steps and evaluation: seeded shuffling, optional length grouping (less
padding), and evaluation in length order."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from fedllm.data import collate


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


def batch_loader(
    examples: Sequence[dict],
    *,
    batch_size: int,
    pad_id: int,
    seed: int,
    shuffle: bool,
    group_by_length: bool = False,
) -> DataLoader:
    """Collated batches of `examples`: seeded shuffling for training (length-grouped if asked),
    shortest first for evaluation (sums do not depend on the order)."""
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


def forever(loader: DataLoader) -> Iterator[dict]:
    """The loader's batches, epoch after epoch (its sampler reshuffles each pass)."""
    while True:
        yield from loader
