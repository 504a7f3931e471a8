"""The world-size-independent training stream: rank r's micro-batches of the global order (data/order.py).

Rank r of W yields, for global micro-batch u = 0, 1, …, the augmented samples at global indices
`rank_indices(u, …)`. With `num_workers` > 0, worker w builds micro-batches u₀ + w, u₀ + w + n, … and the
DataLoader hands them out in order, so the batches do not depend on the worker count. A sample's
augmentation is drawn from `order.augment_rng(index)`: the same crop and flip whatever the rank, worker
or world size. The position is one number, `next_sample` (global index of the next micro-batch), so a
checkpoint written by any world resumes on any other whose b·W divides it.

Every reader (one per rank and worker) keeps one forward cursor per lane of the order; it skips the
samples it does not need by reading tar headers (a seek past the data for local files, a read for
`pipe:`/http streams), so skipping never decodes. When b·W·num_workers divides the lane count K, each
lane is read by exactly one reader (rank r's worker w owns the indices ≡ w·b·W + r·b … (mod b·W·workers)),
so a stream is downloaded once per cycle, plus the head of a shard where a lane starts inside it; otherwise
readers that share a lane each read it (free for local files, a repeated download for streams). Faults:
a failed read of a `pipe:`/http shard is retried `retries` times with backoff; a sample that cannot be read or decoded (also every
sample behind the cut of a truncated shard, for the rest of that cycle) is counted, warned about (once per
shard and cycle for a cut), and replaced by `order.substitute(index, attempt)`, the same on every world
size; shards failing in a row before their first sample stop the run (DataError). The readers:
`anncli.data.sample_reader`."""

from __future__ import annotations

from typing import Iterator

from anncli.data import shards
from anncli.data.order import GlobalOrder, check_split, rank_indices
from anncli.data.loader import identity, loader_items, worker_init
from anncli.data.guards import Limits
from anncli.data.sample_reader import BadSample, SampleReader
from anncli.data.shards import DataError, SampleError, check_label_ids, log
from anncli.errors import UserError

_MAX_SUBSTITUTES = 100
MIN_SAMPLES_BEFORE_ABORT = 100  # the training skip bound is only enforced once this many samples were seen
decode_sample = shards.decode_sample  # module attribute, so tests can count decodes


def check_skip_bound(seen: int, skipped: int, max_skip: float, last: str = "", repeats: int = 1) -> None:
    """DataError once too many samples were skipped; `last` is the last problem, met `repeats` times."""
    if seen >= MIN_SAMPLES_BEFORE_ABORT and skipped > max_skip * seen:
        times = f" ({repeats} times)" if repeats > 1 else ""
        tail = f"; last problem{times}: {last}" if last else ""
        raise DataError(
            f"skipped {skipped} of {seen} training samples ({skipped / seen:.1%}), more than "
            f"data.max_skip_fraction={max_skip:g}{tail}"
        )


class _BatchMaker:
    """Augmented micro-batches of one rank (or one of its workers) with fault counts."""

    def __init__(self, stream: "GlobalStream"):
        from anncli.data.transforms import TrainTransform

        self.s = stream
        self.reader = SampleReader(stream.urls, stream.order, stream.limits, stream.retries)
        self.transform = TrainTransform(stream.augment)
        self.seen = self.skipped = 0
        self._problems: dict[str, int] = {}  # each problem met, and how often

    def _sample(self, slot: int):
        index = slot
        for attempt in range(_MAX_SUBSTITUTES + 1):
            self.seen += 1
            try:
                key, fields = self.reader.fetch(index, None if index == slot else ("substitute",))
                try:
                    image, label = decode_sample(key, fields, self.s.limits)
                except SampleError as e:
                    raise BadSample(f"{self.reader.url_of(index)}: sample {key}: {e}") from None
                if self.s.num_classes is not None:
                    check_label_ids(label, self.s.num_classes, self.reader.url_of(index), key)
                return key, image, label
            except BadSample as e:
                self.skipped += 1
                problem = str(e)
                times = self._problems[problem] = self._problems.get(problem, 0) + 1
                quiet = e.quiet or times > 1  # the same sample again (a substitute, a later cycle): said once
                (log.debug if quiet else log.warning)("skipping bad training sample %d: %s", index, problem)
                check_skip_bound(self.seen, self.skipped, self.s.max_skip, problem, times)
                index = self.s.order.substitute(slot, attempt)
        raise DataError(f"no readable substitute for training sample {slot} after {_MAX_SUBSTITUTES} tries")

    def make(self, micro_batch: int) -> dict:
        import torch

        s = self.s
        images, labels, keys = [], [], []
        indices = list(rank_indices(micro_batch, rank=s.rank, world_size=s.world_size, batch_size=s.batch_size))
        for slot in indices:
            key, image, label = self._sample(slot)
            img, lbl = self.transform.uint8_tensors(image, label, s.order.augment_rng(slot))
            images.append(img)
            labels.append(lbl)
            keys.append(key)
        return {"image": torch.stack(images), "label": torch.stack(labels), "keys": keys, "indices": indices,
                "micro_batch": micro_batch, "_faults": (self.seen, self.skipped)}


