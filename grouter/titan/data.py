"""Pre-dispatched routes in torchtitan's data path.

`PredispatchedDataset` is an iterable, stateful dataset in torchtitan's form: each item is
``(input_dict, labels)`` with ``input_dict["input"]`` the tokens and the sample's stored routes
under ``grouter_expert_ids`` / ``grouter_weights`` [L, K]. torchtitan's trainer passes every other
``input_dict`` key to the model's forward as a keyword argument; a converted model takes its routes
from there (`grouter.titan.convert`). Batch it with torchtitan's ``ParallelAwareDataloader`` (or
any DataLoader): default collation stacks the routes beside the tokens.

Sample j of rank r is the folder's sample ``j * world_size + r``; each rank gets the same number of
samples (the remainder is dropped), so expert-parallel ranks step together. With
``counts_by_rank`` every item also carries the rows per expert of the j-th sample of *every* rank
[world, E]: summed over a batch they are the step's all-to-all counts, known on every rank without
an exchange (`collate` keeps them on the host under torchtitan's trainer).

Tokens come from the folder (each sample checked against its digest as it is read), or from your own
torchtitan dataset (`dataset=`): then each of its samples must equal the routed one - a dataset and
a routes folder that drifted apart raise instead of training on another sample's routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import IterableDataset, default_collate

from ..router.predispatch import PredispatchReader
from .routes import COUNTS_KEY, IDS_KEY, WEIGHTS_KEY

__all__ = ["PredispatchedDataset", "HostCounts"]


@dataclass(frozen=True)
class HostCounts:
    """A batch's every-rank counts [world, E] kept on the host: not a tensor, so torchtitan's trainer
    (which moves each input_dict tensor to the device) leaves it where reading it costs no sync."""

    counts: torch.Tensor


class PredispatchedDataset(IterableDataset):
    """(input_dict, labels) items from a pre-dispatched folder: input = sample[:-1], labels = sample[1:],
    routes of the input positions. Stateful (``state_dict`` / ``load_state_dict``), also across a
    change of world size."""

    def __init__(self, reader: PredispatchReader, *, rank: int = 0, world_size: int = 1, counts_by_rank: bool = False,
                 infinite: bool = False, dataset: Optional[IterableDataset] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"PredispatchedDataset: rank {rank} outside [0, {world_size})")
        if reader.header["seq_len"] < 2:
            raise ValueError("PredispatchedDataset: samples of fewer than 2 tokens have no next-token labels")
        self.reader, self.rank, self.world_size = reader, rank, world_size
        self.counts_by_rank, self.infinite, self.dataset = counts_by_rank, infinite, dataset
        self.per_rank = len(reader) // world_size
        if self.per_rank == 0:
            raise ValueError(f"PredispatchedDataset: {len(reader)} samples cannot feed {world_size} ranks")
        self.position = 0  # samples this rank has yielded (all ranks yield in step)

    def _sample_of(self, j: int, rank: int):
        """Sample j of `rank`: its tokens and the routes of its input positions."""
        tokens, ids, weights = self.reader[j * self.world_size + rank]
        return tokens, ids[:-1], weights[:-1]

    def _counts(self, j: int, own_ids: torch.Tensor) -> torch.Tensor:
        """Rows per expert of the j-th sample of every rank (this rank's from the ids already read)."""
        E = self.reader.header["num_experts"]
        rows = [own_ids if r == self.rank else self._sample_of(j, r)[1] for r in range(self.world_size)]
        return torch.stack([torch.bincount(r.reshape(-1), minlength=E) for r in rows])

    def __iter__(self) -> Iterator[Any]:
        theirs = iter(self.dataset) if self.dataset is not None else None
        while True:
            while self.position < self.per_rank:
                j = self.position
                tokens, ids, weights = self._sample_of(j, self.rank)
                if theirs is not None:
                    item = next(theirs, None)
                    if item is None:
                        return
                    self._check_same(item, tokens, j)
                item = {"input": tokens[:-1], IDS_KEY: ids, WEIGHTS_KEY: weights}
                if self.counts_by_rank:
                    item[COUNTS_KEY] = self._counts(j, ids)
                self.position += 1
                yield item, tokens[1:]
            if not self.infinite:
                return
            self.position = 0

    def _check_same(self, item, tokens: torch.Tensor, j: int) -> None:
        input_dict, labels = item
        given = torch.as_tensor(input_dict["input"]).reshape(-1)
        if not (torch.equal(given.long(), tokens[:-1]) and torch.equal(torch.as_tensor(labels).reshape(-1).long(),
                                                                           tokens[1:])):
            raise ValueError(f"PredispatchedDataset: rank {self.rank}'s sample {j} is not the routed sample "
                             f"{j * self.world_size + self.rank} of {self.reader.path}: the dataset and the "
                             "routes folder hold different token streams (or a different order or length)")

    @staticmethod
    def collate(batch):
        """default_collate, but a batch's counts_by_rank summed into `HostCounts` (give it to the
        dataloader as collate_fn): under torchtitan's trainer they then stay on the host, and the
        step's splits cost no device-to-host copy at all (as a tensor they are moved to the device
        with the batch, and read back once per step)."""
        counts = [item[0].pop(COUNTS_KEY, None) for item in batch]
        input_dict, labels = default_collate(batch)
        if counts[0] is not None:
            input_dict[COUNTS_KEY] = HostCounts(torch.stack(counts).sum(0))
        return input_dict, labels

    # torchtitan checkpoints the dataloader through these (Stateful).
    def state_dict(self) -> dict:
        state = {"samples_consumed": self.position * self.world_size}
        if self.dataset is not None and hasattr(self.dataset, "state_dict"):
            state["dataset"] = self.dataset.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["samples_consumed"])
        if consumed % self.world_size:
            raise ValueError(f"PredispatchedDataset: {consumed} samples were consumed by the saved run, which "
                             f"{self.world_size} ranks cannot resume from the same sample (not a multiple)")
        self.position = consumed // self.world_size
        if self.position > self.per_rank:
            raise ValueError(f"PredispatchedDataset: the saved run consumed {consumed} samples, the folder "
                             f"gives {self.per_rank * self.world_size}")
        if "dataset" in state and self.dataset is not None:
            self.dataset.load_state_dict(state["dataset"])
