"""Episodic (N-way K-shot) task sampling over a pool of classes.

A :class:`ClassPool` is a set of classes whose images sit contiguously in one
uint8 array (M, C, H, W). An :class:`EpisodeDataset` turns a pool into a
map-style ``torch.utils.data.Dataset`` whose item ``b`` is meta-batch ``b``: the
tasks ``b·T … b·T+T−1``. Every task is a pure function of ``(seed, stream, task
index)`` and the pool, drawn from its own NumPy generator, so

- results do not depend on the number of DataLoader workers or on the order in
  which they run;
- the validation/test task lists are fixed by their seed (identical across runs,
  machines and meta-learner backends), and a task's content does not depend on the
  meta-batch size;
- training resumes exactly from an iteration index (start the sampler there).

NOTE [Task sampling]: per task, in this order, from ``Generator(PCG64(SeedSequence(
[seed, crc32(stream), task_index])))``: N distinct classes in random order
(class j of that order gets label j, so labels are shuffled per task); N rotation
counts k ∈ {0, 1, 2, 3} (drawn even when augmentation is off, so turning it on
changes nothing else); then, per class, K+Q distinct images (the first K are the
support set, the rest the queries). With augmentation, all images of class j are
rotated by k_j·90° counter-clockwise (``np.rot90`` on the H, W axes). Support and
query are laid out class-major: support_y = [0]*K + [1]*K + ….
"""

from __future__ import annotations

import signal
import zlib
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .cache import ImageStore


class Episode(NamedTuple):
    """A meta-batch of T tasks.

    support_x: (T, N·K, C, H, W) float32   support_y: (T, N·K) int64 in [0, N)
    query_x:   (T, N·Q, C, H, W) float32   query_y:   (T, N·Q) int64 in [0, N)
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


class TaskSpec(NamedTuple):
    """What one task is made of (indices into its pool), before any image is read.

    classes:  (N,) int64, pool class index of label j at position j
    images:   (N, K+Q) int64, index into the pool's image array (first K are support)
    rotations: (N,) int64 in {0,1,2,3} (applied only when the dataset augments)
    """

    classes: np.ndarray
    images: np.ndarray
    rotations: np.ndarray


class ClassPool:
    """A set of classes over a shared uint8 image array, and how to turn it into floats.

    Args:
        store: :class:`ImageStore` (or a uint8 ndarray) of shape (M, C, H, W).
        starts: (num_classes,) first image index of each class in the array.
        counts: (num_classes,) number of images of each class.
        names: num_classes class names.
        invert: return 1 − x (e.g. white strokes on black for Omniglot).
        mean, std: per-channel normalisation applied after scaling to [0, 1] (and inverting).
        name: the pool's name ("train", "val", "test"), the default sampling stream.
    """

    def __init__(self, store, starts, counts, names: Sequence[str], *, invert: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, name: str = "pool"):
        self.store = store if isinstance(store, ImageStore) else ImageStore(np.asarray(store))
        self.starts = np.asarray(starts, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.names = tuple(names)
        if not (len(self.starts) == len(self.counts) == len(self.names)):
            raise ValueError("starts, counts and names must have the same length, got "
                             f"{len(self.starts)}, {len(self.counts)}, {len(self.names)}")
        self.invert = bool(invert)
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together")
        # x_float = x_uint8 * scale + offset, per channel (broadcast over H, W)
        scale = np.full(1, 1.0 / 255.0)
        offset = np.zeros(1)
        if self.invert:
            scale, offset = -scale, offset + 1.0
        if mean is not None:
            m, s = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
            scale, offset = scale / s, (offset - m) / s
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        self._scale = scale.astype(np.float32).reshape(-1, 1, 1)
        self._offset = offset.astype(np.float32).reshape(-1, 1, 1)
        self.name = name

    @classmethod
    def from_arrays(cls, images: np.ndarray, counts: Sequence[int], names: Sequence[str] | None = None, **kw):
        """A pool over ``images`` (M, C, H, W) uint8 holding classes of ``counts`` images, in order."""
        counts = np.asarray(counts, dtype=np.int64)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 of shape (M, C, H, W), got {images.dtype} {images.shape}")
        if counts.sum() != len(images):
            raise ValueError(f"counts sum to {counts.sum()} but images holds {len(images)}")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        names = names if names is not None else [str(i) for i in range(len(counts))]
        return cls(ImageStore(images), starts, counts, names, **kw)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return (f"ClassPool(name={self.name!r}, classes={len(self)}, images={int(self.counts.sum())}, "
                f"image_shape={self.image_shape})")

    @property
    def images(self) -> np.ndarray:
        """The whole uint8 array (M, C, H, W) (shared with the other pools of the dataset)."""
        return self.store.array

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def class_images(self, c: int) -> np.ndarray:
        """uint8 (count_c, C, H, W) images of pool class ``c``."""
        s = int(self.starts[c])
        return self.images[s : s + int(self.counts[c])]

    def to_float(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) -> float32 scaled to [0, 1], inverted and normalised as configured.

        Done in NumPy (single-threaded): for the few thousand pixels of an episode this is far
        cheaper than waking torch's intra-op thread pool, in DataLoader workers or not.
        """
        a = x.numpy() if torch.is_tensor(x) else np.asarray(x)
        out = a.astype(np.float32)
        out *= self._scale
        if self.invert or self.mean is not None:
            out += self._offset
        return torch.from_numpy(out)


