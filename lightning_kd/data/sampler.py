"""Resumable, data-parallel sampling: an interrupted epoch continues exactly where it stopped.

``ResumableSampler`` is a ``DistributedSampler`` (so Lightning does not replace it with its
own): a deterministic shuffle per epoch from ``seed + epoch``, and one disjoint shard of it per
data-parallel rank. It can start a pass part-way through its shard.

``ResumableDataLoader`` is what makes Lightning save and restore that position. Lightning 2.6
stores ``state_dict()`` of every train dataloader that has ``state_dict``/``load_state_dict``
in the checkpoint (``CombinedLoader._state_dicts``) and hands it back through
``load_state_dict`` on resume before it creates the epoch's iterator
(``FitLoop.setup_data``). The position is counted in *batches that left the loader*, not in
indices the sampler handed out: with ``num_workers > 0`` the worker processes fetch indices
several batches ahead, so the sampler's own count runs ahead of training. Lightning's fetcher
prefetches a batch ahead only for loaders without a length (``_PrefetchDataFetcher``); this
loader always has one, so when a checkpoint is taken (e.g. in ``on_train_batch_end``) the
batches that left the loader are exactly those given to ``training_step``.

The saved position is the number of samples consumed by all data-parallel ranks together, so
every rank can restore from rank 0's checkpoint, and a run may resume with a different number
of data-parallel ranks when that number divides the position (the shuffled order itself does
not depend on the number of ranks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_kd.checks import check_int

_STATE_VERSION = 1


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` that can resume part-way through an epoch.

    Each epoch the dataset's indices are shuffled with ``seed + epoch`` (exactly as
    ``DistributedSampler`` does), padded (or cut, with ``drop_last``) to a multiple of
    ``num_replicas``, and rank ``r`` takes every ``num_replicas``-th index from ``r``. Call
    :meth:`set_epoch` at the start of every epoch (Lightning does).

    ``state_dict()`` records the epoch and how many samples of it were consumed;
    ``load_state_dict()`` makes the next pass start right after them. Used on its own, the
    sampler counts the indices its iterator handed out; inside a :class:`ResumableDataLoader`
    the loader counts the batches it yielded instead (exact with worker prefetching).

    Args:
        dataset: the dataset (only its length is used).
        num_replicas: the number of data-parallel ranks; default the world size.
        rank: this rank's index among them; default the global rank.
        shuffle: shuffle every epoch (False: sequential order).
        seed: the shuffle seed, identical on every rank.
        drop_last: drop the tail that does not divide evenly among the ranks instead of
            padding with repeated samples.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self._start = 0  # where the next pass begins in this rank's shard of self.epoch
        self._pass_epoch: int | None = None  # epoch of the pass in progress, if any
        self._position = 0  # indices of that pass handed out so far (including its start)

    @property
    def start(self) -> int:
        """Where the next pass begins in this rank's shard (0 unless resuming)."""
        return self._start

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next pass; a pending resume position is kept only if it
        belongs to that epoch."""
        if epoch != self.epoch:
            self._start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())  # this rank's shard of the epoch's order
        start = min(self._start, len(indices))
        self._start = 0
        self._pass_epoch, self._position = self.epoch, start
        return self._follow(indices[start:])

    def _follow(self, indices: list[int]) -> Iterator[int]:
        for index in indices:
            self._position += 1
            yield index

    # ------------------------------------------------------------------ state
    def state_at(self, epoch: int, consumed: int) -> dict[str, Any]:
        """The state dict for ``consumed`` samples of this rank's shard of ``epoch``.

        Args:
            epoch: the epoch.
            consumed: samples of this rank's shard consumed in that epoch.

        Returns:
            A dict of ints and bools (rank-independent: it holds the samples consumed by all
            ranks together).
        """
        return {
            "version": _STATE_VERSION,
            "epoch": int(epoch),
            "samples_seen": int(min(consumed, self.num_samples)) * self.num_replicas,
            "num_replicas": self.num_replicas,
            "dataset_len": len(self.dataset),  # type: ignore[arg-type]
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def state_dict(self) -> dict[str, Any]:
        """The epoch and the samples of it consumed so far, counted as indices handed out by
        this sampler's iterator (or the pending resume position before a pass starts)."""
        if self._pass_epoch is not None and self._pass_epoch == self.epoch:
            return self.state_at(self.epoch, self._position)
        return self.state_at(self.epoch, self._start)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass continue where the saved one stopped.

        Args:
            state: a dict from :meth:`state_dict` (or a loader's ``state_dict``).

        Raises:
            ValueError: when the state belongs to another dataset length, seed or shuffle
                setting (the order would differ), or its position cannot be split evenly
                over this sampler's number of ranks.
        """
        missing = {"epoch", "samples_seen", "dataset_len", "seed", "shuffle"} - set(state)
        if missing:
            raise ValueError(f"not a ResumableSampler state: missing {sorted(missing)}.")
        expected = {
            "dataset_len": len(self.dataset),  # type: ignore[arg-type]
            "seed": self.seed,
            "shuffle": self.shuffle,
        }
        for key, value in expected.items():
            if state[key] != value:
                raise ValueError(
                    f"cannot resume the sampler: the saved state has {key}={state[key]!r}, this "
                    f"sampler has {key}={value!r}; resuming needs the same data and seed to "
                    "continue the same order."
                )
        seen = int(state["samples_seen"])
        if seen % self.num_replicas:
            raise ValueError(
                f"cannot resume the sampler: {seen} samples were consumed (over "
                f"{state.get('num_replicas')} ranks), which does not split evenly over "
                f"{self.num_replicas} data-parallel ranks."
            )
        super().set_epoch(int(state["epoch"]))
        self._start = min(seen // self.num_replicas, self.num_samples)
        self._pass_epoch = None


@dataclass
class _Pass:
    epoch: int
    start: int
    batches: int = 0
    done: bool = False


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position Lightning checkpoints.

    It counts the batches it has yielded in the current pass; ``state_dict()`` turns that into
    the sampler's state, and ``load_state_dict()`` makes the next pass start with the first
    batch not yet yielded. The pass starts lazily, at the first ``next()``, so the epoch set
    by ``set_epoch`` after ``iter()`` is still honoured (Lightning creates the iterator of a
    resumed run before it calls ``set_epoch``). ``len()`` is always the full epoch, which is
    what Lightning's batch accounting expects on resume.

    Args:
        dataset: a map-style dataset.
        batch_size: samples per batch.
        sampler: the resumable sampler over ``dataset``.
        drop_last: drop the last incomplete batch of each rank's shard.
        **kwargs: other ``DataLoader`` arguments (``num_workers``, ``collate_fn``, ...), except
            ``batch_sampler`` and ``shuffle``.

    Raises:
        ValueError: without a ``ResumableSampler`` or with a ``batch_sampler``.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        sampler: ResumableSampler | None = None,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise ValueError(
                f"ResumableDataLoader needs sampler=ResumableSampler(...), got {sampler!r}."
            )
        if kwargs.get("batch_sampler") is not None or kwargs.get("shuffle"):
            raise ValueError(
                "ResumableDataLoader does not take batch_sampler or shuffle: the sampler "
                "shuffles and the loader batches."
            )
        check_int("batch_size", batch_size, 1)
        super().__init__(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs
        )
        self._pass: _Pass | None = None

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        # Runs at the first next(): the sampler's pass (lazy with num_workers=0, started by
        # super().__iter__() with workers) begins right here, with this epoch and start.
        current = _Pass(sampler.epoch, sampler.start)
        self._pass = current
        for batch in super().__iter__():
            current.batches += 1
            yield batch
        current.done = True

    def upcoming_indices(self) -> list[int] | None:
        """The dataset indices of the next batch this loader will yield in the pass in
        progress (for a teacher that prefetches), or None when no pass is in progress or it
        has no further batch. Pure: the sampler's epoch order is recomputed, nothing moves."""
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        current = self._pass
        if current is None or current.done or current.epoch != sampler.epoch:
            return None
        order = list(DistributedSampler.__iter__(sampler))  # this rank's shard, no side effect
        begin = current.start + current.batches * self.batch_size  # type: ignore[operator]
        upcoming = order[begin : begin + self.batch_size]  # type: ignore[operator]
        if not upcoming or (self.drop_last and len(upcoming) < self.batch_size):  # type: ignore[operator]
            return None
        return upcoming

    def state_dict(self) -> dict[str, Any]:
        """The sampler state after the batches this loader has yielded so far."""
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        current = self._pass
        if current is None or current.epoch != sampler.epoch:
            return sampler.state_at(sampler.epoch, sampler.start)  # no pass of this epoch yet
        if current.done:
            consumed = sampler.num_samples
        else:
            consumed = current.start + current.batches * self.batch_size  # type: ignore[operator]
        return sampler.state_at(current.epoch, consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (see :meth:`ResumableSampler.load_state_dict`)."""
        self.sampler.load_state_dict(state)  # type: ignore[attr-defined]
        self._pass = None
