"""The order of a run's batches: a function of ``(seed, epoch)``, with a position that is saved and
restored in O(1)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.tuner.datasets import CacheDataset
from mlx_lm.tuner.trainer import iterate_batches

from .config import ConfigError, TrainConfig


class _Batch(CacheDataset):
    """The examples of one batch, for mlx-lm's ``iterate_batches`` to assemble (pad, truncate)."""

    def __init__(self, dataset: CacheDataset, indices: list[int]):
        self._parent, self._indices = dataset, indices

    def itemlen(self, idx: int) -> int:
        return self._parent.itemlen(self._indices[idx])

    def __getitem__(self, idx: int) -> Any:
        return self._parent[self._indices[idx]]

    def __len__(self) -> int:
        return len(self._indices)


class BatchStream:
    """mlx-lm's batches in an order that is a function of ``(seed, epoch)``, with a position to save.

    Epoch ``e`` visits the batches of ``iterate_batches`` in the permutation that
    ``iterate_batches(..., seed=seed + e)`` draws, so epoch 0 is exactly ``mlx_lm lora``'s first epoch
    (it seeds NumPy with ``seed`` and draws one permutation). The permutation is drawn here, eagerly,
    so that a saved position is restored in O(1); each batch is then assembled (padded, truncated) by
    mlx-lm's own ``iterate_batches``. Reseeding per epoch keeps the order independent of anything else
    that uses NumPy's RNG (evaluation does).

    Under data parallelism (``world_size`` processes) the order is the same and process ``rank``
    takes its share of every batch, the examples ``rank, rank + world_size, ...`` of it, as
    ``iterate_batches(..., comm_group=...)`` does.
    """

    def __init__(self, dataset: CacheDataset, config: TrainConfig, epoch: int = 0, offset: int = 0,
                 rank: int = 0, world_size: int = 1):
        if config.batch_size % world_size:
            raise ConfigError(f"config key 'batch_size' is {config.batch_size}, which the {world_size} "
                              "processes of this run cannot share: it must be a multiple of the number "
                              "of processes")
        self.dataset, self.config = dataset, config
        self.rank, self.world_size = rank, world_size
        # As iterate_batches builds its batches: examples sorted by length, cut in batch_size runs.
        order = sorted(range(len(dataset)), key=dataset.itemlen)
        size = config.batch_size
        self._batches = [order[i: i + size] for i in range(0, len(order) - size + 1, size)]
        if not 0 <= offset <= len(self._batches) or epoch < 0:
            raise ConfigError(
                f"saved data position (epoch {epoch}, batch {offset}) does not fit the training set, "
                f"which has {len(self._batches)} batches per epoch"
            )
        self.epoch, self.offset = epoch, offset
        self._permutation = self._draw(epoch)

    def _draw(self, epoch: int) -> np.ndarray:
        np.random.seed((self.config.seed + epoch) % 2**32)
        return np.random.permutation(len(self._batches))

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> tuple[mx.array, mx.array]:
        if self.offset == len(self._permutation):
            self.epoch, self.offset = self.epoch + 1, 0
            self._permutation = self._draw(self.epoch)
        batch = self._batches[self._permutation[self.offset]]
        examples = _Batch(self.dataset, batch[self.rank:: self.world_size])
        self.offset += 1
        return next(iterate_batches(examples, self.config.batch_size // self.world_size,
                                    self.config.max_seq_length))

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


def iteration_seed(seed: int, iteration: int) -> int:
    """The global mlx seed set before each iteration (dropout draws from it)."""
    return (seed * 1_000_003 + iteration) % (2**63)
