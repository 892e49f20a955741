"""Batch samplers for metric learning: P x K class-balanced batches, random triplets, or plain shuffled batches.

All samplers yield lists of item indices; use them as `DataLoader(dataset, batch_sampler=sampler)`.
An epoch's plan is a pure function of (seed, epoch), so runs are reproducible and a resumed run
replays the same batches (`set_epoch` + `set_start_batch`). As with DistributedSampler, call
`set_epoch(epoch)` before each epoch, otherwise every epoch repeats the plan of epoch 0.

With several processes (`set_rank_share`), the plan is the global one, the same in every process, and each
rank yields its own disjoint share of every global batch: the shares of the ranks together are the
single-process plan.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


class _EpochPlanSampler(Sampler[list[int]]):
    """Shared bookkeeping: per-epoch seeding and mid-epoch resume.

    Subclasses set `_num_batches` and implement `_plan(rng)` returning int64 [num_batches, batch_size].
    """

    def __init__(self, num_batches: int, seed: int) -> None:
        super().__init__()
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy seeding), got {seed}")
        if num_batches < 1:
            raise ValueError(f"{type(self).__name__}: the data make no whole batch; use more data or smaller batches")
        self.seed = seed
        self.epoch = 0
        self._num_batches = num_batches
        self._start_batch = 0
        self.rank, self.world_size = 0, 1

    def __len__(self) -> int:
        """Batches per epoch; the same every epoch."""
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the plan of `epoch` (>= 0) for the following iterations, from its first batch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch
        self._start_batch = 0

    def set_start_batch(self, num_batches: int) -> None:
        """Skip the first `num_batches` batches of the current epoch, until the next `set_epoch`.

        It holds for every iteration of the epoch, not just the next one: a DataLoader with workers
        calls iter() on its batch sampler twice when it starts (once in the iterator's base class,
        again when it resets), so a one-shot skip would be consumed by the first, discarded call.
        """
        if not 0 <= num_batches <= len(self):
            raise ValueError(f"start batch must be in [0, {len(self)}], got {num_batches}")
        self._start_batch = num_batches

    def set_rank_share(self, rank: int, world_size: int) -> None:
        """Yield only rank's share of each global batch (`share_positions`), from now on.

        Raises ValueError when the batch does not split evenly into whole units (classes, triplets, images).
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        units, name = self._share_units()
        if units % world_size:
            raise ValueError(f"{name} = {units} does not split evenly over {world_size} processes: make it a "
                             f"multiple of the number of processes")
        self.rank, self.world_size = rank, world_size

    def share_positions(self, rank: int) -> np.ndarray:
        """int64: positions in a global batch that `rank` takes (of `world_size`), in order. Default: a
        contiguous slice, so that the ranks' shares in rank order are the global batch in its order."""
        size = self._share_units()[0] * self._unit_items() // self.world_size
        return np.arange(rank * size, (rank + 1) * size)

    def _share_units(self) -> tuple[int, str]:
        """(units a batch is split in, their config key): a share holds whole units."""
        raise NotImplementedError

    def _unit_items(self) -> int:
        return 1

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """int64 [num_batches, batch_size]: the batches of `epoch`, in order."""
        return self._plan(np.random.default_rng((self.seed, epoch)))

    def repeat_rates(self, epoch: int) -> dict[str, float]:
        """How often the plan of `epoch` shows an image more than once (see `plan_repeat_rates`)."""
        return plan_repeat_rates(self.epoch_plan(epoch))

    def __iter__(self):
        start = self._start_batch  # read now, not lazily inside the generator
        plan = self.epoch_plan(self.epoch)[start:]
        if self.world_size > 1:
            plan = plan[:, self.share_positions(self.rank)]
        return (batch.tolist() for batch in plan)

    def _plan(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


class PKBatchSampler(_EpochPlanSampler):
    """Batches of P distinct classes x K images each, covering every usable image once per epoch.

    A batch is P*K indices laid out class by class: K consecutive indices share a class.

    Epoch plan:
        1. Each class with n >= 2 images is shuffled and cut into ceil(n / K) chunks of K. A short
           last chunk is filled with other images of the class, so its K images stay distinct;
           a class with n < K repeats its images as evenly as possible (n=2, K=4: a b b a).
           Repeats are deliberate: the dataset draws a fresh random augmentation per fetch, so a
           repeat is a different view of the same product, and small classes still give K
           positives. The loss sees them as ordinary positives; items carry their index if a
           caller wants to tell same-source pairs apart.
        2. Chunks are dealt to the len() batches so that no batch gets two chunks of
           one class: classes in random order with their chunks consecutive, dealt round by
           round, each round a fresh random permutation of the batches (the class that spans two
           rounds avoids, in the second, the batches it took in the first).
        3. Batches are shuffled.

    Corner cases:
        - Single-image classes form no positive pair: excluded, counted in `num_excluded_classes`.
        - len() is total_chunks // P, the same every epoch. The chunks left
          over by that floor (at most P - 1) are chosen at random each epoch, so an image can miss
          one epoch only when total_chunks % P != 0.
        - A class with more chunks than there are batches (one class dominating the data) cannot
          place all of them: the excess is left out, and the batches it would have filled get fresh
          chunks of random other classes (images repeated within the epoch).

    Args:
        labels: int [N] class label per dataset item.
        classes_per_batch: P >= 2.
        images_per_class: K >= 2.
        seed: >= 0; with the epoch, fixes the plan.

    Raises:
        ValueError: P < 2, K < 2, or fewer than P classes with >= 2 images.
    """

    def __init__(
        self,
        labels: np.ndarray,
        classes_per_batch: int,
        images_per_class: int,
        seed: int,
    ) -> None:
        if classes_per_batch < 2:
            raise ValueError(f"classes_per_batch (P) must be >= 2 to have negatives, got {classes_per_batch}")
        if images_per_class < 2:
            raise ValueError(f"images_per_class (K) must be >= 2 to have positives, got {images_per_class}")
        members = _members_by_class(labels)
        self._members = [m for m in members if m.size >= 2]
        self.num_excluded_classes = len(members) - len(self._members)
        if len(self._members) < classes_per_batch:
            raise ValueError(
                f"PKBatchSampler: classes_per_batch (P) = {classes_per_batch} but only "
                f"{len(self._members)} classes have >= 2 images "
                f"({self.num_excluded_classes} single-image classes excluded)"
            )
        self.classes_per_batch, self.images_per_class = classes_per_batch, images_per_class
        self._num_chunks = np.array([-(-m.size // images_per_class) for m in self._members])
        super().__init__(int(self._num_chunks.sum()) // classes_per_batch, seed)

    def _share_units(self) -> tuple[int, str]:
        return self.classes_per_batch, "data.classes_per_batch (P, the global batch's classes)"

    def _unit_items(self) -> int:
        return self.images_per_class  # a share is whole classes: P / world_size classes x K images

    def _plan(self, rng: np.random.Generator) -> np.ndarray:
        P, K, B = self.classes_per_batch, self.images_per_class, self._num_batches
        used = self._chunks_used(rng)  # [C'] chunks per class this epoch, each <= B, sum B * P
        class_order = rng.permutation(len(self._members))
        chunks = np.concatenate(
            [_class_chunks(rng, self._members[c], K, used[c]) for c in class_order if used[c]]
        )  # [B * P, K], classes consecutive in class_order
        chunk_class = np.repeat(class_order, used[class_order])  # [B * P]
        batch_of_chunk = _deal(rng, chunk_class, B)
        chunks_by_batch = np.argsort(batch_of_chunk, kind="stable").reshape(B, P)
        return chunks[chunks_by_batch].reshape(B, P * K)[rng.permutation(B)]

    def _chunks_used(self, rng: np.random.Generator) -> np.ndarray:
        """Chunks per class for this epoch: as cut, capped at one per batch, summing to B * P."""
        B, P = self._num_batches, self.classes_per_batch
        used = np.minimum(self._num_chunks, B)
        surplus = int(used.sum()) - B * P
        if surplus == 0:
            return used
        # Leave out random chunks (the floor in len()), or add fresh chunks to classes that still
        # have room (when a capped class left batches short). Both draw chunk slots uniformly
        # without replacement, i.e. per-class counts from a multivariate hypergeometric.
        capacity = used if surplus > 0 else B - used
        picked = rng.multivariate_hypergeometric(capacity, abs(surplus))
        return used - np.sign(surplus) * picked


def _class_chunks(rng: np.random.Generator, members: np.ndarray, k: int, count: int) -> np.ndarray:
    """int64 [count, k]: one class's chunks for an epoch (see PKBatchSampler, step 1)."""
    order = rng.permutation(members)
    short = -order.size % k
    if short:
        # Fill the last chunk from the other chunks' images (distinct while n >= k); a class with
        # n < k has no others, so cycle through a reshuffle of the whole class.
        others = order[: order.size - (k - short)]
        source = others if others.size >= short else order
        order = np.concatenate([order, np.resize(rng.permutation(source), short)])
    chunks = order.reshape(-1, k)
    extra = [np.resize(rng.permutation(members), k) for _ in range(count - len(chunks))]
    return np.concatenate([chunks[:count], *[e[None] for e in extra]])


def _deal(rng: np.random.Generator, chunk_class: np.ndarray, num_batches: int) -> np.ndarray:
    """Batch id [B * P] for each chunk, no class twice in a batch.

    Requires each class's chunks to be consecutive and at most `num_batches` of them. Position i is
    dealt in round i // B to batch perm_round[i % B]: within a round every batch is distinct, and a
    class spans at most two rounds, so only the class straddling a round boundary needs the second
    round's permutation to start with batches it does not already hold.
    """
    B = num_batches
    batch_of = np.empty(chunk_class.size, dtype=np.int64)
    for start in range(0, chunk_class.size, B):
        perm = rng.permutation(B)
        if start and chunk_class[start - 1] == chunk_class[start]:
            previous = slice(start - B, start)
            taken = batch_of[previous][chunk_class[previous] == chunk_class[start]]
            perm = perm[np.argsort(np.isin(perm, taken), kind="stable")]
        batch_of[start : start + B] = perm
    return batch_of


class RandomTripletBatchSampler(_EpochPlanSampler):
    """The reference pipeline's batches: T random (anchor, positive, negative) triplets.

    A batch is 3T indices: the T anchors, then their T positives, then their T negatives. Every
    image of a class with >= 2 images is an anchor once per epoch, in shuffled order; its positive
    is a uniformly drawn other image of its class, its negative a uniformly drawn image of any other
    class (single-image classes included: they are valid negatives).

    Corner cases:
        - Single-image classes cannot be anchors; counted in `num_excluded_classes`.
        - len() = num_anchors // T; the last num_anchors % T anchors of the
          shuffled order are not used that epoch.
        - An image may appear several times in a batch (e.g. as one anchor's positive and another's
          negative).

    Raises:
        ValueError: T < 1, fewer than 2 classes, or fewer than T anchors.
    """

    def __init__(
        self, labels: np.ndarray, triplets_per_batch: int, seed: int) -> None:
        if triplets_per_batch < 1:
            raise ValueError(f"triplets_per_batch must be >= 1, got {triplets_per_batch}")
        members = _members_by_class(labels)
        if len(members) < 2:
            raise ValueError("RandomTripletBatchSampler needs at least 2 classes to draw negatives")
        sizes = np.array([m.size for m in members])
        # Work in class-sorted positions: a class is a contiguous range, so "same class" and
        # "another class" are both a range computation, vectorised over all anchors.
        self._items = np.concatenate(members)
        self._class_size = np.repeat(sizes, sizes)
        self._class_start = np.repeat(np.cumsum(sizes) - sizes, sizes)
        self._anchors = np.flatnonzero(self._class_size >= 2)
        self.num_excluded_classes = int((sizes < 2).sum())
        self.triplets_per_batch = triplets_per_batch
        if self._anchors.size < triplets_per_batch:
            raise ValueError(
                f"RandomTripletBatchSampler: triplets_per_batch = {triplets_per_batch} but only "
                f"{self._anchors.size} images are in classes with >= 2 images"
            )
        super().__init__(self._anchors.size // triplets_per_batch, seed)

    def _share_units(self) -> tuple[int, str]:
        return self.triplets_per_batch, "data.triplets_per_batch"

    def share_positions(self, rank: int) -> np.ndarray:
        """The rank's slice of the anchors, then of their positives and negatives: whole triplets, laid out as
        a batch is."""
        T, share = self.triplets_per_batch, self.triplets_per_batch // self.world_size
        return np.concatenate([np.arange(part * T + rank * share, part * T + (rank + 1) * share) for part in range(3)])

    def _plan(self, rng: np.random.Generator) -> np.ndarray:
        B, T = self._num_batches, self.triplets_per_batch
        anchor = rng.permutation(self._anchors)[: B * T]
        start, size = self._class_start[anchor], self._class_size[anchor]
        # Offset 1..size-1 from the anchor within its class range never lands on the anchor.
        positive = start + (anchor - start + rng.integers(1, size)) % size
        # Uniform over the N - size positions outside the class range: skip over the range.
        draw = rng.integers(0, self._items.size - size)
        negative = np.where(draw < start, draw, draw + size)
        return np.concatenate([self._items[p].reshape(B, T) for p in (anchor, positive, negative)], axis=1)


class ShuffleBatchSampler(_EpochPlanSampler):
    """Plain shuffled batches of `batch_size` images, whatever their classes (for proxy losses, which need no
    positive pair in the batch). Every image at most once per epoch; the last N % batch_size images of the
    shuffled order are not used that epoch.

    Raises:
        ValueError: batch_size < 1, or fewer than batch_size images.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_items, self.batch_size = num_items, batch_size
        super().__init__(num_items // batch_size, seed)

    def _share_units(self) -> tuple[int, str]:
        return self.batch_size, "data.classes_per_batch x data.images_per_class"

    def _plan(self, rng: np.random.Generator) -> np.ndarray:
        B, S = self._num_batches, self.batch_size
        return rng.permutation(self.num_items)[: B * S].reshape(B, S).astype(np.int64)


def plan_repeat_rates(plan: np.ndarray) -> dict[str, float]:
    """Repeats in an epoch plan (int [num_batches, batch_size] of item indices).

    Returns:
        repeated_slots: fraction of the plan's slots holding an image already shown earlier in the epoch
            (P x K fills small classes and short chunks with repeats).
        repeated_slots_within_batch: fraction of slots whose image is already in the same batch: the image
            paired with (another view of) itself.
        batches_with_a_repeat: fraction of batches holding some image twice.
    """
    slots = plan.size
    sorted_rows = np.sort(plan, axis=1)
    duplicates_in_row = (sorted_rows[:, 1:] == sorted_rows[:, :-1]).sum(axis=1)  # [num_batches]
    return {"repeated_slots": 1.0 - np.unique(plan).size / slots,
            "repeated_slots_within_batch": float(duplicates_in_row.sum()) / slots,
            "batches_with_a_repeat": float((duplicates_in_row > 0).mean())}


def _members_by_class(labels: np.ndarray) -> list[np.ndarray]:
    """Item indices per class (int64 arrays, ascending), classes in sorted label order."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}")
    order = np.argsort(labels, kind="stable").astype(np.int64)
    return np.split(order, np.flatnonzero(np.diff(labels[order])) + 1)