class GlobalStream:
    """Rank `rank`'s endless micro-batches of the world-size-independent global order.

    A micro-batch is {"image": uint8 (B,H,W,3) RGB, "label": uint8 (B,H,W), 255 = ignore, "keys": [...],
    "indices": [...]}, in pinned memory when `pin_memory` (for CUDA); the step converts and normalises on
    the device (`anncli.data.transforms.normalize_batch`). `counts` are the manifest's per-shard sample
    counts (the order is computed from them, no shard is opened for it). Per-rank batch × world size ×
    accumulation steps must equal `effective_batch`.
    """

    def __init__(self, urls: list[str], counts: list[int], *, augment, batch_size: int, effective_batch: int,
                 seed: int, rank: int, world_size: int, num_workers: int = 0, lanes: int = 16,
                 max_skip_fraction: float = 0.01, pin_memory: bool = False, limits: Limits = Limits(),
                 num_classes: int | None = None, retries: int = 0):
        if not urls or len(urls) != len(counts):
            raise UserError(f"{len(urls)} training shard(s) but {len(counts)} manifest count(s)")
        try:
            self.accum_steps = check_split(effective_batch, world_size, batch_size)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.urls, self.augment, self.batch_size = list(urls), augment, batch_size
        self.effective_batch, self.rank, self.world_size = effective_batch, rank, world_size
        self.num_workers, self.max_skip, self.pin_memory = num_workers, max_skip_fraction, pin_memory
        self.limits, self.num_classes, self.retries = limits, num_classes, retries
        self.order = GlobalOrder(list(counts), seed=seed, lanes=lanes)
        self.next_micro_batch = 0
        self._faults: dict[int, tuple[int, int]] = {}

    @property
    def samples_seen(self) -> int:
        return sum(seen for seen, _ in self._faults.values())

    @property
    def samples_skipped(self) -> int:
        return sum(skipped for _, skipped in self._faults.values())

    def seek_step(self, step: int) -> None:
        """Position before optimizer step `step` (no shard is read)."""
        self.next_micro_batch = step * self.accum_steps

    def state_dict(self) -> dict:
        """World-size-free position: the global index of the next micro-batch, and the order's fingerprint."""
        return {"version": 1, "order": self.order.fingerprint(),
                "next_sample": self.next_micro_batch * self.batch_size * self.world_size,
                "seen": self.samples_seen, "skipped": self.samples_skipped}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1 or state.get("order") != self.order.fingerprint():
            raise UserError("the data order of the checkpoint differs from this run's (seed, lanes or shard "
                            "manifest changed); exact resume is impossible")
        unit = self.batch_size * self.world_size
        if state["next_sample"] % unit:
            raise UserError(f"the checkpoint stopped at global sample {state['next_sample']}, not a multiple of "
                            f"this run's per-rank batch {self.batch_size} x {self.world_size} ranks")
        self.next_micro_batch = state["next_sample"] // unit
        self._faults = {-1: (int(state.get("seen", 0)), int(state.get("skipped", 0)))}  # this rank's, so far

    def _accept(self, batch: dict, worker: int) -> dict:
        if batch["micro_batch"] != self.next_micro_batch:  # the loader's in-order guarantee, checked
            raise RuntimeError(f"micro-batch {batch['micro_batch']} arrived, {self.next_micro_batch} expected")
        self._faults[worker] = batch.pop("_faults")
        self.next_micro_batch += 1
        return batch

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers:
            yield from self._loader(self.next_micro_batch)
            return
        maker = _BatchMaker(self)
        try:
            while True:
                batch = maker.make(self.next_micro_batch)
                if self.pin_memory:
                    batch["image"], batch["label"] = batch["image"].pin_memory(), batch["label"].pin_memory()
                yield self._accept(batch, 0)
        finally:
            maker.reader.close()

    def _loader(self, first: int) -> Iterator[dict]:
        import torch
        import torch.utils.data as tud

        stream, n = self, self.num_workers

        class _Batches(tud.IterableDataset):
            def __iter__(self):
                w = tud.get_worker_info().id
                maker = _BatchMaker(stream)
                u = first + w
                while True:
                    yield w, maker.make(u)
                    u += n

        loader = tud.DataLoader(_Batches(), batch_size=None, num_workers=n, collate_fn=identity,
                                worker_init_fn=worker_init, generator=torch.Generator().manual_seed(0),
                                pin_memory=self.pin_memory)
        for worker, batch in loader_items(loader):
            yield self._accept(batch, worker)