def _stream_id(stream: str | int) -> int:
    return int(stream) if isinstance(stream, int) else zlib.crc32(str(stream).encode())


class EpisodeDataset(torch.utils.data.Dataset):
    """Meta-batches of N-way K-shot tasks over a :class:`ClassPool` (see NOTE [Task sampling]).

    Item ``b`` is an :class:`Episode` of tasks ``b·T … min(b·T+T, num_tasks)−1``:
    support_x (T, N·K, C, H, W) float32, support_y (T, N·K) int64,
    query_x (T, N·Q, C, H, W) float32, query_y (T, N·Q) int64.

    Args:
        pool: the classes to draw from.
        n_way, k_shot, n_query: N, K and Q (queries per class).
        meta_batch_size: T, tasks per item.
        num_tasks: total tasks; ``len(self) = ceil(num_tasks / T)`` meta-batches.
        augment: rotate each class of a task by a random multiple of 90° (training).
        seed: base seed. Together with ``stream`` and the task index it fixes a task.
        stream: names the sequence of tasks (default: the pool's name), so equal seeds
            on the train/val/test pools still give unrelated tasks.

    Use :meth:`training` and :meth:`evaluation` for the usual settings, and
    :meth:`loader` for a DataLoader that can start at any meta-batch (resume).
    """

    def __init__(self, pool: ClassPool, n_way: int, k_shot: int, n_query: int, meta_batch_size: int = 1, *,
                 num_tasks: int, augment: bool = False, seed: int = 0, stream: str | int | None = None):
        for name, v, lo in (("n_way", n_way, 1), ("k_shot", k_shot, 1), ("n_query", n_query, 0),
                            ("meta_batch_size", meta_batch_size, 1), ("num_tasks", num_tasks, 1)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if n_way > len(pool):
            raise ValueError(f"n_way={n_way} is larger than the {len(pool)} classes of pool {pool.name!r}")
        per_class = k_shot + n_query
        if per_class > int(pool.counts.min()):
            small = int(np.argmin(pool.counts))
            raise ValueError(f"k_shot + n_query = {per_class} images per class, but class {pool.names[small]!r} "
                             f"of pool {pool.name!r} has only {int(pool.counts[small])}")
        self.pool = pool
        self.n_way, self.k_shot, self.n_query = int(n_way), int(k_shot), int(n_query)
        self.meta_batch_size = int(meta_batch_size)
        self.num_tasks = int(num_tasks)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.stream = pool.name if stream is None else stream
        self._stream_id = _stream_id(self.stream)
        self._equal_counts = bool((pool.counts == pool.counts[0]).all())

    # ---- constructors for the usual settings

    @classmethod
    def training(cls, pool: ClassPool, n_way: int, k_shot: int, n_query: int, meta_batch_size: int, *,
                 num_batches: int, seed: int = 0, augment: bool = True, stream: str | int | None = None):
        """The training stream: ``num_batches`` meta-batches (e.g. epochs × iterations), rotations on."""
        return cls(pool, n_way, k_shot, n_query, meta_batch_size, num_tasks=num_batches * meta_batch_size,
                   augment=augment, seed=seed, stream=stream)

    @classmethod
    def evaluation(cls, pool: ClassPool, n_way: int, k_shot: int, n_query: int, meta_batch_size: int, *,
                   num_tasks: int = 600, seed: int = 0, stream: str | int | None = None):
        """A fixed list of ``num_tasks`` tasks (no augmentation), identical for a given seed and pool."""
        return cls(pool, n_way, k_shot, n_query, meta_batch_size, num_tasks=num_tasks, augment=False,
                   seed=seed, stream=stream)

    # ---- sampling

    def __len__(self) -> int:
        return -(-self.num_tasks // self.meta_batch_size)

    def task_spec(self, task_index: int) -> TaskSpec:
        """Which classes, images and rotations make up task ``task_index`` (a pure function)."""
        if not 0 <= task_index < self.num_tasks:
            raise IndexError(f"task_index {task_index} out of range [0, {self.num_tasks})")
        pool, n, m = self.pool, self.n_way, self.k_shot + self.n_query
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self._stream_id, task_index])))
        classes = rng.choice(len(pool), size=n, replace=False)
        rotations = rng.integers(0, 4, size=n)
        counts = pool.counts[classes]
        if self._equal_counts:
            keys = rng.random((n, int(counts[0])))
        else:
            keys = rng.random((n, int(counts.max())))
            keys[np.arange(keys.shape[1])[None, :] >= counts[:, None]] = np.inf
        picks = np.argsort(keys, axis=1, kind="stable")[:, :m]
        images = pool.starts[classes][:, None] + picks
        return TaskSpec(classes.astype(np.int64), images.astype(np.int64), rotations.astype(np.int64))

    def tasks(self, start: int, stop: int) -> Episode:
        """An :class:`Episode` made of tasks ``start … stop−1`` (T = stop − start)."""
        if not 0 <= start < stop <= self.num_tasks:
            raise IndexError(f"task range [{start}, {stop}) is not inside [0, {self.num_tasks})")
        specs = [self.task_spec(i) for i in range(start, stop)]
        t, n, k, q = stop - start, self.n_way, self.k_shot, self.n_query
        flat = np.stack([s.images for s in specs])  # (T, N, K+Q)
        x = self.pool.images[flat.reshape(-1)]  # (T·N·(K+Q), C, H, W) uint8 (copy)
        x = x.reshape(t, n, k + q, *x.shape[1:])
        if self.augment:
            rot = np.stack([s.rotations for s in specs])  # (T, N)
            for r in (1, 2, 3):
                sel = rot == r
                if sel.any():
                    x[sel] = np.rot90(x[sel], k=r, axes=(-2, -1))
        # split and convert in NumPy: small torch copies pay for waking the intra-op thread pool
        sup = self.pool.to_float(x[:, :, :k].reshape(t, n * k, *x.shape[3:]))
        qry = self.pool.to_float(x[:, :, k:].reshape(t, n * q, *x.shape[3:]))
        labels = np.arange(n, dtype=np.int64)
        sy = torch.from_numpy(np.tile(np.repeat(labels, k), (t, 1)))
        qy = torch.from_numpy(np.tile(np.repeat(labels, q), (t, 1)))
        return Episode(sup, sy, qry, qy)

    def __getitem__(self, batch_index: int) -> Episode:
        b = _meta_batch_index(batch_index, len(self))
        start = b * self.meta_batch_size
        return self.tasks(start, min(start + self.meta_batch_size, self.num_tasks))

    def loader(self, start: int = 0, *, num_workers: int = 0, pin_memory: bool = False,
               prefetch_factor: int | None = None, persistent_workers: bool = False) -> torch.utils.data.DataLoader:
        """A DataLoader yielding meta-batches ``start, start+1, …, len(self)−1`` in order.

        ``start`` is the iteration to resume from (the stream does not depend on it or on
        ``num_workers``).
        """
        return _ordered_loader(self, start, num_workers=num_workers, pin_memory=pin_memory,
                               prefetch_factor=prefetch_factor, persistent_workers=persistent_workers)

    def shard(self, index: int, count: int) -> "EpisodeShard":
        """Process ``index`` of ``count``'s share of every meta-batch (distributed training)."""
        return EpisodeShard(self, index, count)

    def __repr__(self) -> str:
        return (f"EpisodeDataset({self.pool.name!r}: {self.n_way}-way {self.k_shot}-shot {self.n_query}-query, "
                f"T={self.meta_batch_size}, tasks={self.num_tasks}, augment={self.augment}, seed={self.seed})")


