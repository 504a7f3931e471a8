"""The training stream: endless, seeded, resumable batches of augmented samples for one rank.

Every shard draw, sample pick and augmentation decision is a function of (seed, rank, worker,
position), so the stream's position is a small JSON-able state and a restart continues exactly.
"""

from __future__ import annotations

import json
import logging
import tarfile
from typing import Iterator

import numpy as np

from anncli.data.loader import identity, loader_items, worker_init
from anncli.data.shards import SampleError, decode_sample, iter_shard
from anncli.errors import UserError

MIN_SAMPLES_BEFORE_ABORT = 100  # the skip bound is only enforced once this many samples were seen
_MAX_EMPTY_PICKS = 1000
_SEED_MASK = (1 << 63) - 1
log = logging.getLogger("anncli.data")


class DataError(UserError):
    """Training data too broken to go on (too many skipped samples, or nothing readable)."""


def _rng(key: tuple, position: int, purpose: int) -> np.random.Generator:
    """The generator for one decision; key = (seed, rank, worker, generation), purpose 0 shard, 1 pick, 2 augment."""
    seed, rank, worker, generation = key
    return np.random.default_rng([seed & _SEED_MASK, rank, worker, position, purpose, generation])


def open_shard_count(shuffle_buffer: int) -> int:
    """Shards each worker reads at once; every sample comes from a randomly picked one of them."""
    return max(1, min(16, shuffle_buffer // 16))


class _SampleSource:
    """Raw samples of one (rank, worker) stream: shards drawn with replacement, `k` open, a random one read next.

    The whole position is the plain dict `state`: shards drawn so far, the open ones as [draw, samples read],
    picks made, samples seen and skipped. Reopening a slot skips its read samples as raw tar bytes.
    """

    def __init__(self, urls: list[str], key: tuple, k: int, max_skip: float, state: dict | None):
        self.urls, self.key, self.k, self.max_skip = urls, key, k, max_skip
        fresh = {"draws": 0, "slots": [], "position": 0, "seen": 0, "skipped": 0}
        self.state = json.loads(json.dumps(state)) if state else fresh
        self._iters: list = [None] * len(self.state["slots"])

    def _url(self, draw: int) -> str:
        return self.urls[int(_rng(self.key, draw, 0).integers(len(self.urls)))]

    def _open(self, i: int):
        draw, consumed = self.state["slots"][i]
        it = iter_shard(self._url(draw))
        for _ in range(consumed):
            next(it)
        return it

    def _drop(self, i: int) -> None:
        del self.state["slots"][i], self._iters[i]

    def fault(self, message: str) -> None:
        st = self.state
        st["skipped"] += 1
        log.warning("skipping bad training sample: %s", message)
        check_skip_bound(st["seen"], st["skipped"], self.max_skip, message)

    def next_raw(self) -> tuple[int, str, str, dict]:
        st = self.state
        for _ in range(_MAX_EMPTY_PICKS):
            while len(st["slots"]) < self.k:
                st["slots"].append([st["draws"], 0])
                self._iters.append(None)
                st["draws"] += 1
            pos = st["position"]
            st["position"] += 1
            i = int(_rng(self.key, pos, 1).integers(len(st["slots"])))
            url = self._url(st["slots"][i][0])
            try:
                if self._iters[i] is None:
                    self._iters[i] = self._open(i)
                key, fields = next(self._iters[i])
            except StopIteration:
                self._drop(i)
                continue
            except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                read = st["slots"][i][1]
                self._drop(i)
                st["seen"] += 1
                self.fault(f"{url}: shard unreadable after {read} samples: {e}")
                continue
            st["slots"][i][1] += 1
            st["seen"] += 1
            return pos, url, key, fields
        raise DataError(f"no training samples could be read from {len(self.urls)} shard(s), e.g. {self.urls[0]}")


def check_skip_bound(seen: int, skipped: int, max_skip: float, last: str = "") -> None:
    if seen >= MIN_SAMPLES_BEFORE_ABORT and skipped > max_skip * seen:
        tail = f"; last problem: {last}" if last else ""
        raise DataError(
            f"skipped {skipped} of {seen} training samples ({skipped / seen:.1%}), more than "
            f"data.max_skip_fraction={max_skip:g}{tail}"
        )


class _BatchMaker:
    """Batches of one (rank, worker) stream, each carrying the stream state after it."""

    def __init__(self, urls, transform, batch_size, key, k, max_skip, state):
        self.source = _SampleSource(urls, key, k, max_skip, state)
        self.transform, self.batch_size, self.key = transform, batch_size, key

    def next_batch(self) -> dict:
        import torch

        images, labels, keys = [], [], []
        while len(keys) < self.batch_size:
            pos, url, key, fields = self.source.next_raw()
            try:
                image, label = decode_sample(key, fields)
            except SampleError as e:
                self.source.fault(f"{url}: sample {key}: {e}")
                continue
            img, lbl = self.transform.uint8_tensors(image, label, _rng(self.key, pos, 2))
            images.append(img)
            labels.append(lbl)
            keys.append(key)
        return {"image": torch.stack(images), "label": torch.stack(labels), "keys": keys,
                "_worker": self.key[2], "_state": json.dumps(self.source.state)}


class TrainStream:
    """An endless, seeded, resumable stream of augmented training batches for one rank.

    A batch is {"image": uint8 (B,H,W,3) RGB, "label": uint8 (B,H,W), 255 = ignore, "keys": [...]}, in
    pinned memory when `pin_memory` (for CUDA); the step converts and normalises on the device
    (`anncli.data.transforms.normalize_batch`).

    Each of the rank's `max(1, num_workers)` streams draws shards with replacement from *all* shards, so
    every rank yields as many batches as asked for, whatever the shard count. Every shard draw, sample pick
    and augmentation decision is a function of (seed, rank, worker, position). `state_dict()` holds the
    position after the batches handed out so far (not what workers prefetched); `load_state_dict()` makes
    the next batches identical to an uninterrupted run's. `shuffle_buffer` sets how many shards a worker
    reads at once (`open_shard_count`): consecutive samples come from randomly picked open shards, and the
    packer already shuffles the sample order inside train shards.

    Faults (truncated shard, undecodable image, missing field) are skipped with one warning line each and
    counted; once at least `MIN_SAMPLES_BEFORE_ABORT` samples were seen, a skipped fraction above
    `max_skip_fraction` raises `DataError`.
    """

    def __init__(self, urls: list[str], *, augment, batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int = 0, shuffle_buffer: int = 256, max_skip_fraction: float = 0.01,
                 pin_memory: bool = False):
        if not urls:
            raise UserError("no training shards given")
        self.urls, self.augment, self.batch_size = list(urls), augment, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.max_skip, self.pin_memory = num_workers, max_skip_fraction, pin_memory
        self.streams = max(1, num_workers)
        self.open_shards = open_shard_count(shuffle_buffer)
        self._generation = 0
        self._batches = 0
        self._states: list[dict | None] = [None] * self.streams

    @property
    def samples_seen(self) -> int:
        return sum(s["seen"] for s in self._states if s)

    @property
    def samples_skipped(self) -> int:
        return sum(s["skipped"] for s in self._states if s)

    @property
    def batches(self) -> int:
        return self._batches

    def _layout(self) -> dict:
        return {"version": 1, "seed": self.seed, "rank": self.rank, "streams": self.streams,
                "open_shards": self.open_shards, "num_shards": len(self.urls)}

    def state_dict(self) -> dict:
        return {**self._layout(), "generation": self._generation, "batches": self._batches,
                "workers": json.loads(json.dumps(self._states))}

    def load_state_dict(self, state: dict) -> None:
        self._batches = int(state.get("batches", 0))
        if any(state.get(k) != v for k, v in self._layout().items()):
            log.warning("data stream state was saved for another seed/rank/worker/shard layout; "
                        "continuing with fresh streams (not the uninterrupted sample order)")
            self._generation = int(state.get("generation", 0)) + 1
            self._states = [None] * self.streams
            return
        self._generation = int(state["generation"])
        self._states = json.loads(json.dumps(state["workers"]))

    def _maker(self, worker: int) -> _BatchMaker:
        from anncli.data.transforms import TrainTransform

        key = (self.seed, self.rank, worker, self._generation)
        return _BatchMaker(self.urls, TrainTransform(self.augment), self.batch_size, key, self.open_shards,
                           self.max_skip, self._states[worker])

    def _accept(self, batch: dict) -> dict:
        self._states[batch.pop("_worker")] = json.loads(batch.pop("_state"))
        self._batches += 1
        check_skip_bound(self.samples_seen, self.samples_skipped, self.max_skip)
        return batch

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers == 0:
            maker = self._maker(0)
            while True:
                batch = maker.next_batch()
                if self.pin_memory:
                    batch["image"], batch["label"] = batch["image"].pin_memory(), batch["label"].pin_memory()
                yield self._accept(batch)

        import torch
        import torch.utils.data as tud

        stream, first = self, self._batches % self.streams

        class _Batches(tud.IterableDataset):
            def __iter__(self):
                # The loader takes batches from its workers round-robin, starting at worker 0; rotating the
                # logical worker ids makes the batch after `b` consumed ones come from worker b % streams.
                maker = stream._maker((tud.get_worker_info().id + first) % stream.streams)
                while True:
                    yield maker.next_batch()

        # A private generator: the loader's worker seed must not draw from the global RNG, which the
        # training loop checkpoints (every random decision here comes from explicit per-sample generators).
        loader = tud.DataLoader(_Batches(), batch_size=None, num_workers=self.num_workers, collate_fn=identity,
                                worker_init_fn=worker_init, generator=torch.Generator().manual_seed(self.seed),
                                pin_memory=self.pin_memory)
        for batch in loader_items(loader):
            yield self._accept(batch)