class EpisodeShard(torch.utils.data.Dataset):
    """Share ``index`` of ``count`` of each meta-batch of an :class:`EpisodeDataset`.

    Item ``b`` holds tasks ``b·T + index·T/count … b·T + (index+1)·T/count − 1`` of the full
    stream: the shards of one meta-batch are disjoint, cover it, and do not depend on how many
    processes ran earlier meta-batches (so a run can resume with another process count).
    """

    def __init__(self, dataset: EpisodeDataset, index: int, count: int):
        T = dataset.meta_batch_size
        if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
            raise ValueError(f"shard index must be in [0, count) with count >= 1, got index={index!r}, count={count!r}")
        if T % count:
            raise ValueError(f"the meta-batch of {T} tasks cannot be split evenly across {count} processes; "
                             f"choose a meta_batch divisible by the number of processes")
        if dataset.num_tasks % T:
            raise ValueError(f"cannot shard a stream whose last meta-batch is partial ({dataset.num_tasks} tasks, "
                             f"T={T})")
        self.dataset, self.index, self.count = dataset, index, count
        self.per_shard = T // count
        self.meta_batch_size = self.per_shard
        self.num_tasks = len(dataset) * self.per_shard

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, batch_index: int) -> Episode:
        b = _meta_batch_index(batch_index, len(self))
        start = b * self.dataset.meta_batch_size + self.index * self.per_shard
        return self.dataset.tasks(start, start + self.per_shard)

    def loader(self, start: int = 0, **kw) -> torch.utils.data.DataLoader:
        """As :meth:`EpisodeDataset.loader`, over this process's shares."""
        return _ordered_loader(self, start, **kw)

    def __repr__(self) -> str:
        return f"EpisodeShard({self.index}/{self.count} of {self.dataset!r})"


def _meta_batch_index(batch_index: int, count: int) -> int:
    """``batch_index`` as an index in [0, count) (negative counts from the end), else IndexError."""
    b = int(batch_index)
    if b < 0:
        b += count
    if not 0 <= b < count:
        raise IndexError(f"meta-batch {batch_index} out of range [0, {count})")
    return b


def _ordered_loader(dataset, start: int, *, num_workers: int = 0, pin_memory: bool = False,
                    prefetch_factor: int | None = None, persistent_workers: bool = False):
    if not 0 <= start <= len(dataset):
        raise ValueError(f"start must be in [0, {len(dataset)}], got {start}")
    kw = {}
    if num_workers > 0:
        kw["worker_init_fn"] = _leave_stop_signals_to_the_main_process
        kw["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kw["prefetch_factor"] = prefetch_factor
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, len(dataset)),
                                       num_workers=num_workers, pin_memory=pin_memory, **kw)


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """DataLoader worker start-up: ignore SIGINT and SIGTERM.

    Ctrl-C, ``timeout``, Slurm and many launchers signal the whole process group. A worker that
    died of the signal would make the DataLoader raise "worker killed" in the main process before
    the trainer's own handler could save its checkpoint; the main process decides instead, and
    its DataLoader ends the workers when it shuts down.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
